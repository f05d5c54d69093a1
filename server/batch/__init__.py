"""Offline batch inference over Ray Data: a table of texts in, one row of engine outputs per
input row out, on as many machines as the Ray cluster has.

    python -m server.batch ENGINE_DIR --input PATH --output DIR [--text-column text] [--id-column id]
        [--address ADDR] [--actors N] [--cpus-per-actor C] [--gpus-per-actor G] [--batch-size ROWS]
        [--outputs NAME ...] [--overwrite]

or, in a pipeline of one's own, `embed_dataset(ds, engine_dir, ...)` → a Ray Dataset.

The input is cut into blocks of at most 16 batches (`BATCHES_PER_TASK`), each one actor task
and one output file. Each actor of a fixed pool (Ray Data's `ActorPoolStrategy`) loads the
engine once and takes batches of rows: it tokenizes their texts with the engine's own
pipeline, sorts them by length so each engine call pads as little as possible, runs the engine
in chunks of its maximum batch and hands back the id column and the requested outputs, row for
row. Reading, tokenizing, running and writing stream through the cluster together; nothing
holds the whole table.

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

Its parts: `engine` (what each actor holds: the engine and the batches it runs), `job` (the
Ray Data pipeline: reading the input, the actor pool), `output` (the output directory: part
files, the run's identity, resuming, deduplicating) and `cli` (`python -m server.batch`).
"""

from __future__ import annotations

from server.batch.cli import FREE_CPUS, Summary, main, parse_args, run
from server.batch.engine import BatchError, EngineBatches, OutputColumn, output_columns
from server.batch.job import BATCHES_PER_TASK, DEFAULT_BATCH_SIZE, INPUT_FORMATS, embed_dataset, read_input
from server.batch.output import (
    PART_PREFIX,
    PART_SUFFIX,
    RUN_FILE,
    PartFiles,
    deduplicate,
    ids_digest,
    part_files,
    part_files_sink,
    prepare_output,
    run_identity,
)

__all__ = [
    "BATCHES_PER_TASK", "DEFAULT_BATCH_SIZE", "FREE_CPUS", "INPUT_FORMATS", "PART_PREFIX", "PART_SUFFIX", "RUN_FILE",
    "BatchError", "EngineBatches", "OutputColumn", "PartFiles", "Summary", "deduplicate", "embed_dataset", "ids_digest",
    "main", "output_columns", "parse_args", "part_files", "part_files_sink", "prepare_output", "read_input", "run",
    "run_identity",
]
