"""A `ModelInferRequest` decoded and checked for one model (`Prepared`), what it cost
(`Usage`, for the HTTP APIs), and its text answer made by the task's post-processing."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server import codec
from server.errors import DeadlineExceeded, Internal, InvalidArgument, Rejected
from server.proto import grpc_service_pb2 as pb
from server.repository import Model
from server.stats import BACKEND, OTHER, REJECTED, Timings


@dataclass(frozen=True)
class Prepared:
    """A request decoded and checked for one model: its `inputs` (texts, or tokens once
    tokenized), `size` in samples, whether it is a `text` request, the `outputs` to return, the
    `task_options` of its text interface (top_k, dimensions, ...) and, once tokenized, its
    texts' `encoded` form (offsets for post-processing)."""

    inputs: Mapping[str, Any]
    size: int
    text: bool
    outputs: list[str]
    task_options: Any = None
    encoded: Any = None


@dataclass
class Usage:
    """What a request cost, for the HTTP APIs' `usage`: `prompt_tokens`, the tokens the engine
    reads for the request's texts (the pipeline's tokenization, after truncation, special tokens
    included, padding not); left at 0 for a request of tokens. Counted from the one tokenization
    the request's batch runs on, so the count costs no second pass over the texts."""

    prompt_tokens: int = 0


def decode(request: pb.ModelInferRequest, model: Model, options: codec.RequestOptions) -> Prepared:
    """Decode and validate `request` for `model`, its task options included. Raises
    `InvalidArgument`."""
    inputs = codec.decode_inputs(request, model, truncate=options.truncate)
    text = model.text_input is not None and model.text_input in inputs
    size = model.check_text(inputs) if text else model.check_inputs(inputs)
    task_options = None
    if model.text is not None:
        try:
            task_options = model.text.check_options(codec.parameter_values(request), text=text)
        except ValueError as exc:
            raise InvalidArgument(f"model '{model.name}': {exc}") from None
    return Prepared(inputs, size, text, codec.requested_outputs(request, model, text=text), task_options)


def token_count(feeds: Mapping[str, Any]) -> int:
    """Tokens in tokenized texts: their attention mask's ones (every id, without a mask)."""
    mask = feeds.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(feeds["input_ids"].size)


def answer_text(model: Model, outputs: Mapping[str, Any], prepared: Prepared, timings: Timings) -> Mapping[str, Any]:
    """The outputs a text request asked for, made by its task's post-processing from the
    engine's outputs (on the event loop: see `server.text`); counted as compute output, as
    Triton counts a backend's output processing."""
    assert model.text is not None
    started = time.perf_counter_ns()
    answer = model.text.postprocess(outputs, prepared.encoded, prepared.task_options, prepared.outputs)
    timings.compute_output_ns += time.perf_counter_ns() - started
    return answer


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, (Rejected, DeadlineExceeded)):
        return REJECTED
    if isinstance(exc, Internal):
        return BACKEND
    return OTHER
