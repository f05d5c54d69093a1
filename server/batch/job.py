"""The Ray Data pipeline of a batch job: the input read as a Dataset, and the outputs computed by
a pool of actors that each hold the engine (`embed_dataset`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optimize import runtime
from optimize.runtime.errors import OptimizeError
from server.batch.engine import BatchError, EngineBatches, output_columns

# Rows per batch handed to an actor. Larger batches sort more texts by length (less padding per
# engine call) but hold more memory per actor; 256 MiniLM-sized rows take about 1 MB.
DEFAULT_BATCH_SIZE = 256
# Batches per actor task: the input is cut into blocks of at most this many batches before the
# actors take it. Ray Data's readers make blocks of a megabyte or more of files, which for short
# texts is tens of thousands of rows: one actor task of minutes, written as one file at its end,
# lost whole when its worker dies, and a second actor idle while the first works through it.
# 16 batches of MiniLM on 2 CPUs take about 8 s; Ray's cost per task is milliseconds.
BATCHES_PER_TASK = 16
INPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json",
                 ".csv": "csv"}
# Logical CPUs of the read and write tasks: reading and writing Parquet/JSON are light next to
# inference, and the actors reserve the CPUs (cpus_per_actor each). Ray Data still runs a few
# tasks of 1 CPU of its own (listing a directory's files), so the actors must leave one CPU of
# the cluster free: --actors 2 on a 2-CPU Ray waited forever for a CPU to list the input with.
IO_TASK_CPUS = 0


def embed_dataset(ds: Any, engine_dir: str | os.PathLike[str], *, text_column: str = "text", id_column: str = "id",
                  outputs: Sequence[str] | None = None, actors: int = 1, cpus_per_actor: float = 1.0,
                  gpus_per_actor: float = 0.0, batch_size: int = DEFAULT_BATCH_SIZE,
                  rows_per_task: int | None = None, threads_per_actor: int | None = None) -> Any:
    """A Ray Dataset of `id_column` and the engine's outputs (default: its pipeline's, e.g.
    `sentence_embedding` as a fixed-size list of float32) for every row of `ds`, computed by a
    pool of `actors` actors that each hold the engine loaded from `engine_dir` (a path every node
    can read) and reserve `cpus_per_actor` CPUs and `gpus_per_actor` GPUs; each engine computes
    with `threads_per_actor` CPU threads (None: the engine's own choice, usually every core of
    its machine, so actors sharing a machine should be given their share). The rows reach the
    actors in blocks of at most `rows_per_task` rows (default: `BATCHES_PER_TASK` batches of
    `batch_size`), each one actor task and, written with `part_files_sink`, one output file. Lazy,
    like every Ray Dataset: nothing runs until it is consumed or written.

    Raises `BatchError` when the engine cannot run a batch job or `ds` lacks a column."""
    # why: optional (kiln[ray])
    import ray.data

    engine_dir = Path(engine_dir).resolve()
    try:
        columns = output_columns(runtime.load(engine_dir), outputs)
    except OptimizeError as exc:
        raise BatchError(f"cannot load engine {engine_dir}: {exc}") from None
    missing = [c for c in (id_column, text_column) if c not in ds.columns()]
    if missing:
        raise BatchError(f"the input has no column {missing[0]!r}; it has {', '.join(ds.columns())} "
                         "(choose with --id-column / --text-column)")
    rows_per_task = BATCHES_PER_TASK * batch_size if rows_per_task is None else rows_per_task
    if threads_per_actor is not None and threads_per_actor < 1:
        raise BatchError(f"threads_per_actor must be at least 1, got {threads_per_actor}")
    if actors < 1 or batch_size < 1 or rows_per_task < 1:
        raise BatchError(f"actors, batch_size and rows_per_task must be at least 1, got {actors}, {batch_size} "
                         f"and {rows_per_task}")
    blocks = ds.select_columns([id_column, text_column]).repartition(target_num_rows_per_block=rows_per_task)
    return blocks.map_batches(
        EngineBatches,
        fn_constructor_kwargs={"engine_dir": str(engine_dir), "text_column": text_column, "id_column": id_column,
                               "outputs": [c.name for c in columns], "threads": threads_per_actor},
        batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
    )


def read_input(path: str | os.PathLike[str], input_format: str | None = None) -> Any:
    """A Ray Dataset over a Parquet, JSON Lines or CSV file, or a directory of them (the format
    from the file names unless `input_format` says "parquet", "json" or "csv"). Raises
    `BatchError` when the path does not exist or the format cannot be told."""
    # why: optional (kiln[ray])
    import ray.data

    source = Path(path)
    if not source.exists():
        raise BatchError(f"input {source} does not exist")
    kind = input_format or format_of(source)
    if kind == "parquet":
        return ray.data.read_parquet(str(source), num_cpus=IO_TASK_CPUS)
    if kind == "json":
        return ray.data.read_json(str(source), lines=True, num_cpus=IO_TASK_CPUS,
                                  file_extensions=None if source.is_file() else
                                  [e.lstrip(".") for e, f in INPUT_FORMATS.items() if f == "json"])
    if kind == "csv":
        return ray.data.read_csv(str(source), num_cpus=IO_TASK_CPUS,
                                 file_extensions=None if source.is_file() else ["csv"])
    raise BatchError(f"unknown input format {kind!r}; expected parquet, json or csv")


def format_of(source: Path) -> str:
    """The input format of a file, or of a directory whose files are all of one kind. Raises
    `BatchError` otherwise."""
    files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()
                                               and not p.name.startswith((".", "_"))]
    kinds = {INPUT_FORMATS.get(p.suffix.lower()) for p in files}
    if len(kinds) != 1 or None in kinds:
        suffixes = sorted({p.suffix or p.name for p in files})
        raise BatchError(f"cannot tell the format of {source} (files: {', '.join(suffixes) or 'none'}): expected "
                         f"{', '.join(sorted(INPUT_FORMATS))}, all of one kind (or say --input-format)")
    return kinds.pop()


def drop_done(batch: Any, column: str, done: Any) -> Any:
    """The rows of `batch` whose id is not in `done` (ids a previous run already wrote)."""
    # why: optional (kiln[ray])
    import pyarrow.compute as pc

    ids = batch.column(column)
    return batch.filter(pc.invert(pc.is_in(ids, value_set=done.cast(ids.type))))
