"""Offline batch inference over Ray Data: a table of texts in, one row of engine outputs per
input row out, on as many machines as the Ray cluster has.

    python -m server.batch ENGINE_DIR --input PATH --output DIR [--text-column text] [--id-column id]
        [--address ADDR] [--actors N] [--cpus-per-actor C] [--gpus-per-actor G] [--batch-size ROWS]
        [--outputs NAME ...] [--overwrite]

or, in a pipeline of one's own, `embed_dataset(ds, engine_dir, ...)` → a Ray Dataset.

Each actor of a fixed pool (Ray Data's `ActorPoolStrategy`) loads the engine once and takes
batches of rows: it tokenizes their texts with the engine's own pipeline, sorts them by length
so each engine call pads as little as possible, runs the engine in chunks of its maximum batch
and hands back the id column and the requested outputs, row for row. Reading, tokenizing,
running and writing stream through the cluster together; nothing holds the whole table.

**Exactly one output row per input id**, also across crashes:
- a worker that dies mid-run (killed, out of memory) is restarted by Ray Data and its batch is
  run again (actors: `max_restarts=-1`, `max_task_retries=-1`, Ray Data's defaults);
- each written file holds one block of rows and is named by a digest of its ids, written to a
  temporary name and renamed into place: a write task that runs twice writes the same file
  twice, never two files, and a file is either whole or absent;
- a run that crashed (the driver killed, the cluster lost) is resumed by running the same
  command again: the ids already in DIR are skipped, the rest are computed. DIR records which
  engine, outputs and columns it holds (`_kiln_batch.json`), so a resumed run cannot mix in
  another engine's outputs (`--overwrite` starts afresh);
- when the run ends, the ids in DIR are checked: any id found twice (possible only if Ray
  recomputed a block with different boundaries after a node was lost) keeps one row.

The engine directory and the output directory must be reachable at the same path from every
node (a shared file system) when the cluster has more than one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optimize import runtime
from optimize.runtime.errors import OptimizeError
from optimize.runtime.specs import Dim

log = logging.getLogger("server.batch")

# What the output directory holds besides its part files: the run's identity, so a resumed run
# can tell whether the rows already there are the same engine's.
RUN_FILE = "_kiln_batch.json"
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"
_TMP_SUFFIX = ".tmp"
# Rows per batch handed to an actor. Larger batches sort more texts by length (less padding per
# engine call) but hold more memory per actor; 256 MiniLM-sized rows take about 1 MB.
DEFAULT_BATCH_SIZE = 256
INPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json",
                 ".csv": "csv"}
_RAY_MISSING = "server.batch needs Ray Data: pip install 'kiln[ray]'"
# Logical CPUs of the read and write tasks: reading and writing Parquet/JSON are light next to
# inference, and the actors reserve the CPUs (cpus_per_actor each). Ray Data still runs a few
# tasks of 1 CPU of its own (listing a directory's files), so the actors must leave one CPU of
# the cluster free: --actors 2 on a 2-CPU Ray waited forever for a CPU to list the input with.
IO_TASK_CPUS = 0
FREE_CPUS = 1.0


class BatchError(ValueError):
    """A batch job that cannot run as asked (engine, columns, paths); the message says why."""


# -- the engine side: what each actor holds -------------------------------------------------------

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

    Raises `BatchError` for a row without text (naming its id)."""

    def __init__(self, engine_dir: str | os.PathLike[str], *, text_column: str = "text", id_column: str = "id",
                 outputs: Sequence[str] | None = None) -> None:
        self.engine = runtime.load(engine_dir)
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


# -- the Ray Data pipeline --------------------------------------------------------------------------

