"""Timing engines against one another on this machine: the measurement behind `--backend auto`.

Engines are timed to be compared, on a machine that may be busy with other work (a shared
2-core box often is). Other processes only ever add time to a run, and they come and go in
spells of seconds, so the method is built to let a spell fall on every engine alike and to
keep the runs it did not touch:

1. **One worker process per engine**, all started, loaded and warmed up before any timing
   (`python -m optimize.timing worker ENGINE --shape BxS ...`): engines' thread pools never
   share a process, and each engine is loaded once however many rounds there are (so the
   candidates must fit in memory together).
2. **Short rounds in rotating order**: `ROUNDS` rounds of `RUNS_PER_ROUND` runs per engine and
   shape; round r starts at engine r (A B C, B C A, C A B, ...), so each engine is measured
   early, late and in between, spread over the whole timing window instead of in one block.
3. **An engine's time is its fastest run per shape** (the geometric mean over shapes when there
   are several): interference cannot make a run faster, so the minimum is the estimate least
   moved by other processes. The median of all runs is kept beside it.
4. **CPU time bounds it**: each run's process CPU time (all threads) is recorded too. On a
   machine without a CUDA GPU every engine computes on the CPU and keeps at least one core
   busy throughout a run, so alone it would take no longer than the CPU time a run needs:
   the time is the fastest run or the least CPU time of a run, whichever is shorter. This is
   what holds the ranking when the machine stays busy all along: an engine whose threads wait
   on each other (OpenVINO, ONNX Runtime) can run 7x slower beside a spinning process while a
   single-threaded one barely slows down, but the CPU time each needs hardly moves. An engine
   that uses k cores alone is then credited at most k times its time, so on a busy machine a
   lead smaller than that can still flip, and the verdict says "unsure".
5. **The machine's load**: its CPU use (`/proc/stat`) is read around every batch of runs; what
   the worker did not use was used by other processes. When they used more than
   `BUSY_FRACTION` of the machine the result says "machine busy".
6. **How sure**: the rounds are split in two halves (even and odd rounds), each timed like the
   whole; an engine's spread is how much slower its slower half came out than its time. The
   fastest engine is "sure" when even its slower half beats the runner-up's time by more than
   `MIN_MARGIN`, i.e. its margin exceeds its own run-to-run spread, and, where the time of
   either of the two is its CPU time, when it leads by more than the number of CPUs. When it
   is unsure, the two fastest get `EXTRA_ROUNDS` more rounds (more chances to be timed outside
   a busy spell) and are judged again; "unsure" then means the two are about as fast, or the
   machine too busy to tell.

`time_engines(paths, shapes)` is the whole method; `--backend auto` (`optimize.auto`) calls it
and records its `Timings` in the manifest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optimize.runtime.errors import OptimizeError
from optimize.runtime.loading import load
from optimize.runtime.specs import torch_dtype

TIMING_WARMUP = 3  # runs per shape before any timing: first runs allocate, compile kernels, fill caches
ROUNDS = 8
RUNS_PER_ROUND = 3
# When the choice is unsure after ROUNDS, the two fastest engines get this many more rounds:
# more chances for each to be timed outside a busy spell.
EXTRA_ROUNDS = 8
# Other processes using more than this share of all CPUs while timing make the machine "busy".
BUSY_FRACTION = 0.25
# The winner is "sure" when its slower half of the rounds still beats the runner-up by this much.
MIN_MARGIN = 0.03
# Pause before each batch of runs, so the previous worker's thread pool stops spinning first.
SETTLE_S = 0.005
WORKER_TIMEOUT_S = 600  # one answer of a worker (loading, or one batch of runs)


def parse_shape(text: str) -> tuple[int, int]:
    """"8x128" -> (8, 128); raises ValueError for anything else."""
    batch, seq = (int(v) for v in text.lower().split("x"))
    return batch, seq


def shape_key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


@dataclass
class Batch:
    """One batch of runs of one engine at one shape, and what the machine did meanwhile."""

    engine: str
    shape: str
    round: int
    wall_ms: list[float]
    cpu_ms: list[float]
    others_cpu: float | None  # share of all CPUs other processes used during the batch (0..1)


@dataclass
class EngineTimes:
    """One engine's result: `time_ms` ranks engines (per shape the fastest run, or the least CPU
    time of a run where that is shorter and the bound applies; geometric mean over shapes);
    `cpu_bound` lists the shapes where the CPU time was the shorter; `median_ms` is the median
    run (same aggregation); `spread` is how much slower the slower half of the rounds (even or
    odd, timed the same way) came out, relative to `time_ms`."""

    time_ms: float
    median_ms: float
    spread: float
    times_ms: dict[str, float]
    medians_ms: dict[str, float]
    cpu_ms: dict[str, float]  # median process CPU time of a run, per shape (all threads)
    runs: int
    cpu_bound: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"time_ms": _round(self.time_ms), "median_ms": _round(self.median_ms), "spread": round(self.spread, 3),
                "times_ms": _round_all(self.times_ms), "medians_ms": _round_all(self.medians_ms),
                "cpu_ms": _round_all(self.cpu_ms), "runs": self.runs, "cpu_bound": self.cpu_bound}


@dataclass
class Timings:
    """The result of `time_engines`: per engine its `EngineTimes` (or the reason it could not
    be timed), the machine's load while timing, and how sure the ranking is."""

    engines: dict[str, EngineTimes]
    failed: dict[str, str]
    shapes: list[str]
    others_cpu: float | None  # median over batches of the share of all CPUs other processes used
    loadavg: tuple[float, float] | None  # 1-minute load average before and after timing
    cpus: int
    seconds: float
    batches: list[Batch] = field(default_factory=list)
    extra_rounds: int = 0  # rounds the two fastest engines got beyond ROUNDS, the choice being unsure
    cpu_bound: bool = False  # whether a run's CPU time bounded the engines' times (no CUDA GPU)

    @property
    def busy(self) -> bool:
        return self.others_cpu is not None and self.others_cpu > BUSY_FRACTION

    def ranking(self) -> list[str]:
        """Engine names, fastest first."""
        return sorted(self.engines, key=lambda name: self.engines[name].time_ms)

    def confidence(self) -> dict[str, Any]:
        """How sure the ranking is: the runner-up's margin over the fastest engine, the fastest
        engine's spread, whether it is sure (see the module docstring), whether the machine was
        busy, and a one-line verdict saying all of it."""
        ranked = self.ranking()
        load = self.load_text()
        if len(ranked) < 2:
            return {"margin": None, "spread": None, "sure": bool(ranked), "busy": self.busy, "cpu_bound": [],
                    "verdict": ("only one engine timed" if ranked else "nothing timed") + f"; {load}"}
        best, second = self.engines[ranked[0]], self.engines[ranked[1]]
        margin = second.time_ms / best.time_ms - 1.0
        # A CPU-time bound credits an engine that uses k cores alone with up to k times its time.
        bounded = [name for name in ranked[:2] if self.engines[name].cpu_bound]
        sure = (1.0 + margin > (1.0 + best.spread) * (1.0 + MIN_MARGIN)
                and (not bounded or 1.0 + margin > self.cpus))
        verdict = (f"{'sure' if sure else 'unsure'}: {ranked[0]} leads {ranked[1]} by {margin:.0%}, "
                   f"its run-to-run spread is {best.spread:.0%}")
        if bounded:
            verdict += (f", and the time of {' and '.join(bounded)} is CPU time (shorter than any run): "
                        f"a lead under {self.cpus}x may be the other's use of {self.cpus} CPUs")
        return {"margin": round(margin, 3), "spread": round(best.spread, 3), "sure": sure, "busy": self.busy,
                "cpu_bound": bounded, "verdict": f"{verdict}; {load}"}

    def load_text(self) -> str:
        if self.others_cpu is None:
            return "machine load unknown (no /proc/stat)"
        state = "machine busy" if self.busy else "machine quiet"
        text = f"{state}: other processes used {self.others_cpu:.0%} of {self.cpus} CPUs while timing"
        if self.loadavg is not None:
            text += f" (load average {self.loadavg[0]:.1f} before, {self.loadavg[1]:.1f} after)"
        if self.busy:
            text += "; a quiet machine may rank the engines differently"
        return text

    def method(self) -> str:
        extra = f" (+{self.extra_rounds} rounds for the two fastest, being unsure)" if self.extra_rounds else ""
        bound = ", or least CPU time of a run where shorter," if self.cpu_bound else ""
        return (f"fastest run{bound} of {ROUNDS}{extra} rounds x {RUNS_PER_ROUND} runs per shape after {TIMING_WARMUP} "
                "warm-up runs; rounds rotate the order of the engines; each engine in its own worker process"
                + ("; geometric mean over shapes" if len(self.shapes) > 1 else ""))

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method(), "shapes": self.shapes, "cpus": self.cpus, "seconds": round(self.seconds, 1),
                "others_cpu": None if self.others_cpu is None else round(self.others_cpu, 3),
                "loadavg": list(self.loadavg) if self.loadavg else None, "confidence": self.confidence()}


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def _round_all(values: Mapping[str, float]) -> dict[str, float]:
    return {k: _round(v) for k, v in values.items()}


