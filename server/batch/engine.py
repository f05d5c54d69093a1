"""The engine side of a batch job: what each Ray Data actor holds (`EngineBatches`: one loaded
engine, texts in, one row of outputs per text out), the outputs a job may write, and
`BatchError`, the one error of every part of a job."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from optimize import runtime
from optimize.runtime.specs import Dim


class BatchError(ValueError):
    """A batch job that cannot run as asked (engine, columns, paths); the message says why."""


@dataclass(frozen=True)
class OutputColumn:
    """One engine output written per row: its name, numpy dtype and per-row shape (() or (d,))."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


def output_columns(engine: runtime.Engine, names: Sequence[str] | None = None) -> list[OutputColumn]:
    """The outputs a batch job writes: `names`, or the pipeline's answer (e.g.
    `sentence_embedding`). Raises `BatchError` when the engine has no single-text pipeline, does
    not batch, or an output is not one fixed-size value or vector per row (token-level outputs
    such as `last_hidden_state` vary in length and are not written)."""
    pipeline = engine.pipeline
    if pipeline is None:
        raise BatchError(f"engine '{engine.name}' has no text pipeline: batch jobs feed it texts "
                         "(compile it from a model directory with a tokenizer)")
    if getattr(pipeline, "pair", False):
        raise BatchError(f"engine '{engine.name}' scores text pairs; batch jobs feed one text per row")
    if engine.max_batch_size < 1:
        raise BatchError(f"engine '{engine.name}' has no batch dimension")
    specs = {s.name: s for s in engine.outputs}
    wanted = list(names) if names else [pipeline.output]
    columns = []
    for name in wanted:
        if name not in specs:
            raise BatchError(f"engine '{engine.name}' has no output {name!r}; it has {', '.join(sorted(specs))}")
        rest = specs[name].shape[1:]
        if len(rest) > 1 or any(isinstance(d, Dim) for d in rest):
            raise BatchError(f"output {name!r} has per-row shape {[getattr(d, 'name', d) for d in rest]}: only "
                             "one value or one fixed-size vector per row can be written")
        columns.append(OutputColumn(name, np.dtype(specs[name].dtype), tuple(int(d) for d in rest)))
    return columns


class EngineBatches:
    """The callable class each Ray Data actor holds (`map_batches(EngineBatches, ...)`): one
    loaded engine; a pyarrow Table holding `id_column` and `text_column` in, a Table with the id
    and one column per output out, row for row in the same order. Usable without Ray too.

    Raises `BatchError` for a row without text (naming its id). `threads`: the CPU threads the
    engine computes with (`optimize.runtime.load`); None: the engine's own choice."""

    def __init__(self, engine_dir: str | os.PathLike[str], *, text_column: str = "text", id_column: str = "id",
                 outputs: Sequence[str] | None = None, threads: int | None = None) -> None:
        self.engine = runtime.load(engine_dir, threads=threads)
        self.columns = output_columns(self.engine, outputs)
        self.pipeline = self.engine.pipeline
        self.text_column, self.id_column = text_column, id_column
        self.max_batch = self.engine.max_batch_size
        seq = self.engine.inputs[0].shape[1] if len(self.engine.inputs[0].shape) > 1 else None
        self.min_seq = seq.min if isinstance(seq, Dim) else 1

    def __call__(self, batch: Any) -> Any:
        # why: optional (kiln[ray])
        import pyarrow as pa

        texts = batch.column(self.text_column).to_pylist()
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                row_id = batch.column(self.id_column)[i].as_py()
                raise BatchError(f"row {self.id_column}={row_id!r}: {self.text_column!r} is {text!r}, not a text")
        results = self.run_texts(texts) if texts else {c.name: np.empty((0, *c.shape), c.dtype) for c in self.columns}
        arrays = [batch.column(self.id_column)] + [_arrow_column(results[c.name], c) for c in self.columns]
        return pa.Table.from_arrays(arrays, names=[self.id_column] + [c.name for c in self.columns])

    def run_texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The requested outputs for `texts`, [len(texts), ...] each, in the texts' order.

        The texts are tokenized together, sorted by token count and run in chunks of the engine's
        maximum batch, each cut to its own longest text: a batch of mixed lengths costs about
        what the same texts cost grouped by length."""
        tokens = self.pipeline.tokenize(list(texts))
        lengths = tokens["attention_mask"].sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        results = {c.name: np.empty((len(texts), *c.shape), dtype=c.dtype) for c in self.columns}
        for start in range(0, len(texts), self.max_batch):
            rows = order[start:start + self.max_batch]
            width = max(int(lengths[rows].max()), self.min_seq)
            feeds = {name: _cut(array[rows], width, self.pipeline.pad_id if name == "input_ids" else 0)
                     for name, array in tokens.items()}
            if int(feeds["attention_mask"].sum()) != int(lengths[rows].sum()):
                # a tokenizer that pads on the left: tokenize this chunk on its own instead
                feeds = self.pipeline.tokenize([texts[i] for i in rows])
            outputs = self.engine.run(feeds)
            for column in self.columns:
                results[column.name][rows] = outputs[column.name]
        return results


def _cut(array: np.ndarray, width: int, pad: int) -> np.ndarray:
    """`array` ([rows, tokens]) cut or padded (with `pad`) to `width` tokens."""
    if array.shape[1] >= width:
        return np.ascontiguousarray(array[:, :width])
    return np.pad(array, ((0, 0), (0, width - array.shape[1])), constant_values=pad)


def _arrow_column(values: np.ndarray, column: OutputColumn) -> Any:
    """A per-row scalar column, or a fixed-size list column for vectors (a plain Arrow type that
    pandas, DuckDB and Spark read without Ray's tensor extension)."""
    # why: optional (kiln[ray])
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, column.shape[0]) if column.shape else flat
