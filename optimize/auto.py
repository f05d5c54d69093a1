"""`--backend auto`: build every candidate engine this machine can run, keep the fastest one
that passes the accuracy guard.

On CPUs the best engine differs by model, shape and precision (ONNX Runtime, OpenVINO and
CTranslate2 each win somewhere: bench/results/), so kiln measures instead of guessing:

1. candidates are the (backend, precision, options) combinations installed and runnable here
   whose precision is at least as accurate as the one asked for (asking for int8 admits fp32,
   the int8 modes and every backend's variants);
2. each is compiled and verified like any engine, all against the tolerance of the precision
   asked for — a candidate that fails is rejected with the verifier's reason;
3. each passing engine is timed on the configured shapes **in its own process**: engines'
   thread pools slow one another down when they share a process on a small machine. Timing
   runs after every build, in rounds of alternating order (see `_time_candidates`). The shapes
   are the `opt` shape, or the option `shapes` (e.g. ["8x128", "1x32"]); candidates are ranked
   by the geometric mean of their per-shape medians, so no one shape dominates;
4. the fastest becomes the engine; the table of all candidates (times, the accuracy they were
   judged on, rejection reasons) is stored in its manifest (`build.auto`) and printed by the CLI.

`python -m optimize.auto time ENGINE_DIR --shape BxS [--shape BxS ...]` is the timing subprocess.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optimize.config import CompileConfig
from optimize.errors import ConfigError, OptimizeError

# The precisions admitted as candidates when a precision is asked for: that one and every more
# accurate one (all are judged against the tolerance of the one asked for).
ADMITTED = {
    "fp32": ("fp32",),
    "fp16": ("fp32", "fp16"),
    "bf16": ("fp32", "bf16", "fp16"),
    "int8-weight": ("fp32", "fp16", "bf16", "int8-weight"),
    "int8": ("fp32", "fp16", "bf16", "int8-weight", "int8"),
    "fp8": ("fp32", "fp16", "bf16", "int8-weight", "int8", "fp8"),
}
TIMING_WARMUP = 3
TIMING_RUNS = 15
TIMING_ROUNDS = 2


@dataclass
class Candidate:
    backend: str
    precision: str
    options: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"  # chosen | passed | rejected
    reason: str = ""
    median_ms: float | None = None  # geometric mean over the timed shapes of each shape's median
    times_ms: dict[str, float] = field(default_factory=dict)  # per shape ("8x128")
    accuracy: dict[str, Any] = field(default_factory=dict)
    build_s: float = 0.0

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.backend}/{self.precision}" + (f"[{opts}]" if opts else "")

    def to_json(self) -> dict[str, Any]:
        return {"candidate": self.label, "backend": self.backend, "precision": self.precision, "options": self.options,
                "status": self.status, "reason": self.reason, "median_ms": self.median_ms, "times_ms": self.times_ms,
                "accuracy": self.accuracy,
                "build_s": round(self.build_s, 1)}


AUTO_OPTIONS = ("backends", "shapes")


def candidates(config: CompileConfig) -> list[Candidate]:
    """Every combination worth trying here, for the precision `config` asks for; the option
    `backends` (a list of names) restricts the search."""
    from optimize.backends import available_backends, get_backend

    unknown = sorted(set(config.backend_options) - set(AUTO_OPTIONS))
    if unknown:
        raise ConfigError(f"backend 'auto' has no option(s) {', '.join(unknown)}; its options: {', '.join(AUTO_OPTIONS)}")
    allowed = config.backend_options.get("backends")
    names = [n for n in available_backends() if n != "auto" and (allowed is None or n in allowed)]
    if allowed is not None and set(allowed) - set(names):
        missing = sorted(set(allowed) - set(names))
        raise ConfigError(f"backend 'auto': unknown backend(s) {', '.join(missing)}; available: {', '.join(available_backends())}")
    admitted = ADMITTED[config.precision]
    found: list[Candidate] = []
    variants: dict[str, list[dict[str, Any]]] = {
        "onnxruntime": [{"ort_fusions": True}, {"ort_fusions": False}],
    }
    for name in names:
        try:
            backend = get_backend(name)
        except (OptimizeError, ImportError):
            continue
        if not backend.can_run_here()[0]:
            continue
        for precision in admitted:
            if precision not in backend.precisions:
                continue
            if precision not in backend.native_precisions():  # emulated: slower, not faster
                continue
            for options in variants.get(name, [{}]):
                found.append(Candidate(name, precision, dict(options)))
    return found


def timing_shapes(config: CompileConfig) -> list[tuple[int, int]]:
    """The (batch, seq) shapes candidates are timed on: option `shapes` ("8x128" strings or
    [batch, seq] pairs) or the opt shape; each must lie inside the engine's ranges."""
    assert config.opt_batch is not None and config.opt_seq is not None
    given = config.backend_options.get("shapes")
    if given is None:
        return [(config.opt_batch, config.opt_seq)]
    if not isinstance(given, (list, tuple)) or not given:
        raise ConfigError(f"backend 'auto' option shapes must be a list such as [\"8x128\", \"1x32\"]; got {given!r}")
    shapes = []
    for item in given:
        try:
            batch, seq = (int(v) for v in (str(item).lower().split("x") if isinstance(item, str) else item))
        except (TypeError, ValueError):
            raise ConfigError(f"backend 'auto' option shapes: {item!r} is not BATCHxSEQ such as \"8x128\"") from None
        if not (config.min_batch <= batch <= config.max_batch and config.min_seq <= seq <= config.max_seq):
            raise ConfigError(f"backend 'auto' option shapes: {batch}x{seq} lies outside batch "
                              f"[{config.min_batch}, {config.max_batch}] x seq [{config.min_seq}, {config.max_seq}]")
        shapes.append((batch, seq))
    return shapes


