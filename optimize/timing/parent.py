"""The parent side of timing: one worker process per engine, all loaded before any timing, and
the rounds in rotating order (`measure`) that ask them for runs."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from optimize.runtime.errors import OptimizeError
from optimize.timing.machine import cpu_jiffies, loadavg, others_share
from optimize.timing.results import EXTRA_ROUNDS, ROUNDS, RUNS_PER_ROUND, Batch, Timings, shape_key, summarize

# Pause before each batch of runs, so the previous worker's thread pool stops spinning first.
SETTLE_S = 0.005
WORKER_TIMEOUT_S = 600  # one answer of a worker (loading, or one batch of runs)


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
    root = Path(__file__).resolve().parents[2]
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
    jiffies = jiffies or cpu_jiffies
    cpus = os.cpu_count() or 1
    load_before = loadavg()
    start = clock()
    failed: dict[str, str] = {}
    batches: list[Batch] = []
    machine: list[tuple[float, float, float]] = []  # per batch: busy ticks, the worker's CPU ms, seconds

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
                    after, seconds = jiffies(), clock() - t0
                    batches.append(Batch(name, shape, round_, wall, cpu, others_share(before, after, sum(cpu), seconds, cpus)))
                    if before is not None and after is not None:
                        machine.append((after[0] - before[0], sum(cpu), seconds))

    def result() -> Timings:
        engines = {name: summarize([b for b in batches if b.engine == name], shapes, cpu_bound)
                   for name in names if name not in failed}
        # Pooled over all batches, not their median: a batch of fast runs lasts about a
        # millisecond, less than the clock tick /proc/stat counts in, so most batches alone
        # would see no tick at all, even beside a process spinning on every core.
        ticks, ours_ms, seconds = (sum(column) for column in zip(*machine)) if machine else (0, 0, 0)
        others = others_share((0, 0), (ticks, 0), ours_ms, seconds, cpus) if machine else None
        load_after = loadavg()
        return Timings(engines=engines, failed=dict(failed), shapes=list(shapes), others_cpu=others,
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
