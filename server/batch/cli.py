"""`python -m server.batch ENGINE_DIR --input PATH --output DIR ...`: one batch job on the Ray
it starts or joins, resumed where a crashed run stopped; one line and exit 1 when it cannot
run as asked."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from optimize import runtime
from optimize.runtime.errors import OptimizeError
from server.batch.engine import BatchError, output_columns
from server.batch.job import DEFAULT_BATCH_SIZE, INPUT_FORMATS, IO_TASK_CPUS, drop_done, embed_dataset, read_input
from server.batch.output import deduplicate, part_files_sink, prepare_output, run_identity

log = logging.getLogger("server.batch")

_RAY_MISSING = "server.batch needs Ray Data: pip install 'kiln[ray]'"
FREE_CPUS = 1.0


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
    parser.add_argument("--threads-per-actor", type=int,
                        help="CPU threads each actor's engine computes with (default: without --address, this "
                             "machine's CPUs (--num-cpus) shared among the actors; with it, --cpus-per-actor "
                             "rounded, at least 1)")
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
        ds = ds.map_batches(drop_done, fn_kwargs={"column": args.id_column, "done": done}, batch_format="pyarrow",
                            num_cpus=IO_TASK_CPUS)
    threads = threads_per_actor(args)
    outputs = embed_dataset(ds, engine_dir, text_column=args.text_column, id_column=args.id_column,
                            outputs=[c.name for c in columns], actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                            gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size,
                            threads_per_actor=threads)
    log.info("engine %s: %s; %d actor(s) x %g CPU%s, %d thread(s) each -> %s", engine_dir, ", ".join(
        f"{c.name}{list(c.shape)} {c.dtype}" for c in columns), args.actors, args.cpus_per_actor,
        f" + {args.gpus_per_actor:g} GPU" if args.gpus_per_actor else "", threads, output)
    started = time.perf_counter()
    sink = part_files_sink(output, args.id_column)
    outputs.write_datasink(sink, ray_remote_args={"num_cpus": IO_TASK_CPUS})
    seconds = time.perf_counter() - started
    # counted from the files, which a task run twice cannot inflate
    total, duplicates = deduplicate(output, args.id_column)
    return Summary(written=total - len(done), resumed=len(done), total=total, duplicates=duplicates, seconds=seconds)


def threads_per_actor(args: argparse.Namespace) -> int:
    """`--threads-per-actor`, or by default each actor's share of the cores: engines size their
    thread pools to every core of the machine, so two actors on one machine would each run as
    many threads as it has cores and slow each other down."""
    if args.threads_per_actor is not None:
        return args.threads_per_actor
    if args.address:
        return max(1, round(args.cpus_per_actor))
    return max(1, (args.num_cpus or os.cpu_count() or 1) // args.actors)


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
