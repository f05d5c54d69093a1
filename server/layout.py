"""Batch layouts: how the tensors of several requests become one engine call and back.

A `Layout` gives each request a batching key (requests with equal keys may share a batch),
`assemble`s a batch's requests into the engine's inputs and `disassemble`s the engine's
outputs into one result per request. Pure numpy; unit-tested without an engine.

- `Concatenate`: requests whose every input has the same dtype and non-batch dims are stacked
  along dim 0 (the foundation's rule). Different sequence lengths wait for their own batch.
- `BucketPadding`: the dynamic non-batch dims (`seq`) are rounded up to a bucket boundary in
  the key, so requests of different lengths in one bucket share a batch; each is zero-padded
  to the longest request of its batch (never beyond the bucket's boundary) and its outputs are
  cut back to its own length. Opt-in per model (`sequence_buckets`), because zero padding is
  only neutral for models that mask it (attention masks): the operator says so.
- `Packed`: for engines that accept packed variable-length batches (`accepts_packed`): every
  length shares one batch, token rows are concatenated without any padding and delimited by
  `cu_seqlens` (see `Packed` for the contract).
- `Unbatched`: models that do not batch run each request as it came.
- `Text`: requests that carried a BYTES `text` input, tokenized by the service before they
  were queued, and queued one text at a time (`split`) so the batcher can group texts of
  similar length; every text shares one key, the batch is padded to its longest text (rounded
  up to a bucket boundary where the model has buckets) and laid out by the model's token
  layout; for an engine that takes packed batches, each text's real tokens are packed as one
  row instead (no padding at all).

A request's parts (`split`, `slices`) run in whichever batches the batcher puts them; `join`
puts their results back together in order.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from optimize.runtime.specs import Dim, TensorSpec

Tensors = dict[str, np.ndarray]
TEXT_KEY = ("text",)


class Layout(Protocol):
    def key(self, inputs: Mapping[str, np.ndarray]) -> Hashable:
        """Requests with equal keys may share a batch."""

    def assemble(self, requests: Sequence[Mapping[str, np.ndarray]]) -> tuple[Tensors, Any]:
        """The engine's inputs for a batch of requests (all with one key), and the plan
        `disassemble` needs."""

    def disassemble(self, outputs: Mapping[str, np.ndarray], plan: Any) -> list[Tensors]:
        """One result per request, in the order they were assembled."""

    def execute(self, engine: Any, inputs: Tensors) -> Tensors:
        """Run the engine on assembled inputs."""


def batch_key(inputs: Mapping[str, np.ndarray]) -> tuple:
    """Key under which requests can be concatenated along dim 0: every input's name, dtype
    and non-batch dims."""
    return tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(inputs.items()))


def concatenate(requests: Sequence[Mapping[str, np.ndarray]]) -> Tensors:
    """One array per input name, the requests' arrays stacked along dim 0 in order. A single
    request's arrays are returned as they are."""
    if len(requests) == 1:
        return dict(requests[0])
    return {name: np.concatenate([r[name] for r in requests], axis=0) for name in requests[0]}


def split(outputs: Mapping[str, np.ndarray], sizes: Sequence[int]) -> list[Tensors]:
    """Cut each output along dim 0 into consecutive parts of `sizes` samples, one dict per
    request. Raises `ValueError` when an output's dim 0 is not the batch's total size."""
    if len(sizes) == 1:
        return [dict(outputs)]
    total = sum(sizes)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ValueError(
                f"output '{name}' has shape {list(array.shape)}, expected dim 0 to be the batch size {total}"
            )
    bounds = np.cumsum(sizes)[:-1]
    parts: list[Tensors] = [{} for _ in sizes]
    for name, array in outputs.items():
        for part, piece in zip(parts, np.split(array, bounds, axis=0), strict=True):
            part[name] = piece
    return parts