def _geomean(values: Sequence[float]) -> float:
    if len(values) == 1:
        return values[0]
    return math.exp(sum(math.log(v) for v in values) / len(values))


# --- the machine's CPU use -------------------------------------------------------------------

def _cpu_jiffies() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs since boot from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already counted in user]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def _loadavg() -> float | None:
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _others_share(before: tuple[float, float] | None, after: tuple[float, float] | None, ours_ms: float,
                  wall_s: float, cpus: int) -> float | None:
    """The share of all CPUs that processes other than the worker used between two /proc/stat
    readings: machine busy time minus the worker's CPU time, over wall time x CPUs."""
    if before is None or after is None or wall_s <= 0:
        return None
    busy_s = (after[0] - before[0]) / _TICKS
    return min(1.0, max(0.0, (busy_s - ours_ms / 1e3) / (wall_s * cpus)))


# --- the parent side ---------------------------------------------------------------------------

class _Worker:
    """One worker process (`python -m optimize.timing worker`, or any command speaking its
    protocol): it loads what it times and prints "ready", then answers "SHAPE RUNS" lines with
    the wall and CPU milliseconds of each run, one JSON line each."""

    def __init__(self, name: str, command: Sequence[str], cwd: Path | None = None) -> None:
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker never blocks
        self.process = subprocess.Popen(list(command), cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True)

    def wait_ready(self) -> None:
        line = self._readline()
        if line != "ready":
            raise OptimizeError(f"timing failed: {self._failure(line)}")

    def run(self, shape: str, runs: int) -> tuple[list[float], list[float]]:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(f"{shape} {runs}\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise OptimizeError(f"timing failed: {self._failure('')}") from None
        line = self._readline()
        try:
            answer = json.loads(line)
            return [float(v) for v in answer["wall_ms"]], [float(v) for v in answer["cpu_ms"]]
        except (ValueError, KeyError, TypeError):
            raise OptimizeError(f"timing failed: {self._failure(line)}") from None

    def _readline(self) -> str:
        """The worker's next line: "" when it exited, a note when it said nothing for
        WORKER_TIMEOUT_S (then it is killed). The protocol is one request, one line, so nothing
        is left buffered between requests and select() sees every answer."""
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], WORKER_TIMEOUT_S)
        if not ready:
            self.process.kill()
            return f"no answer in {WORKER_TIMEOUT_S} s"
        return self.process.stdout.readline().strip()

    def _failure(self, line: str) -> str:
        self.stop()
        self.stderr.seek(0)
        lines = [ln for ln in self.stderr.read().strip().splitlines() if ln.strip()]
        return lines[-1] if lines else (line or f"worker exited with {self.process.returncode}")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                if self.process.stdin is not None:
                    self.process.stdin.close()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()

    def close(self) -> None:
        self.stop()
        self.stderr.close()


