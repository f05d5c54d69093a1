"""The CPU engine comparison's machinery, shared by its conftest and benchmark module: one
worker process per engine, the gathered times, and the summary written to bench/results/."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".kiln" / "bench-engines"
RESULTS = ROOT / "bench" / "results"


@dataclass
class Worker:
    """`python -m bench.engines.worker` for one engine, kept running between rounds."""

    label: str
    args: list[str]
    process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "bench.engines.worker", *self.args], cwd=ROOT, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline().strip()  # type: ignore[union-attr]
        if line != "ready":
            raise RuntimeError(f"worker for {self.label} did not start (exit {self.process.wait()})")

    def run(self) -> None:
        assert self.process is not None and self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        if self.process.stdout.readline().strip() != "ok":
            raise RuntimeError(f"worker for {self.label} failed (exit {self.process.wait()})")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stdin.close()  # type: ignore[union-attr]
            self.process.wait(timeout=60)


@dataclass
class Collected:
    """Per-engine timings (ms) gathered over the rounds, and what each engine is."""

    times: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summarize(collected: Collected, baseline: str) -> dict[str, Any]:
    """Medians, ratios against the baseline and the issue's targets, from the gathered times."""
    from bench.engines.targets import evaluate

    rows = {}
    base = statistics.median(collected.times[baseline])
    for label, times in collected.times.items():
        median = statistics.median(times)
        rows[label] = {**collected.info.get(label, {}), "median_ms": round(median, 2),
                       "p90_ms": round(statistics.quantiles(times, n=10, method="inclusive")[-1], 2), "runs": len(times),
                       "speedup_vs_baseline": round(base / median, 3)}
    import onnxruntime
    import torch

    return {
        "benchmark": "all-MiniLM-L6-v2 CPU engines, batch 8 x seq 128 (no padding), fp32 eager baseline",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "method": ("each engine in its own worker process, all started before timing; rounds alternate the engines; "
                   "a run is one round trip to the worker (pipe overhead ~0.05 ms)"),
        "baseline": baseline,
        "engines": rows,
        "failed": {label: info["failed"] for label, info in collected.info.items() if "failed" in info},
        "targets": evaluate(rows, baseline),
    }