def round_up(length: int, buckets: Sequence[int], limit: int | None = None) -> int:
    """`length` rounded up to the first of `buckets` (sorted) that holds it, never past `limit`;
    `length` itself when no bucket holds it."""
    for boundary in buckets:
        if length <= boundary:
            return min(boundary, limit) if limit else boundary
    return length


def token_length(inputs: Mapping[str, np.ndarray]) -> int:
    """Tokens per row of a token request (`input_ids` [rows, seq]); 0 when it has no such input."""
    ids = inputs.get("input_ids")
    return int(ids.shape[1]) if ids is not None and ids.ndim == 2 else 0


def slices(inputs: Mapping[str, np.ndarray], rows_per_part: int) -> list[Tensors]:
    """A request cut along dim 0 into parts of at most `rows_per_part` rows, in order."""
    rows = _rows(inputs)
    if rows <= rows_per_part:
        return [dict(inputs)]
    return [{name: array[start:start + rows_per_part] for name, array in inputs.items()}
            for start in range(0, rows, rows_per_part)]


def join(parts: Sequence[Mapping[str, np.ndarray]]) -> Tensors:
    """The results of a request's parts as one result, rows in order. Parts whose outputs differ
    beyond dim 0 (token outputs, each cut to its own texts' length) are zero-padded to the
    longest, as if they had run in one batch."""
    if len(parts) == 1:
        return dict(parts[0])
    joined: Tensors = {}
    for name in parts[0]:
        arrays = [p[name] for p in parts]
        widest = tuple(max(a.shape[axis] for a in arrays) for axis in range(1, arrays[0].ndim))
        padded = [a if a.shape[1:] == widest else
                  np.pad(a, [(0, 0)] + [(0, w - n) for w, n in zip(widest, a.shape[1:], strict=True)])
                  for a in arrays]
        joined[name] = np.concatenate(padded, axis=0)
    return joined


def _run(engine: Any, inputs: Tensors) -> Tensors:
    return engine.run(inputs)


class Concatenate:
    """Stack requests of identical non-batch shapes along dim 0."""

    def key(self, inputs: Mapping[str, np.ndarray]) -> Hashable:
        return batch_key(inputs)

    def assemble(self, requests: Sequence[Mapping[str, np.ndarray]]) -> tuple[Tensors, list[int]]:
        return concatenate(requests), [_rows(r) for r in requests]

    def disassemble(self, outputs: Mapping[str, np.ndarray], plan: list[int]) -> list[Tensors]:
        return split(outputs, plan)

    execute = staticmethod(_run)


class Unbatched:
    """One request per engine call, shapes untouched (models with max_batch_size 0)."""

    def key(self, inputs: Mapping[str, np.ndarray]) -> Hashable:
        return None

    def assemble(self, requests: Sequence[Mapping[str, np.ndarray]]) -> tuple[Tensors, None]:
        if len(requests) != 1:
            raise ValueError(f"an unbatched model runs one request at a time, got {len(requests)}")
        return dict(requests[0]), None

    def disassemble(self, outputs: Mapping[str, np.ndarray], plan: None) -> list[Tensors]:
        return [dict(outputs)]

    execute = staticmethod(_run)


def _rows(inputs: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(inputs.values())).shape[0])


def dynamic_axes(spec: TensorSpec) -> dict[int, Dim]:
    """The dynamic dims of a batched spec other than the batch dim: axis → Dim."""
    return {axis: d for axis, d in enumerate(spec.shape) if axis > 0 and isinstance(d, Dim)}


@dataclass(frozen=True)
class _Cut:
    """Where a request sits in an assembled batch: its rows and its own size of each padded dim."""

    rows: int
    sizes: dict[str, int]


def _cut_outputs(outputs: Mapping[str, np.ndarray], cuts: Sequence[_Cut],
                 output_axes: Mapping[str, Mapping[int, str]]) -> list[Tensors]:
    """Split outputs by rows, then cut each padded axis back to the request's own size."""
    parts = split(outputs, [c.rows for c in cuts])
    for part, cut in zip(parts, cuts, strict=True):
        for name, array in part.items():
            axes = output_axes.get(name)
            if not axes:
                continue
            index = [slice(None)] * array.ndim
            for axis, dim in axes.items():
                if dim in cut.sizes and axis < array.ndim:
                    index[axis] = slice(0, cut.sizes[dim])
            part[name] = array[tuple(index)]
    return parts


