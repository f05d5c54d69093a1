"""CPU engines side by side on all-MiniLM-L6-v2, batch 8 × seq 128 (issue 5).

Every engine in `targets.ENTRIES` — PyTorch eager fp32 (the baseline), each CPU backend at fp32,
bf16 and int8, and the three `--backend auto` engines — is built once, started in its own worker
process, and timed in rounds that alternate the engines, so slow drifts of a shared machine fall
on all of them alike. The summary (medians, ratios against the baseline, accuracy from each
engine's manifest, the targets) is printed and written to bench/results/ by conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.engines.harness import ROOT, Collected, Worker
from bench.engines.targets import ENTRIES, Entry

# Building the engines (the three `auto` ones above all) takes 10-20 minutes on 2 cores the
# first time; the fixture doing it counts against the first benchmark's time limit.
pytestmark = pytest.mark.timeout(3600)

BATCH, SEQ = 8, 128
ROUNDS = 5  # alternations over all engines
RUNS = 10  # timed runs per engine per round, after WARMUP
WARMUP = 2


def build(entry: Entry, source: Path, cache: Path) -> Path:
    """The engine for `entry`, compiled with the CLI unless cached."""
    path = cache / entry.slug
    if (path / "manifest.json").is_file():
        return path
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "optimize", "compile", str(source), "-o", str(path),
                             *entry.compile_args()], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise RuntimeError(f"compiling {entry.label} failed: {lines[-1] if lines else f'exit {result.returncode}'}")
    return path


def describe(entry: Entry, path: Path | None) -> dict[str, Any]:
    """What ran, and how accurate it is (from the manifest: what the compile verified)."""
    if path is None:
        return {"backend": None, "precision": "fp32", "runs_as": "transformers AutoModel, torch.inference_mode"}
    from optimize.auto import judged_accuracy
    from optimize.runtime.manifest import Manifest

    manifest = Manifest.read(path)
    accuracy = judged_accuracy(manifest.accuracy)
    info: dict[str, Any] = {
        "backend": entry.backend, "precision": entry.precision, "runs_as": f"{manifest.config.backend}/{manifest.config.precision}",
        "guard_cosine": manifest.config.tolerance.min_cosine if manifest.config.tolerance else None,
        "min_cosine": accuracy["min_cosine"], "max_abs_error": accuracy["max_abs_error"],
        "judged_on": accuracy["judged_on"],
    }
    auto = manifest.build.get("auto")
    if auto:
        info["chosen"] = auto["chosen"]
        info["candidates"] = {c["candidate"]: (round(c["median_ms"], 1) if c["median_ms"] else c["status"])
                              for c in auto["candidates"]}
    return info


@pytest.fixture(scope="module")
def started(request: pytest.FixtureRequest, minilm_dir: Path, engine_cache: Path, workers: dict[str, Worker],
            collected: Collected) -> dict[str, Worker]:
    """Every selected engine (`-k` narrows them) built and its worker started before any timing."""
    selected = {item.callspec.params["entry"] for item in request.session.items if hasattr(item, "callspec")
                and "entry" in item.callspec.params}
    for entry in [e for e in ENTRIES if e in selected]:
        try:
            path = None if entry.backend is None else build(entry, minilm_dir, engine_cache)
        except RuntimeError as exc:  # recorded and skipped: one engine must not sink the comparison
            collected.info[entry.label] = {"backend": entry.backend, "precision": entry.precision, "failed": str(exc)}
            continue
        collected.info[entry.label] = describe(entry, path)
        args = ["--batch", str(BATCH), "--seq", str(SEQ)]
        args += ["--transformers", str(minilm_dir)] if path is None else [str(path)]
        worker = Worker(entry.label, args)
        worker.start()
        workers[entry.label] = worker
    return workers


@pytest.mark.parametrize(("round_", "entry"), [(r, e) for r in range(ROUNDS) for e in ENTRIES],
                         ids=[f"round{r}-{e.slug}" for r in range(ROUNDS) for e in ENTRIES])
def test_minilm_batch8_seq128(benchmark: Any, started: dict[str, Worker], collected: Collected, round_: int,
                              entry: Entry) -> None:
    if entry.label not in started:
        pytest.skip(collected.info[entry.label].get("failed", "not built"))
    worker = started[entry.label]
    benchmark.group = f"all-MiniLM-L6-v2 batch {BATCH} x seq {SEQ}, round {round_}"
    benchmark.extra_info.update({"engine": entry.label, **{k: v for k, v in collected.info[entry.label].items()
                                                           if k != "candidates"}})
    benchmark.pedantic(worker.run, rounds=RUNS, warmup_rounds=WARMUP, iterations=1)
    times = [t * 1e3 for t in benchmark.stats.stats.data]
    assert len(times) == RUNS and min(times) > 0
    collected.times.setdefault(entry.label, []).extend(times)