Runner = Callable[[str, str, int], tuple[list[float], list[float]]]


def _has_cuda() -> bool:
    """Whether engines here may compute on a GPU (then their CPU time says nothing of their time)."""
    return torch.cuda.is_available()


def engine_command(path: Path, shapes: Sequence[str]) -> list[str]:
    """The worker command timing the engine at `path`."""
    args = [sys.executable, "-m", "optimize.timing", "worker", str(Path(path).resolve())]
    for shape in shapes:
        args += ["--shape", shape]
    return args


def time_engines(paths: Mapping[str, Path], shapes: Sequence[tuple[int, int]], *,
                 progress: Callable[[], None] | None = None) -> Timings:
    """Time every engine of `paths` (name -> engine directory) at each (batch, seq) shape, by
    the method of this module. An engine whose worker fails is listed in `failed` with the
    reason; the others are still timed. `progress` is called after each batch of runs."""
    keys = [shape_key(s) for s in shapes]
    # From the directory holding the `optimize` package this process imported, so the worker
    # runs the same kiln (an installed one, or a checkout's) whatever the caller's directory.
    root = Path(__file__).resolve().parents[1]
    return time_workers({name: engine_command(path, keys) for name, path in paths.items()}, shapes, cwd=root,
                        progress=progress)


def time_workers(commands: Mapping[str, Sequence[str]], shapes: Sequence[tuple[int, int]], *, cwd: Path | None = None,
                 progress: Callable[[], None] | None = None, cpu_bound: bool | None = None) -> Timings:
    """`time_engines` over worker commands (name -> argv, each speaking the worker protocol of
    `_Worker`): a benchmark times peers that are not engine directories the same way.
    `cpu_bound` (default: no CUDA GPU here) lets a run's CPU time bound an engine's time
    (item 4 of the module docstring); a benchmark reporting wall times turns it off."""
    keys = [shape_key(s) for s in shapes]
    started: list[_Worker] = []
    workers: dict[str, _Worker] = {}
    failed: dict[str, str] = {}
    try:
        for name, command in commands.items():  # all load at once: their start-up overlaps
            started.append(_Worker(name, command, cwd))
            workers[name] = started[-1]
        for name, worker in list(workers.items()):
            try:
                worker.wait_ready()
            except OptimizeError as exc:
                failed[name] = str(exc)
                del workers[name]

        def run(name: str, shape: str, runs: int) -> tuple[list[float], list[float]]:
            return workers[name].run(shape, runs)

        timings = measure(list(workers), keys, run, progress=progress,
                          cpu_bound=not _has_cuda() if cpu_bound is None else cpu_bound)
    finally:
        for worker in started:
            worker.close()
    timings.failed.update(failed)
    return timings