class BucketPadding:
    """Requests of different lengths batched together: those whose dynamic dims fall in the same
    buckets share a key, and each is zero-padded to the longest of its batch — at most the
    bucket's boundary, so a bucket bounds the padding a short request can be charged.

    `buckets` are boundaries (e.g. 16, 32, 64); a dim's boundaries are those within its range
    plus its maximum, so every length the engine accepts has a bucket. Outputs with the same
    named dim (e.g. `last_hidden_state` [batch, seq, 384]) are cut back to each request's own
    length; outputs without it (a pooled embedding) are returned as computed.
    """

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], buckets: Sequence[int]) -> None:
        self.input_axes = {s.name: dynamic_axes(s) for s in inputs}
        dims = {d.name: d for axes in self.input_axes.values() for d in axes.values()}
        self.boundaries = {
            name: sorted({b for b in buckets if d.min <= b < d.max} | {d.max}) for name, d in dims.items()
        }
        self.output_axes = {
            s.name: {axis: d.name for axis, d in dynamic_axes(s).items() if d.name in dims} for s in outputs
        }

    def bucket(self, dim: str, size: int) -> int:
        """The boundary `size` is padded to (the size itself when above every boundary)."""
        for boundary in self.boundaries[dim]:
            if size <= boundary:
                return boundary
        return size

    def _target(self, name: str, array: np.ndarray) -> tuple[int, ...]:
        axes = self.input_axes.get(name, {})
        return tuple(
            self.bucket(axes[axis].name, size) if axis in axes else size
            for axis, size in enumerate(array.shape) if axis > 0
        )

    def key(self, inputs: Mapping[str, np.ndarray]) -> Hashable:
        return tuple((name, a.dtype.str, self._target(name, a)) for name, a in sorted(inputs.items()))

    def assemble(self, requests: Sequence[Mapping[str, np.ndarray]]) -> tuple[Tensors, list[_Cut]]:
        first = requests[0]
        total = sum(_rows(r) for r in requests)
        batch: Tensors = {}
        for name, array in first.items():
            # The longest request per dim (within the shared bucket, so never past its boundary).
            target = tuple(max(r[name].shape[axis] for r in requests) for axis in range(1, array.ndim))
            # One zero-filled buffer per input, each request copied into its corner: padding and
            # concatenation in a single copy.
            buffer = np.zeros((total, *target), dtype=array.dtype)
            row = 0
            for request in requests:
                part = request[name]
                buffer[(slice(row, row + part.shape[0]), *(slice(0, n) for n in part.shape[1:]))] = part
                row += part.shape[0]
            batch[name] = buffer
        return batch, [_Cut(_rows(r), self._sizes(r)) for r in requests]

    def _sizes(self, request: Mapping[str, np.ndarray]) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for name, axes in self.input_axes.items():
            if name in request:
                for axis, dim in axes.items():
                    sizes.setdefault(dim.name, int(request[name].shape[axis]))
        return sizes

    def disassemble(self, outputs: Mapping[str, np.ndarray], plan: list[_Cut]) -> list[Tensors]:
        return _cut_outputs(outputs, plan, self.output_axes)

    execute = staticmethod(_run)


