"""OpenAI's embeddings API over the service, for the official `openai` SDKs and the clients
built on them: `POST /v1/embeddings`, `GET /v1/models`, `GET /v1/models/{model}`.

The embedding models are the served models with a text pipeline; `model` names one by its name
in the repository. `input` is a string, a list of strings, a list of token ids (one input) or a
list of such lists. Strings take the server's text path (tokenized with the engine's pipeline
and batched with every other request); token ids are sent as the engine's own inputs, as given
(the client adds the model's special tokens, e.g. BERT's [CLS] and [SEP]), padded and masked by
the server. More inputs than the model's `max_batch_size` are split into requests of at most
that many, queued together so that they batch.

`usage.prompt_tokens` counts the tokens the engine was given: each text's tokens after the
pipeline's truncation, special tokens included, padding not; for token ids, the ids sent. The
count comes from the tokenization the texts are served from (`server.prepared.Usage`): they are
tokenized once.

`encoding_format` is "float" (the API's default) or "base64" (the SDKs' default: little-endian
float32 bytes, base64-encoded); `dimensions` keeps the first N dimensions and scales the result
back to unit length (Matryoshka truncation). `truncate` (not OpenAI's; text-embeddings-
inference's, sent with the SDKs' `extra_body`) cuts texts longer than the model reads instead
of refusing them with 413.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server import codec
from server.errors import Internal, InvalidArgument, MalformedRequest, NotFound, ServerError
from server.http.common import OPENAI, endpoint, json_response, parse_json, read_body, until_disconnect
from server.prepared import Usage
from server.proto import grpc_service_pb2 as pb
from server.repository import Model
from server.service import InferenceService

# OpenAI's own limit on the inputs of one request.
MAX_INPUTS = 2048
ENCODINGS = ("float", "base64")
FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "truncate")
TOKEN_INPUTS = ("input_ids", "attention_mask")
E = TypeVar("E", bound=ServerError)
T = TypeVar("T")


def _about(exc: E, param: str | None, code: str | None = None) -> E:
    """`exc`, saying which request field it is about (OpenAI's error `param`, and `code`)."""
    exc.param = param  # type: ignore[attr-defined]
    exc.code = code  # type: ignore[attr-defined]
    return exc


def check_fields(document: Any, fields: Sequence[str]) -> dict[str, Any]:
    """`document` if it is a JSON object of only `fields` naming a `model`; raises
    `MalformedRequest` naming the field (as OpenAI, unknown fields are refused: a misspelt
    option would otherwise be ignored in silence)."""
    if not isinstance(document, dict):
        raise _about(MalformedRequest("the request body must be a JSON object"), None)
    for key in document:
        if key not in fields:
            raise _about(MalformedRequest(f"Unrecognized request argument supplied: {key} (known: "
                                          f"{', '.join(fields)})"), key)
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise _about(MalformedRequest("'model' must be the name of a served model"), "model")
    return document


@dataclass(frozen=True)
class EmbeddingsRequest:
    """A checked `POST /v1/embeddings` body: `texts` or `token_ids` (the other is None)."""

    model: str
    texts: list[str] | None
    token_ids: list[list[int]] | None
    encoding_format: str = "float"
    dimensions: int | None = None
    truncate: bool = False

    @property
    def inputs(self) -> Sequence[Any]:
        return self.texts if self.texts is not None else self.token_ids or []

    @classmethod
    def parse(cls, document: Any) -> EmbeddingsRequest:
        """Check a parsed JSON body against the API's schema. Raises `MalformedRequest` naming
        the field (as OpenAI, unknown fields are refused: a misspelt option would otherwise be
        ignored in silence)."""
        document = check_fields(document, FIELDS)
        model = document["model"]
        if "input" not in document:
            raise _about(MalformedRequest("'input' is required"), "input")
        texts, token_ids = _inputs(document["input"])
        encoding = document.get("encoding_format") or "float"
        if encoding not in ENCODINGS:
            raise _about(MalformedRequest(f"'encoding_format' must be one of {', '.join(ENCODINGS)}, got "
                                          f"{encoding!r}"), "encoding_format")
        dimensions = document.get("dimensions")
        if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
            raise _about(MalformedRequest(f"'dimensions' must be an integer >= 1, got {dimensions!r}"), "dimensions")
        if not isinstance(document.get("user", ""), str):
            raise _about(MalformedRequest("'user' must be a string"), "user")
        truncate = document.get("truncate", False)
        if not isinstance(truncate, bool):
            raise _about(MalformedRequest("'truncate' must be true or false"), "truncate")
        return cls(model, texts, token_ids, encoding, dimensions, truncate)


def _inputs(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """`input` as texts or as token id lists."""
    def is_ids(item: Any) -> bool:
        return isinstance(item, list) and bool(item) and all(type(i) is int for i in item)

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _about(MalformedRequest("'input' must be a string, a list of strings, a list of token ids or a list of "
                                      "lists of token ids, and not empty"), "input")
    if len(value) > MAX_INPUTS:
        raise _about(MalformedRequest(f"'input' has {len(value)} items; at most {MAX_INPUTS} are allowed"), "input")
    if all(isinstance(item, str) for item in value):
        if not all(value):
            raise _about(MalformedRequest(f"'input' item {value.index('')} is an empty string"), "input")
        return value, None
    if is_ids(value):
        return None, [value]
    if all(is_ids(item) for item in value):
        return None, value
    raise _about(MalformedRequest("'input' must be a string, a list of strings, a list of token ids or a list of "
                                  "non-empty lists of token ids"), "input")


async def _all(work: Sequence[Awaitable[T]]) -> list[T]:
    """Every result, in order; when one fails (or this is cancelled), the rest are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _encode(vectors: np.ndarray, encoding: str) -> list[Any]:
    """Each row of `vectors` as the API sends it: its float32s (a numpy row, which
    `json_response` writes as a list of the shortest exact numbers), or its little-endian
    float32 bytes in base64 (one `tobytes` per request, not per row)."""
    if encoding == "base64":
        raw = np.ascontiguousarray(vectors, dtype="<f4").tobytes()
        step = len(raw) // len(vectors) if len(vectors) else 0
        return [base64.b64encode(raw[i:i + step]).decode("ascii") for i in range(0, len(raw), step)]
    return list(np.ascontiguousarray(vectors, dtype=np.float32))  # rows; `json_response` prints float32s


class OpenAIRoutes:
    """The route handlers over one service; request bodies up to `limit_bytes`."""

    def __init__(self, service: InferenceService, limit_bytes: int) -> None:
        self.service = service
        self.limit_bytes = limit_bytes

    def _embedding_model(self, name: str) -> Model:
        try:
            model = self.service.models.get(name)
        except NotFound as exc:
            raise _about(exc, "model", "model_not_found") from None
        if model.text_output is None:
            raise _about(InvalidArgument(
                f"model '{name}' makes no embeddings over this API: its engine has no text pipeline (compile it from "
                f"a directory with a tokenizer); send its inputs ({', '.join(model.inputs)}) to "
                f"/v2/models/{name}/infer"), "model")
        if model.task != "feature-extraction":
            raise _about(InvalidArgument(
                f"model '{name}' is a {model.task} engine, not an embedding model; send its inputs to "
                f"/v2/models/{name}/infer"), "model")
        return model

    async def embeddings(self, request: Request) -> Response:
        params = EmbeddingsRequest.parse(parse_json(await read_body(request, self.limit_bytes)))
        model = self._embedding_model(params.model)
        assert model.text_output is not None
        width = model.outputs[model.text_output].shape[-1]
        if params.dimensions is not None and isinstance(width, int) and params.dimensions > width:
            raise _about(InvalidArgument(f"'dimensions' is {params.dimensions}, more than the {width} of model "
                                         f"'{model.name}'"), "dimensions")
        vectors, tokens = await until_disconnect(request, self._embed(model, params))
        if params.dimensions is not None:  # the truncation text requests' `dimensions` parameter applies
            assert model.pipeline is not None
            vectors = model.pipeline.truncate_embeddings(vectors, params.dimensions)
        data = [{"object": "embedding", "index": i, "embedding": e}
                for i, e in enumerate(_encode(vectors, params.encoding_format))]
        return json_response({"object": "list", "data": data, "model": params.model,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _embed(self, model: Model, params: EmbeddingsRequest) -> tuple[np.ndarray, int]:
        """The embeddings of every input ([inputs, width] float32) and the tokens counted."""
        step = model.max_batch_size or model.engine.max_batch_size or 1
        items = params.inputs
        parts = await _all([self._embed_part(model, items[i:i + step], params.texts is not None, params.truncate)
                            for i in range(0, len(items), step)])
        return np.concatenate([vectors for vectors, _ in parts]), sum(tokens for _, tokens in parts)

    async def _embed_part(self, model: Model, items: Sequence[Any], text: bool,
                          truncate: bool) -> tuple[np.ndarray, int]:
        request = pb.ModelInferRequest(model_name=model.name)
        if truncate and text:
            request.parameters["truncate"].bool_param = True
        assert model.text_output is not None
        request.outputs.add(name=model.text_output)
        usage = Usage()
        if text:
            assert model.text_input is not None
            try:
                encoded = [t.encode() for t in items]
            except UnicodeEncodeError:
                raise _about(MalformedRequest("'input' holds a string that is not valid Unicode"), "input") from None
            texts = np.empty(len(encoded), dtype=object)
            texts[:] = encoded
            request.inputs.add(name=model.text_input, datatype="BYTES", shape=[len(encoded)])
            request.raw_input_contents.append(codec.encode_tensor(texts))
            tokens = 0
        else:
            tokens = self._token_inputs(model, items, request)
        response = await self.service.infer(request, usage)
        return _vectors(response, len(items), model.name), tokens + usage.prompt_tokens

    @staticmethod
    def _token_inputs(model: Model, token_ids: Sequence[list[int]], request: pb.ModelInferRequest) -> int:
        """Add the engine's inputs for `token_ids` to `request` (ids padded with the pipeline's
        pad id, and the attention mask); return the number of ids."""
        if "input_ids" not in model.inputs or set(model.inputs) - set(TOKEN_INPUTS):
            raise _about(InvalidArgument(f"model '{model.name}' takes the inputs {', '.join(model.inputs)}; token ids "
                                         "make only input_ids and attention_mask, so send text"), "input")
        longest = max(len(ids) for ids in token_ids)
        pad_id = getattr(model.pipeline, "pad_id", 0)
        arrays = {}
        for name, spec in model.inputs.items():
            arrays[name] = np.full((len(token_ids), longest), pad_id if name == "input_ids" else 0, dtype=spec.dtype)
        for row, ids in enumerate(token_ids):
            try:
                arrays["input_ids"][row, :len(ids)] = ids
            except OverflowError:
                raise _about(InvalidArgument(f"'input' item {row} holds a token id outside the range of "
                                             f"{arrays['input_ids'].dtype}"), "input") from None
            if "attention_mask" in arrays:
                arrays["attention_mask"][row, :len(ids)] = 1
        for name, array in arrays.items():
            request.inputs.add(name=name, datatype=codec.datatype(array.dtype), shape=list(array.shape))
            request.raw_input_contents.append(codec.encode_tensor(array))
        return sum(len(ids) for ids in token_ids)

    async def models(self, request: Request) -> Response:
        models = [m for m in self.service.models.loaded()
                  if m.text_output is not None and m.task == "feature-extraction"]
        return json_response({"object": "list", "data": [_card(m) for m in models]})

    async def model(self, request: Request) -> Response:
        return json_response(_card(self._embedding_model(request.path_params["model"])))


def _vectors(response: pb.ModelInferResponse, count: int, name: str) -> np.ndarray:
    """The embeddings in `response` as float32 [count, width]."""
    output, raw = response.outputs[0], response.raw_output_contents[0]
    shape = tuple(output.shape)
    if output.datatype not in ("FP16", "FP32", "FP64") or len(shape) != 2 or shape[0] != count:
        raise Internal(f"model '{name}' answered output '{output.name}' as {output.datatype} {list(shape)}, not "
                       f"floats of shape [{count}, width]")
    dtype = np.dtype(codec.DTYPE_OF[output.datatype]).newbyteorder("<")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.float32, copy=False)


def _card(model: Model) -> dict[str, Any]:
    """OpenAI's Model object; `created` is when the served engine was written."""
    try:
        created = int(model.path.stat().st_mtime) if model.path is not None else 0
    except OSError:
        created = 0
    return {"id": model.name, "object": "model", "created": created, "owned_by": "kiln"}


def routes(service: InferenceService, limit_bytes: int) -> list[Route]:
    """The OpenAI embeddings routes (reranking and classification: `server.http.tasks`)."""
    handlers = OpenAIRoutes(service, limit_bytes)
    return [
        Route("/v1/embeddings", endpoint(OPENAI, "HTTP embeddings", handlers.embeddings), methods=["POST"]),
        Route("/v1/models", endpoint(OPENAI, "HTTP models", handlers.models), methods=["GET"]),
        Route("/v1/models/{model}", endpoint(OPENAI, "HTTP model", handlers.model), methods=["GET"]),
    ]