def measure(names: Sequence[str], shapes: Sequence[str], run: Runner, *,
            progress: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter,
            sleep: Callable[[float], None] = time.sleep,
            jiffies: Callable[[], tuple[float, float] | None] | None = None, cpu_bound: bool = True) -> Timings:
    """The rounds of the method over engines that are ready to run: `run(name, shape, runs)`
    returns the wall and CPU milliseconds of `runs` runs. An engine whose `run` raises
    `OptimizeError` is dropped from later rounds and reported in `failed`. `cpu_bound`: every
    engine computes on the CPU, so a run's CPU time bounds its time (item 4 of the module
    docstring). `clock` (seconds), `sleep` and `jiffies` (the machine's busy and total CPU
    ticks, or None where unknown; by default from /proc/stat) are the machine's, replaceable
    to simulate one."""
    jiffies = jiffies or _cpu_jiffies
    cpus = os.cpu_count() or 1
    load_before = _loadavg()
    start = clock()
    failed: dict[str, str] = {}
    batches: list[Batch] = []

    def rounds(names: list[str], first: int, count: int) -> None:
        for round_ in range(first, first + count):
            active = [n for n in names if n not in failed]
            order = active[round_ % len(active):] + active[:round_ % len(active)] if active else []
            for name in order:
                for shape in shapes:
                    sleep(SETTLE_S)
                    before, t0 = jiffies(), clock()
                    try:
                        wall, cpu = run(name, shape, RUNS_PER_ROUND)
                    except OptimizeError as exc:
                        failed[name] = str(exc)
                        break
                    finally:
                        if progress is not None:
                            progress()
                    others = _others_share(before, jiffies(), sum(cpu), clock() - t0, cpus)
                    batches.append(Batch(name, shape, round_, wall, cpu, others))

    def result() -> Timings:
        engines = {name: _summarize([b for b in batches if b.engine == name], shapes, cpu_bound)
                   for name in names if name not in failed}
        shares = [b.others_cpu for b in batches if b.others_cpu is not None]
        load_after = _loadavg()
        return Timings(engines=engines, failed=dict(failed), shapes=list(shapes),
                       others_cpu=statistics.median(shares) if shares else None,
                       loadavg=(load_before, load_after) if load_before is not None and load_after is not None else None,
                       cpus=cpus, seconds=clock() - start, batches=batches, cpu_bound=cpu_bound)

    rounds(list(names), 0, ROUNDS)
    timings = result()
    if not timings.confidence()["sure"] and len(timings.engines) > 1:
        leaders = timings.ranking()[:2]
        rounds(leaders, ROUNDS, EXTRA_ROUNDS)
        timings = result()
        timings.extra_rounds = EXTRA_ROUNDS
    return timings