class Packed:
    """Variable-length requests in one batch with no padding, for engines whose
    `accepts_packed` is true.

    Contract with the engine (`engine.run_packed(inputs)`): every input of token layout
    ([batch, seq, ...]) arrives with its rows concatenated along the token axis, shape
    [total_tokens, ...]; `cu_seqlens` (int32 [rows + 1]) holds the accumulated row lengths
    (lengths 3, 4, 5 → [0, 3, 7, 12], Triton's ragged-batch index with a leading 0, the
    FlashAttention convention). Outputs of token layout come back as [total_tokens, ...],
    per-row outputs as [rows, ...]; each request gets its rows back in its own shape.
    """

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.token_inputs = {s.name for s in inputs if s.token_layout}
        self.token_outputs = {s.name for s in outputs if s.token_layout}

    def key(self, inputs: Mapping[str, np.ndarray]) -> Hashable:
        return tuple(
            (name, a.dtype.str, a.shape[2:] if name in self.token_inputs else a.shape[1:])
            for name, a in sorted(inputs.items())
        )

    def assemble(self, requests: Sequence[Mapping[str, np.ndarray]]) -> tuple[Tensors, list[tuple[int, int]]]:
        shapes = [(_rows(r), int(r[next(iter(self.token_inputs))].shape[1])) for r in requests]
        batch: Tensors = {}
        for name in requests[0]:
            parts = [r[name] for r in requests]
            if name in self.token_inputs:
                parts = [p.reshape(p.shape[0] * p.shape[1], *p.shape[2:]) for p in parts]
            batch[name] = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        lengths = [seq for rows, seq in shapes for _ in range(rows)]
        batch["cu_seqlens"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return batch, shapes

    def disassemble(self, outputs: Mapping[str, np.ndarray], plan: list[tuple[int, int]]) -> list[Tensors]:
        parts: list[Tensors] = [{} for _ in plan]
        for name, array in outputs.items():
            token = name in self.token_outputs
            sizes = [rows * seq if token else rows for rows, seq in plan]
            if array.shape[0] != sum(sizes):
                raise ValueError(f"packed output '{name}' has {array.shape[0]} rows, expected {sum(sizes)}")
            for part, piece, (rows, seq) in zip(parts, np.split(array, np.cumsum(sizes)[:-1]), plan, strict=True):
                part[name] = piece.reshape(rows, seq, *array.shape[1:]) if token else piece
        return parts

    @staticmethod
    def execute(engine: Any, inputs: Tensors) -> Tensors:
        return engine.run_packed(inputs)


class Text:
    """Requests of texts, tokenized before they were queued: `{"input_ids", "attention_mask"}`
    of [n, longest of the request], as the engine pipeline's `tokenize` returns them.

    Texts of any length share a batch (one key): the batch's requests are padded to its longest
    text (`pad_id` in `input_ids`, 0 elsewhere, so the attention mask hides the padding), rounded
    up to the first of `buckets` that holds it (never past `max_length`), and laid out by
    `inner` (the model's token layout) as one request. Each request gets its rows back, with
    token-axis outputs cut to its own longest text. With a `Packed` inner (an engine that
    takes packed batches) nothing is padded: each text's real tokens are one packed row, and
    each request's token-axis outputs come back zero-padded to its own longest text, as an
    engine that computes real tokens only gives them padded.
    """

    def __init__(self, inner: Layout, outputs: Sequence[TensorSpec], pad_id: int = 0, buckets: Sequence[int] = (),
                 max_length: int | None = None) -> None:
        self.inner = inner
        self.pad_id = pad_id
        self.buckets = tuple(sorted(buckets))
        self.max_length = max_length
        self.output_axes = {s.name: {1: s.shape[1].name} for s in outputs if s.token_layout}

    def key(self, inputs: Mapping[str, np.ndarray]) -> Hashable:
        return TEXT_KEY

    def padded_length(self, length: int) -> int:
        """The token length a batch whose longest text has `length` tokens is padded to."""
        return round_up(length, self.buckets, self.max_length)

    def split(self, inputs: Mapping[str, np.ndarray], max_batch_tokens: int = 0,
              by_text: bool = True) -> list[tuple[Tensors, int, int]]:
        """A tokenized text request as parts `(inputs, rows, padded tokens per row)` for the
        batcher to group by length: `by_text`, one per text, each cut to its own tokens (for
        requests whose answer reads no token-axis output: pooled embeddings, labels, pair
        scores; such outputs of a text are cut to its own length, and `join` zero-pads them).
        Otherwise the request stays one padded block, as its answer reads every position the
        engine computed, or is cut into slices of rows within `max_batch_tokens`."""
        rows = _rows(inputs)
        width = int(inputs["input_ids"].shape[1])
        if not by_text:
            per_part = max(1, max_batch_tokens // self.padded_length(width)) if max_batch_tokens else rows
            return [(part, _rows(part), self.padded_length(width)) for part in slices(inputs, per_part)]
        mask = inputs.get("attention_mask")
        lengths = mask.sum(axis=1).tolist() if mask is not None else [width] * rows
        return [({name: array[row:row + 1, :int(length)] for name, array in inputs.items()}, 1,
                 self.padded_length(int(length))) for row, length in enumerate(lengths)]

    def assemble(self, requests: Sequence[Mapping[str, np.ndarray]]) -> tuple[Tensors, Any]:
        if isinstance(self.inner, Packed):
            return self._assemble_packed(requests)
        longest = self.padded_length(max(int(r["input_ids"].shape[1]) for r in requests))
        total = sum(_rows(r) for r in requests)
        tokens: Tensors = {}
        for name, first in requests[0].items():
            buffer = np.full((total, longest), self.pad_id if name == "input_ids" else 0, dtype=first.dtype)
            row = 0
            for request in requests:
                part = request[name]
                buffer[row:row + part.shape[0], :part.shape[1]] = part
                row += part.shape[0]
            tokens[name] = buffer
        cuts = [_Cut(_rows(r), {dim: _longest_text(r) for axes in self.output_axes.values() for dim in axes.values()})
                for r in requests]
        inputs, inner_plan = self.inner.assemble([tokens])
        return inputs, (inner_plan, cuts)

    def _assemble_packed(self, requests: Sequence[Mapping[str, np.ndarray]]) -> tuple[Tensors, _PackedTexts]:
        """For an engine that takes packed batches: every text its own row of its real tokens,
        back to back (no padding, no bucket), so the engine runs the batch as it comes."""
        texts: list[Tensors] = []
        counts: list[int] = []
        for request in requests:
            lengths = _text_lengths(request)
            counts.append(len(lengths))
            texts += [{name: array[row:row + 1, :n] for name, array in request.items()}
                      for row, n in enumerate(lengths)]
        inputs, inner_plan = self.inner.assemble(texts)
        return inputs, _PackedTexts(inner_plan, counts)

    def disassemble(self, outputs: Mapping[str, np.ndarray], plan: Any) -> list[Tensors]:
        if isinstance(plan, _PackedTexts):  # each request's texts joined, token outputs zero-padded
            texts = self.inner.disassemble(outputs, plan.inner)
            bounds = np.cumsum([0, *plan.counts])
            return [join(texts[start:end]) for start, end in itertools.pairwise(bounds)]
        inner_plan, cuts = plan
        (whole,) = self.inner.disassemble(outputs, inner_plan)
        return _cut_outputs(whole, cuts, self.output_axes)

    def execute(self, engine: Any, inputs: Tensors) -> Tensors:
        return self.inner.execute(engine, inputs)


@dataclass(frozen=True)
class _PackedTexts:
    """How `Text` packed a batch: the inner `Packed` plan (one row per text) and each request's
    number of texts."""

    inner: Any
    counts: list[int]


def _text_lengths(tokens: Mapping[str, np.ndarray]) -> list[int]:
    """Real tokens of each text of one request (right-padded, as the pipeline tokenizes)."""
    if "attention_mask" in tokens:
        return [int(n) for n in tokens["attention_mask"].sum(axis=1)]
    return [int(tokens["input_ids"].shape[1])] * _rows(tokens)


def _longest_text(tokens: Mapping[str, np.ndarray]) -> int:
    """Tokens in the longest text of one request (its mask's longest row)."""
    if "attention_mask" in tokens:
        return int(tokens["attention_mask"].sum(axis=1).max())
    return int(tokens["input_ids"].shape[1])