def embed_dataset(ds: Any, engine_dir: str | os.PathLike[str], *, text_column: str = "text", id_column: str = "id",
                  outputs: Sequence[str] | None = None, actors: int = 1, cpus_per_actor: float = 1.0,
                  gpus_per_actor: float = 0.0, batch_size: int = DEFAULT_BATCH_SIZE) -> Any:
    """A Ray Dataset of `id_column` and the engine's outputs (default: its pipeline's, e.g.
    `sentence_embedding` as a fixed-size list of float32) for every row of `ds`, computed by a
    pool of `actors` actors that each hold the engine loaded from `engine_dir` (a path every node
    can read) and reserve `cpus_per_actor` CPUs and `gpus_per_actor` GPUs. Lazy, like every Ray
    Dataset: nothing runs until it is consumed or written.

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
    if actors < 1 or batch_size < 1:
        raise BatchError(f"actors and batch_size must be at least 1, got {actors} and {batch_size}")
    return ds.select_columns([id_column, text_column]).map_batches(
        EngineBatches,
        fn_constructor_kwargs={"engine_dir": str(engine_dir), "text_column": text_column, "id_column": id_column,
                               "outputs": [c.name for c in columns]},
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
    kind = input_format or _format_of(source)
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


def _format_of(source: Path) -> str:
    files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()
                                               and not p.name.startswith((".", "_"))]
    kinds = {INPUT_FORMATS.get(p.suffix.lower()) for p in files}
    if len(kinds) != 1 or None in kinds:
        suffixes = sorted({p.suffix or p.name for p in files})
        raise BatchError(f"cannot tell the format of {source} (files: {', '.join(suffixes) or 'none'}): expected "
                         f"{', '.join(sorted(INPUT_FORMATS))}, all of one kind (or say --input-format)")
    return kinds.pop()


def _drop_done(batch: Any, column: str, done: Any) -> Any:
    """The rows of `batch` whose id is not in `done` (ids a previous run already wrote)."""
    # why: optional (kiln[ray])
    import pyarrow.compute as pc

    ids = batch.column(column)
    return batch.filter(pc.invert(pc.is_in(ids, value_set=done.cast(ids.type))))


# -- the output directory ---------------------------------------------------------------------------

def _datasink_base() -> type:
    # why: optional (kiln[ray])
    from ray.data import Datasink

    return Datasink


class PartFiles:
    """Ray Data datasink writing each write task's rows to one Parquet file named by a digest
    of its ids (`part-<digest>.parquet`), through a temporary name and a rename: a task run
    twice writes the same file, and a file is whole or absent. Made by `part_files_sink`."""

    def __init__(self, directory: Path, id_column: str) -> None:
        self.directory = directory
        self.id_column = id_column

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
        # why: optional (kiln[ray])
        import pyarrow as pa
        import pyarrow.parquet as pq
        from ray.data.block import BlockAccessor

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"file": None, "rows": 0}
        table = pa.concat_tables(tables)
        name = f"{PART_PREFIX}{ids_digest(table.column(self.id_column))}{PART_SUFFIX}"
        tmp = self.directory / f".{name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
        pq.write_table(table, tmp)
        os.replace(tmp, self.directory / name)
        return {"file": name, "rows": table.num_rows}


def part_files_sink(directory: Path, id_column: str) -> Any:
    """A `PartFiles` that is a `ray.data.Datasink` (Ray is imported only when one is made)."""
    sink_class = type("KilnPartFilesDatasink", (PartFiles, _datasink_base()), {})
    return sink_class(directory, id_column)


def ids_digest(ids: Any) -> str:
    """A digest of a column of ids, the same for the same ids in the same order."""
    digest = hashlib.blake2b(digest_size=12)
    for value in ids.to_pylist():
        digest.update(repr(value).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def part_files(directory: Path) -> list[Path]:
    """The complete part files in `directory`, in name order."""
    return sorted(p for p in directory.glob(f"{PART_PREFIX}*{PART_SUFFIX}") if p.is_file())


def run_identity(engine: runtime.Engine, columns: Sequence[OutputColumn], id_column: str,
                 text_column: str) -> dict[str, Any]:
    """What an output directory's rows are: the engine (as `Engine.describe` tells it), the
    outputs and the columns. A resumed run must match it."""
    return {"engine": engine.describe(), "outputs": [c.name for c in columns], "id_column": id_column,
            "text_column": text_column}


def prepare_output(directory: Path, identity: dict[str, Any], id_column: str, overwrite: bool) -> Any:
    """Make `directory` ready for a run and return the ids it already holds (a pyarrow array,
    possibly empty): remove temporary files a crashed run left; with `overwrite`, remove every
    part file too; refuse (`BatchError`) a directory holding another engine's or another
    configuration's rows, or files this tool did not write."""
    # why: optional (kiln[ray])
    import pyarrow as pa
    import pyarrow.dataset as pads

    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(f".{PART_PREFIX}*{_TMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
    run_file = directory / RUN_FILE
    if overwrite:
        for part in part_files(directory):
            part.unlink()
        run_file.unlink(missing_ok=True)
    parts = part_files(directory)
    if run_file.exists():
        recorded = json.loads(run_file.read_text())
        if recorded != identity:
            raise BatchError(f"{directory} holds the rows of another run ({_difference(recorded, identity)}); "
                             "choose another --output, or --overwrite to replace them")
    elif parts or any(p for p in directory.iterdir() if not p.name.startswith(".")):
        raise BatchError(f"{directory} is not empty and was not written by server.batch; choose another --output")
    tmp = directory / f".{RUN_FILE}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
    tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
    os.replace(tmp, run_file)
    if not parts:
        return pa.array([])
    return pads.dataset([str(p) for p in parts], format="parquet").to_table(columns=[id_column]).column(0).combine_chunks()


def _difference(recorded: dict[str, Any], wanted: dict[str, Any]) -> str:
    changed = [key for key in sorted(set(recorded) | set(wanted)) if recorded.get(key) != wanted.get(key)]
    return "different " + ", ".join(changed)


def deduplicate(directory: Path, id_column: str) -> tuple[int, int]:
    """Check that every id of `directory`'s part files appears once; an id found more than once
    keeps its first row in file name order (only the files that lose rows are rewritten).
    Returns (rows kept, duplicate rows removed). Reads the id column of every file."""
    # why: optional (kiln[ray])
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parts = part_files(directory)
    if not parts:
        return 0, 0
    ids = [pq.read_table(part, columns=[id_column]).column(0) for part in parts]
    counts = pc.value_counts(pa.chunked_array([c for i in ids for c in i.chunks], type=ids[0].type))
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    total = sum(len(c) for c in ids)
    if not len(repeated):
        return total, 0
    seen: set[Any] = set()
    removed = 0
    for part, column in zip(parts, ids, strict=True):
        keep = []
        for value, twice in zip(column.to_pylist(), pc.is_in(column, value_set=repeated).to_pylist(), strict=True):
            keep.append(not (twice and value in seen))
            if twice:
                seen.add(value)
        if all(keep):
            continue
        removed += keep.count(False)
        table = pq.read_table(part).filter(pa.array(keep))
        if table.num_rows:
            tmp = directory / f".{part.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
            pq.write_table(table, tmp)
            os.replace(tmp, part)
        else:
            part.unlink()
    return total - removed, removed


# -- the command ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server.batch",
                                     description="Run an engine over a table of texts on Ray Data; write Parquet "
                                                 "with the id column and the outputs, one row per input row.")
    parser.add_argument("engine", type=Path, help="engine directory (holds manifest.json and a text pipeline)")
    parser.add_argument("--input", type=Path, required=True,
                        help="Parquet, JSON Lines or CSV file, or a directory of them")
    parser.add_argument("--output", type=Path, required=True, help="directory for the Parquet part files")
    parser.add_argument("--text-column", default="text", help="column holding the texts (default: text)")
    parser.add_argument("--id-column", default="id", help="column identifying each row, unique (default: id)")
    parser.add_argument("--outputs", nargs="+", metavar="NAME",
                        help="engine outputs to write (default: the pipeline's, e.g. sentence_embedding)")
    parser.add_argument("--input-format", choices=sorted(set(INPUT_FORMATS.values())),
                        help="format of --input (default: from the file names)")
    parser.add_argument("--address", help="Ray cluster to join (e.g. auto, or HOST:PORT of its head); default: "
                                          "start a Ray on this machine for the job")
    parser.add_argument("--num-cpus", type=int, help="without --address: CPUs the local Ray may use (default: all)")
    parser.add_argument("--actors", type=int, default=1, help="actors, each holding one engine (default: 1)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs each actor reserves (default: 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs each actor reserves (default: 0)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"rows handed to an actor at a time (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --output holds instead of resuming it")
    return parser.parse_args(argv)


@dataclass
class Summary:
    """What a run did: rows written now, rows already there, duplicates dropped, seconds."""

    written: int
    resumed: int
    total: int
    duplicates: int
    seconds: float

    def line(self, directory: Path) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        text = (f"wrote {self.written} row(s) in {self.seconds:.1f} s ({rate:.0f} rows/s); {directory} holds "
                f"{self.total} row(s), one per id")
        if self.resumed:
            text += f" ({self.resumed} from an earlier run)"
        if self.duplicates:
            text += f"; {self.duplicates} duplicate id row(s) dropped"
        return text


def run(args: argparse.Namespace) -> Summary:
    """Run the job `args` describes on the Ray that is initialized. Raises `BatchError`."""
    engine_dir, output = args.engine.resolve(), args.output.resolve()
    try:
        engine = runtime.load(engine_dir)
    except OptimizeError as exc:
        raise BatchError(f"cannot load engine {engine_dir}: {exc}") from None
    columns = output_columns(engine, args.outputs)
    done = prepare_output(output, run_identity(engine, columns, args.id_column, args.text_column), args.id_column,
                          args.overwrite)
    del engine  # the actors load their own
    _check_room(args.actors, args.cpus_per_actor, joined=bool(args.address))
    ds = read_input(args.input, args.input_format)
    if len(done):
        log.info("resuming: %d id(s) already in %s are skipped", len(done), output)
        ds = ds.map_batches(_drop_done, fn_kwargs={"column": args.id_column, "done": done}, batch_format="pyarrow",
                            num_cpus=IO_TASK_CPUS)
    outputs = embed_dataset(ds, engine_dir, text_column=args.text_column, id_column=args.id_column,
                            outputs=[c.name for c in columns], actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                            gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size)
    log.info("engine %s: %s; %d actor(s) x %g CPU%s -> %s", engine_dir, ", ".join(
        f"{c.name}{list(c.shape)} {c.dtype}" for c in columns), args.actors, args.cpus_per_actor,
        f" + {args.gpus_per_actor:g} GPU" if args.gpus_per_actor else "", output)
    started = time.perf_counter()
    sink = part_files_sink(output, args.id_column)
    outputs.write_datasink(sink, ray_remote_args={"num_cpus": IO_TASK_CPUS})
    seconds = time.perf_counter() - started
    # counted from the files, which a task run twice cannot inflate
    total, duplicates = deduplicate(output, args.id_column)
    return Summary(written=total - len(done), resumed=len(done), total=total, duplicates=duplicates, seconds=seconds)


def _check_room(actors: int, cpus_per_actor: float, joined: bool) -> None:
    """Refuse a pool that would leave Ray Data no CPU for its own tasks (the job would wait
    forever); on a joined cluster only warn, since an autoscaling one adds nodes."""
    # why: optional (kiln[ray])
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    if actors * cpus_per_actor <= total - FREE_CPUS:
        return
    fitting = max(total - FREE_CPUS, 0.0) / actors
    message = (f"{actors} actor(s) x {cpus_per_actor:g} CPU leave less than {FREE_CPUS:g} of this Ray's {total:g} "
               f"CPUs for reading and writing; use --cpus-per-actor {fitting:.2g} or fewer --actors "
               "(the engines use the cores they find either way)")
    if not joined or total <= FREE_CPUS:
        raise BatchError(message)
    log.warning("%s, unless the cluster adds nodes", message)


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 when every input row has its output row in DIR, 1 on a failure (with one
    line saying why), 2 for bad options."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        # why: optional (kiln[ray])
        import ray
    except ImportError:
        print(f"python -m server.batch: error: {_RAY_MISSING}", file=sys.stderr)
        return 1
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        summary = run(args)
    except Exception as exc:
        reason = _batch_error_in(exc)
        if reason is None:
            raise  # a bug: its traceback is the report
        print(f"python -m server.batch: error: {reason}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    log.info("%s", summary.line(args.output))
    return 0


def _batch_error_in(exc: BaseException) -> BatchError | None:
    """The `BatchError` behind `exc`: raised here, or in an actor and wrapped by Ray."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, BatchError):
            return current
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
        current = cause if isinstance(cause, BaseException) else (current.__cause__ or current.__context__)
    return None


if __name__ == "__main__":
    sys.exit(main())
