"""The numbers of the timing method and what it yields from the runs: per engine its time
(fastest run, or least CPU time where that bounds it), median and spread between halves of the
rounds; over the engines the ranking, how sure it is and the machine's load while timing."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    others_cpu: float | None  # share of all CPUs other processes used over the whole timing
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


def summarize(batches: list[Batch], shapes: Sequence[str], cpu_bound: bool) -> EngineTimes:
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
