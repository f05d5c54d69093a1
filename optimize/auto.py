"""`--backend auto`: build every candidate engine this machine can run, keep the fastest one
that passes the accuracy guard.

On CPUs the best engine differs by model, shape and precision (ONNX Runtime, OpenVINO and
CTranslate2 each win somewhere: bench/results/), so kiln measures instead of guessing:

1. candidates are the (backend, precision, options) combinations installed and runnable here
   whose precision is at least as accurate as the one asked for (asking for int8 admits fp32,
   the int8 modes and every backend's variants);
2. each is compiled and verified like any engine, all against the tolerance of the precision
   asked for — a candidate that fails is rejected with the verifier's reason;
3. once all are built, the passing engines are timed together by `optimize.timing` (each in
   its own worker process, in short rounds of rotating order, each ranked by its fastest run,
   with the machine's load measured alongside: a busy spell cannot fall on one candidate alone,
   and an unsure choice gets more rounds of the two fastest). The
   shapes are the `opt` shape, or the option `shapes` (e.g. ["8x128", "1x32"]); with several,
   candidates are ranked by the geometric mean over shapes, so no one shape dominates;
4. the fastest becomes the engine; the table of all candidates (times, the accuracy they were
   judged on, rejection reasons), the machine's load while timing and how sure the choice is
   are stored in its manifest (`build.auto`) and printed by the CLI.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optimize.backends import available_backends, get_backend
from optimize.build import build_engine
from optimize.runtime.config import CompileConfig
from optimize.runtime.errors import ConfigError, OptimizeError
from optimize.runtime.loading import load
from optimize.runtime.manifest import Manifest
from optimize.timing import ROUNDS, EngineTimes, Timings, time_engines

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


@dataclass
class Candidate:
    backend: str
    precision: str
    options: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"  # chosen | passed | rejected
    reason: str = ""
    timing: EngineTimes | None = None  # time_ms (ranks candidates), median_ms, spread, per shape, CPU time
    accuracy: dict[str, Any] = field(default_factory=dict)
    build_s: float = 0.0

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.backend}/{self.precision}" + (f"[{opts}]" if opts else "")

    def to_json(self) -> dict[str, Any]:
        timing = self.timing.to_json() if self.timing is not None else {"time_ms": None, "median_ms": None}
        return {"candidate": self.label, "backend": self.backend, "precision": self.precision, "options": self.options,
                "status": self.status, "reason": self.reason, **timing, "accuracy": self.accuracy,
                "build_s": round(self.build_s, 1)}


AUTO_OPTIONS = ("backends", "shapes")


def candidates(config: CompileConfig) -> list[Candidate]:
    """Every combination worth trying here, for the precision `config` asks for; the option
    `backends` (a list of names) restricts the search."""
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


def judged_accuracy(accuracy: dict[str, Any]) -> dict[str, Any]:
    """The worst error and cosine over the reports an engine was judged on (random inputs,
    real samples or both: quantized engines are judged on real samples only)."""
    judged = accuracy.get("judged_on", ["random inputs"])
    reports = [accuracy.get("samples", {}) if label == "real samples" else accuracy for label in judged]
    return {"max_abs_error": max(r.get("max_abs_error", 0.0) for r in reports),
            "min_cosine": min(r.get("min_cosine", 1.0) for r in reports), "judged_on": judged}


def _time_candidates(passed: list[Candidate], found: list[Candidate], workdir: Path, shapes: list[tuple[int, int]],
                     reporter: Any) -> Timings:
    """Time the verified candidates together (`optimize.timing.time_engines`); one that cannot
    be timed is rejected with the reason."""
    paths = {c.label: workdir / str(found.index(c)) for c in passed}
    stage = f"time {len(passed)} engines x {ROUNDS} rounds"
    if reporter is not None:
        reporter.start(stage, len(passed) * ROUNDS * len(shapes))
    t0 = time.perf_counter()
    timings = time_engines(paths, shapes, progress=reporter.advance if reporter is not None else None)
    for candidate in passed:
        if candidate.label in timings.failed:
            candidate.status, candidate.reason = "rejected", timings.failed[candidate.label]
        else:
            candidate.timing = timings.engines[candidate.label]
    if reporter is not None:
        reporter.finish(f"{stage}: {timings.confidence()['verdict']}", round(time.perf_counter() - t0, 3))
    return timings


def compile_auto(source: str | Path, out_dir: str | Path, config: CompileConfig, *, name: str | None = None,
                 reporter: Any = None) -> Any:
    """Compile every candidate, time the ones that pass, install the fastest at `out_dir`."""
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
                engine = build_engine(source, workdir / str(index), sub, name=name)
                candidate.accuracy = judged_accuracy(engine.manifest.accuracy)
                candidate.status = "passed"
            except OptimizeError as exc:
                candidate.status, candidate.reason = "rejected", str(exc)
            candidate.build_s = time.perf_counter() - t0
            if reporter is not None:
                reporter.finish(f"candidate {candidate.label}: " + (
                    "verified" if candidate.status == "passed" else f"rejected ({candidate.reason[:80]})"
                ), round(time.perf_counter() - t0, 3))
        verified = [c for c in found if c.status == "passed"]
        timings = _time_candidates(verified, found, workdir, shapes, reporter) if verified else None
        if timings is None or not timings.engines:
            reasons = "; ".join(f"{c.label}: {c.reason}" for c in found)
            raise OptimizeError(f"no candidate passed the accuracy guard and timing: {reasons}"[:2000])
        best = next(c for c in found if c.label == timings.ranking()[0])
        best.status = "chosen"
        chosen_dir = workdir / str(found.index(best))
        manifest = Manifest.read(chosen_dir)
        record = timings.to_json()
        manifest.build["auto"] = {
            "shapes": record.pop("shapes"),
            "timing": record.pop("method"),
            "confidence": record.pop("confidence"),
            "machine": record,  # CPUs, other processes' share of them, load average, seconds spent timing
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
    return load(out_dir)
