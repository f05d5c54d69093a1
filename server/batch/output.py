"""A batch job's output directory: Parquet part files named by a digest of their ids (written
whole or not at all), the run's identity (so a resumed run cannot mix in another engine's
rows), and the check that every id has one row."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from optimize import runtime
from server.batch.engine import BatchError, OutputColumn

# What the output directory holds besides its part files: the run's identity, so a resumed run
# can tell whether the rows already there are the same engine's.
RUN_FILE = "_kiln_batch.json"
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"
_TMP_SUFFIX = ".tmp"


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