def time_engine(path: Path, shapes: list[tuple[int, int]]) -> dict[str, float]:
    """Median milliseconds of one `run` at each (batch, seq) shape, keyed "BxS", measured in a
    fresh process."""
    args = [sys.executable, "-m", "optimize.auto", "time", str(path)]
    for batch, seq in shapes:
        args += ["--shape", f"{batch}x{seq}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
        raise OptimizeError(f"timing failed: {lines[-1] if lines else 'exit ' + str(result.returncode)}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {shape: float(entry["median_ms"]) for shape, entry in report.items()}


def judged_accuracy(accuracy: dict[str, Any]) -> dict[str, Any]:
    """The worst error and cosine over the reports an engine was judged on (random inputs,
    real samples or both: quantized engines are judged on real samples only)."""
    judged = accuracy.get("judged_on", ["random inputs"])
    reports = [accuracy.get("samples", {}) if label == "real samples" else accuracy for label in judged]
    return {"max_abs_error": max(r.get("max_abs_error", 0.0) for r in reports),
            "min_cosine": min(r.get("min_cosine", 1.0) for r in reports), "judged_on": judged}


def _time_candidates(passed: list[Candidate], found: list[Candidate], workdir: Path, shapes: list[tuple[int, int]],
                     reporter: Any) -> None:
    """Time every verified candidate, in TIMING_ROUNDS rounds whose order alternates (forward,
    then backward), keeping each shape's fastest round: a slow spell of a shared machine then
    cannot fall on one candidate alone."""
    order = list(passed)
    if reporter is not None and passed:
        reporter.start(f"time {len(passed)} engines x {TIMING_ROUNDS} rounds", len(passed) * TIMING_ROUNDS)
    t0 = time.perf_counter()
    for round_ in range(TIMING_ROUNDS):
        for candidate in order:
            if candidate.status != "passed":
                continue
            try:
                times = time_engine(workdir / str(found.index(candidate)), shapes)
            except OptimizeError as exc:
                candidate.status, candidate.reason = "rejected", str(exc)
                continue
            finally:
                if reporter is not None:
                    reporter.advance()
            candidate.times_ms = {k: min(v, candidate.times_ms.get(k, v)) for k, v in times.items()}
        order.reverse()
    for candidate in passed:
        if candidate.times_ms:
            candidate.median_ms = math.exp(sum(math.log(t) for t in candidate.times_ms.values()) / len(candidate.times_ms))
    if reporter is not None and passed:
        reporter.finish(f"time {len(passed)} engines x {TIMING_ROUNDS} rounds", round(time.perf_counter() - t0, 3))


def compile_auto(source: str | Path, out_dir: str | Path, config: CompileConfig, *, name: str | None = None,
                 reporter: Any = None) -> Any:
    """Compile every candidate, time the ones that pass, install the fastest at `out_dir`."""
    import optimize
    from optimize.manifest import Manifest

    out_dir = Path(out_dir)
    found = candidates(config)
    if not found:
        raise ConfigError("no backend can run on this machine for precision " + config.precision)
    workdir = out_dir.parent / f".{out_dir.name}.auto"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    tolerance = config.tolerance
    shapes = timing_shapes(config)
    try:
        for index, candidate in enumerate(found):
            if reporter is not None:
                reporter.start(f"candidate {index + 1}/{len(found)}: {candidate.label}")
            t0 = time.perf_counter()
            sub = replace(config, backend=candidate.backend, precision=candidate.precision,
                          backend_options={**candidate.options}, tolerance=tolerance)
            try:
                engine = optimize.compile(source, workdir / str(index), sub, name=name)
                candidate.accuracy = judged_accuracy(engine.manifest.accuracy)
                candidate.status = "passed"
            except OptimizeError as exc:
                candidate.status, candidate.reason = "rejected", str(exc)
            candidate.build_s = time.perf_counter() - t0
            if reporter is not None:
                reporter.finish(f"candidate {candidate.label}: " + (
                    "verified" if candidate.status == "passed" else f"rejected ({candidate.reason[:80]})"
                ), round(time.perf_counter() - t0, 3))
        _time_candidates([c for c in found if c.status == "passed"], found, workdir, shapes, reporter)
        passed = [c for c in found if c.status == "passed"]
        if not passed:
            reasons = "; ".join(f"{c.label}: {c.reason}" for c in found)
            raise OptimizeError(f"no candidate passed the accuracy guard: {reasons}"[:2000])
        best = min(passed, key=lambda c: c.median_ms or float("inf"))
        best.status = "chosen"
        chosen_dir = workdir / str(found.index(best))
        manifest = Manifest.read(chosen_dir)
        manifest.build["auto"] = {
            "shapes": [f"{b}x{s}" for b, s in shapes],
            "timing": (f"median of {TIMING_RUNS} runs after {TIMING_WARMUP} warm-up per shape, best of "
                       f"{TIMING_ROUNDS} alternating rounds"
                       + (", geometric mean over shapes" if len(shapes) > 1 else "") + "; each engine in its own process"),
            "asked": {"precision": config.precision, "tolerance": tolerance.to_json() if tolerance else None},
            "candidates": [c.to_json() for c in found],
            "chosen": best.label,
        }
        manifest.write(chosen_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        chosen_dir.rename(out_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return optimize.load(out_dir)


def _time_main(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import optimize
    from optimize.specs import torch_dtype

    torch.set_num_threads(os.cpu_count() or 1)
    engine = optimize.load(args.engine)
    report = {}
    for text in args.shape:
        batch, seq = (int(v) for v in text.lower().split("x"))
        sizes = {"batch": batch, "seq": seq}
        generator = torch.Generator().manual_seed(0)
        feeds = {}
        for spec in engine.inputs:
            shape = spec.concrete(sizes)
            dtype = torch_dtype(spec.dtype)
            if spec.name == "attention_mask":  # no padding: padding-free engines do the full work too
                feeds[spec.name] = torch.ones(shape, dtype=dtype)
            elif dtype.is_floating_point:
                feeds[spec.name] = torch.randn(shape, generator=generator).to(dtype)
            else:  # values do not change the time of a dense engine
                lo, hi = spec.value_range or (0, 100)
                feeds[spec.name] = torch.randint(lo, hi + 1, shape, generator=generator, dtype=dtype)
        for _ in range(TIMING_WARMUP):
            engine.run(feeds)
        times = []
        for _ in range(TIMING_RUNS):
            t0 = time.perf_counter()
            engine.run(feeds)
            times.append((time.perf_counter() - t0) * 1e3)
        report[f"{batch}x{seq}"] = {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}
    print(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimize.auto")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("time", help="time one engine (run by --backend auto in a subprocess)")
    t.add_argument("engine", type=Path)
    t.add_argument("--shape", action="append", required=True, help="BATCHxSEQ, e.g. 8x128 (repeatable)")
    t.set_defaults(func=_time_main)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
