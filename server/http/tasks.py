"""Reranking and classification over HTTP, in the shapes the embedding servers' clients already
speak: `POST /v1/rerank` (Cohere's, Jina's, Infinity's and text-embeddings-inference's request:
`query`, `documents`, `top_n`, `return_documents`) for sentence-pair engines, and
`POST /v1/classify` (Infinity's: `input` texts → per text, every label with its score, best
first) for text-classification engines.

Both go through the service's text path as any KServe v2 text request does (tokenized by the
engine's pipeline, batched with every other request, counted in the statistics): a rerank is a
request of (query, document) pairs whose `score` is each document's relevance; a classification
is a request of texts with `top_k=0` (every label). Their errors have OpenAI's shape, as the
other `/v1` routes'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server import codec
from server.errors import Internal, InvalidArgument, MalformedRequest, NotFound
from server.http.common import OPENAI, endpoint, json_response, parse_json, read_body, until_disconnect
from server.http.openai import MAX_INPUTS, _about, _all, check_fields
from server.prepared import Usage
from server.proto import grpc_service_pb2 as pb
from server.repository import Model
from server.service import InferenceService

RERANK_FIELDS = ("model", "query", "documents", "top_n", "return_documents", "raw_scores", "truncate")
CLASSIFY_FIELDS = ("model", "input", "raw_scores", "truncate")


def _check_fields(document: Any, fields: Sequence[str]) -> dict[str, Any]:
    document = check_fields(document, fields)
    for flag in ("return_documents", "raw_scores", "truncate"):
        if flag in document and not isinstance(document[flag], bool):
            raise _about(MalformedRequest(f"'{flag}' must be true or false"), flag)
    return document


def _texts(value: Any, field: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _about(MalformedRequest(f"'{field}' must be a non-empty string or a non-empty list of non-empty "
                                      "strings"), field)
    if len(value) > MAX_INPUTS:
        raise _about(MalformedRequest(f"'{field}' has {len(value)} items; at most {MAX_INPUTS} are allowed"), field)
    return value


@dataclass(frozen=True)
class RerankRequest:
    """A checked `POST /v1/rerank` body. `top_n` None: every document."""

    model: str
    query: str
    documents: list[str]
    top_n: int | None = None
    return_documents: bool = False
    raw_scores: bool = False
    truncate: bool = False

    @classmethod
    def parse(cls, document: Any) -> RerankRequest:
        """Check a parsed JSON body; raises `MalformedRequest` naming the field."""
        body = _check_fields(document, RERANK_FIELDS)
        query = body.get("query")
        if not isinstance(query, str) or not query:
            raise _about(MalformedRequest("'query' must be a non-empty string"), "query")
        top_n = body.get("top_n")
        if top_n is not None and (type(top_n) is not int or top_n < 1):
            raise _about(MalformedRequest(f"'top_n' must be an integer >= 1, got {top_n!r}"), "top_n")
        return cls(body["model"], query, _texts(body.get("documents"), "documents"), top_n,
                   body.get("return_documents", False), body.get("raw_scores", False), body.get("truncate", False))


@dataclass(frozen=True)
class ClassifyRequest:
    """A checked `POST /v1/classify` body."""

    model: str
    texts: list[str]
    raw_scores: bool = False
    truncate: bool = False

    @classmethod
    def parse(cls, document: Any) -> ClassifyRequest:
        """Check a parsed JSON body; raises `MalformedRequest` naming the field."""
        body = _check_fields(document, CLASSIFY_FIELDS)
        return cls(body["model"], _texts(body.get("input"), "input"), body.get("raw_scores", False),
                   body.get("truncate", False))


def _bytes_tensor(request: pb.ModelInferRequest, name: str, texts: Sequence[str]) -> None:
    try:
        encoded = [t.encode() for t in texts]
    except UnicodeEncodeError:
        raise _about(MalformedRequest("a string of the request is not valid Unicode"), None) from None
    array = np.empty(len(encoded), dtype=object)
    array[:] = encoded
    request.inputs.add(name=name, datatype="BYTES", shape=[len(encoded)])
    request.raw_input_contents.append(codec.encode_tensor(array))


def _floats(response: pb.ModelInferResponse, count: int, model: str) -> np.ndarray:
    """The first output of `response` as float32 [count, k]."""
    output, raw = response.outputs[0], response.raw_output_contents[0]
    if output.datatype not in ("FP16", "FP32", "FP64") or len(output.shape) != 2 or output.shape[0] != count:
        raise Internal(f"model '{model}' answered output '{output.name}' as {output.datatype} {list(output.shape)}")
    dtype = np.dtype(codec.DTYPE_OF[output.datatype]).newbyteorder("<")
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(output.shape)).astype(np.float32)


class TaskRoutes:
    """The route handlers over one service; request bodies up to `limit_bytes`."""

    def __init__(self, service: InferenceService, limit_bytes: int) -> None:
        self.service = service
        self.limit_bytes = limit_bytes

    def _model(self, name: str, task: str, route: str) -> Model:
        try:
            model = self.service.models.get(name)
        except NotFound as exc:
            raise _about(exc, "model", "model_not_found") from None
        if model.task != task or not model.text_inputs:
            what = f"a {model.task} engine" if model.task else "an engine without a text pipeline"
            raise _about(InvalidArgument(f"model '{name}' is {what}; {route} serves {task} engines"), "model")
        return model

    async def _scores(self, model: Model, texts: list[str], pairs: list[str] | None, output: str, top_k: bool,
                      truncate: bool) -> tuple[np.ndarray, int]:
        """The engine's `output` ([len(texts), k] float32) for `texts` (with `pairs`), in
        requests of at most `max_batch_size` texts queued together, and the tokens read."""
        step = model.max_batch_size or model.engine.max_batch_size or 1
        parts = [self._request(model, texts[i:i + step], None if pairs is None else pairs[i:i + step], output, top_k,
                               truncate) for i in range(0, len(texts), step)]
        usages = [Usage() for _ in parts]
        responses = await _all([self.service.infer(r, u) for r, u in zip(parts, usages, strict=True)])
        tokens = sum(u.prompt_tokens for u in usages)
        scores = np.concatenate([_floats(r, p.inputs[0].shape[0], model.name)
                                 for r, p in zip(responses, parts, strict=True)])
        return scores, tokens

    @staticmethod
    def _request(model: Model, texts: list[str], pairs: list[str] | None, output: str, top_k: bool,
                 truncate: bool) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=model.name)
        _bytes_tensor(request, model.text_inputs[0], texts)
        if pairs is not None:
            _bytes_tensor(request, model.text_inputs[1], pairs)
        request.outputs.add(name=output)
        if top_k:
            request.parameters["all_scores"].bool_param = True
        if truncate:
            request.parameters["truncate"].bool_param = True
        return request

    async def rerank(self, request: Request) -> Response:
        params = RerankRequest.parse(parse_json(await read_body(request, self.limit_bytes)))
        model = self._model(params.model, "sentence-pair", "/v1/rerank")
        assert model.text is not None
        if len(model.text.labels) != 1:
            raise _about(InvalidArgument(
                f"model '{model.name}' scores {len(model.text.labels)} labels per pair; /v1/rerank needs a reranker "
                f"(one relevance score per pair): send its pairs to /v2/models/{model.name}/infer"), "model")
        output = "logits" if params.raw_scores else "score"
        queries = [params.query] * len(params.documents)
        scores, tokens = await until_disconnect(
            request, self._scores(model, queries, params.documents, output, False, params.truncate))
        relevance = scores[:, 0]
        results = []
        for index in np.argsort(-relevance, kind="stable")[:params.top_n].tolist():
            result: dict[str, Any] = {"index": index, "relevance_score": float(relevance[index])}
            if params.return_documents:
                result["document"] = {"text": params.documents[index]}
            results.append(result)
        return json_response({"object": "rerank", "results": results, "model": params.model,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def classify(self, request: Request) -> Response:
        params = ClassifyRequest.parse(parse_json(await read_body(request, self.limit_bytes)))
        model = self._model(params.model, "text-classification", "/v1/classify")
        assert model.text is not None
        labels = model.text.labels
        output = "logits" if params.raw_scores else "score"
        # every label in label order (all_scores), sorted here: raw logits have no top_k
        scores, tokens = await until_disconnect(
            request, self._scores(model, params.texts, None, output, not params.raw_scores, params.truncate))
        data = []
        for row in scores:
            order = np.argsort(-row, kind="stable")
            data.append([{"label": labels[j], "score": float(row[j])} for j in order])
        return json_response({"object": "classify", "data": data, "model": params.model,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def routes(service: InferenceService, limit_bytes: int) -> list[Route]:
    """`/v1/rerank` and `/v1/classify`."""
    handlers = TaskRoutes(service, limit_bytes)
    return [
        Route("/v1/rerank", endpoint(OPENAI, "HTTP rerank", handlers.rerank), methods=["POST"]),
        Route("/v1/classify", endpoint(OPENAI, "HTTP classify", handlers.classify), methods=["POST"]),
    ]