def _summarize(batches: list[Batch], shapes: Sequence[str], cpu_bound: bool) -> EngineTimes:
    def fastest(parity: int | None, cpu: bool = cpu_bound) -> list[float]:
        times = []
        for shape in shapes:
            mine = [b for b in batches if b.shape == shape and parity in (None, b.round % 2)]
            wall = min(t for b in mine for t in b.wall_ms)
            times.append(min(wall, min(t for b in mine for t in b.cpu_ms)) if cpu else wall)
        return times

    best = fastest(None)
    walls_best = fastest(None, cpu=False)
    halves = [fastest(parity) for parity in (0, 1)] if {b.round % 2 for b in batches} == {0, 1} else [best]
    walls = [[t for b in batches if b.shape == shape for t in b.wall_ms] for shape in shapes]
    cpus = [[t for b in batches if b.shape == shape for t in b.cpu_ms] for shape in shapes]
    time_ms = _geomean(best)
    return EngineTimes(time_ms=time_ms, median_ms=_geomean([statistics.median(w) for w in walls]),
                       spread=max(_geomean(h) for h in halves) / time_ms - 1.0,
                       times_ms=dict(zip(shapes, best)), medians_ms={s: statistics.median(w) for s, w in zip(shapes, walls)},
                       cpu_ms={s: statistics.median(c) for s, c in zip(shapes, cpus)},
                       runs=sum(len(b.wall_ms) for b in batches),
                       cpu_bound=[s for s, t, w in zip(shapes, best, walls_best) if t < w])


# --- the worker side ---------------------------------------------------------------------------

def _feeds(engine: Any, batch: int, seq: int) -> dict[str, Any]:
    """Inputs of one shape: all-ones attention masks (no padding, so padding-free engines do the
    full work too), random floats, and integers in the input's value range."""

    sizes = {"batch": batch, "seq": seq}
    generator = torch.Generator().manual_seed(0)
    feeds = {}
    for spec in engine.inputs:
        shape = spec.concrete(sizes)
        dtype = torch_dtype(spec.dtype)
        if spec.name == "attention_mask":
            feeds[spec.name] = torch.ones(shape, dtype=dtype)
        elif dtype.is_floating_point:
            feeds[spec.name] = torch.randn(shape, generator=generator).to(dtype)
        else:  # values do not change the time of a dense engine
            lo, hi = spec.value_range or (0, 100)
            feeds[spec.name] = torch.randint(lo, hi + 1, shape, generator=generator, dtype=dtype)
    return feeds


def _worker_main(args: argparse.Namespace) -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    engine = load(args.engine)
    feeds = {text: _feeds(engine, *parse_shape(text)) for text in args.shape}
    for text in args.shape:
        for _ in range(TIMING_WARMUP):
            engine.run(feeds[text])
    print("ready", flush=True)
    for line in sys.stdin:
        text, runs = line.split()
        wall, cpu = [], []
        for _ in range(int(runs)):
            c0, t0 = time.process_time(), time.perf_counter()
            engine.run(feeds[text])
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        print(json.dumps({"wall_ms": wall, "cpu_ms": cpu}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimize.timing")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="load one engine and time runs on request (started by time_engines)")
    w.add_argument("engine", type=Path)
    w.add_argument("--shape", action="append", required=True, help="BATCHxSEQ, e.g. 8x128 (repeatable)")
    w.set_defaults(func=_worker_main)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
