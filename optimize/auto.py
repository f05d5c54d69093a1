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
   judged on, rejection and skip reasons), the machine's load while timing and how sure the
   choice is are stored in its manifest (`build.auto`) and printed by the CLI.

Precision `auto` (the CLI's default) admits every precision this machine computes natively
(bf16 on AMX or AVX512_BF16 CPUs, int8 where its guard allows) and holds each candidate to the
task's guard (`optimize.guards`: cosine ≥ 0.9999 on real texts for embeddings, the same labels
for classifiers); it times the opt shape and a small one (1 x 32), the two a server sees most.

With a `TuningCache` (`optimize.tuning`; the CLI always passes one), a search is recorded per
machine and model and the winner's engine is kept beside it (`optimize.engine_cache`); the next
build with the same key copies that engine into place once its files check out (seconds; its
manifest says so under `build.auto.tuning`). Where the kept engine is missing or damaged, only
the winner is built and verified again (and kept); should it no longer pass, it searches again.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from optimize.backends import available_backends, get_backend
from optimize.build import build_engine
from optimize.guards import INT8_REACHABLE_COSINE, task_guard, with_task_checks
from optimize.precision import admitted as precision_admits
from optimize.runtime.config import AUTO_PRECISION, CompileConfig
from optimize.runtime.errors import ConfigError, EngineError, OptimizeError
from optimize.runtime.loading import load
from optimize.runtime.manifest import Manifest
from optimize.runtime.precision import facts
from optimize.sources import load_source
from optimize.timing import ROUNDS, EngineTimes, Timings, time_engines
from optimize.tuning import TuningCache, key_id, tuning_key


@dataclass
class Candidate:
    backend: str
    precision: str
    options: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"  # chosen | passed | rejected | skipped (never built)
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
    return survey(config)[0]


def survey(config: CompileConfig, task: str | None = None) -> tuple[list[Candidate], list[Candidate]]:
    """(the candidates to build, the ones skipped here with the reason). Skipped: a backend
    that cannot run or build on this machine or cannot build the model's `task`, a precision it would only emulate (slower, not
    faster), and, under a guard tighter than int8 reaches (`optimize.guards`), int8 ones.
    For precision `auto`, ONNX Runtime is tried with its fusions only (the variant without
    them wins only on a few exotic graphs; `--backend auto --precision fp32` tries both), and
    eager only where inductor cannot build (inductor compiles the same program, and the
    search should take minutes, not a quarter of an hour, on 2 cores)."""
    unknown = sorted(set(config.backend_options) - set(AUTO_OPTIONS))
    if unknown:
        raise ConfigError(f"backend 'auto' has no option(s) {', '.join(unknown)}; its options: {', '.join(AUTO_OPTIONS)}")
    allowed = config.backend_options.get("backends")
    names = [n for n in available_backends() if n != "auto" and (allowed is None or n in allowed)]
    if allowed is not None and set(allowed) - set(names):
        missing = sorted(set(allowed) - set(names))
        raise ConfigError(f"backend 'auto': unknown backend(s) {', '.join(missing)}; available: {', '.join(available_backends())}")
    # that precision and every more accurate one, all judged against the tolerance asked for
    admitted = precision_admits(config.precision)
    measured_default = config.precision == AUTO_PRECISION
    found: list[Candidate] = []
    skipped: list[Candidate] = []
    variants: dict[str, list[dict[str, Any]]] = {
        "onnxruntime": [{"ort_fusions": True}] if measured_default else [{"ort_fusions": True}, {"ort_fusions": False}],
    }
    tol = config.tolerance
    for name in names:
        if measured_default and name == "eager" and allowed is None and _inductor_builds():
            skipped.append(Candidate(name, "-", status="skipped",
                                     reason="inductor compiles the same program ahead of time; eager is the baseline"))
            continue
        try:
            backend = get_backend(name)
        except (OptimizeError, ImportError) as exc:
            skipped.append(Candidate(name, "-", status="skipped", reason=str(exc).splitlines()[0]))
            continue
        refusal = backend.refuses_task(task)
        if refusal is not None:
            skipped.append(Candidate(name, "-", status="skipped", reason=refusal))
            continue
        for check in (backend.can_run_here, backend.can_build_here):
            ok, why = check()
            if not ok:
                skipped.append(Candidate(name, "-", status="skipped", reason=why))
                break
        else:
            native = backend.native_precisions()
            for precision in admitted:
                if precision not in backend.precisions:
                    continue
                reason = ""
                if not native:
                    skipped.append(Candidate(name, "-", status="skipped",
                                             reason=f"{name} computes no precision natively on this machine"))
                    break
                if precision not in native:
                    reason = f"{name} does not compute {precision} natively on this machine: slower, not faster"
                elif (measured_default and facts(precision).weights == torch.int8 and tol is not None
                      and tol.min_cosine > INT8_REACHABLE_COSINE):
                    reason = (f"int8 quantization noise (all-MiniLM-L6-v2 on real text: cosine 0.987 to 0.9991) "
                              f"cannot keep the guard's cosine {tol.min_cosine}; loosen it with --min-cosine")
                if reason:
                    skipped.append(Candidate(name, precision, status="skipped", reason=reason))
                    continue
                for options in variants.get(name, [{}]):
                    found.append(Candidate(name, precision, dict(options)))
    return found, skipped


def _inductor_builds() -> bool:
    try:
        backend = get_backend("inductor")
    except (OptimizeError, ImportError):
        return False
    return backend.can_run_here()[0] and backend.can_build_here()[0]


def timing_shapes(config: CompileConfig) -> list[tuple[int, int]]:
    """The (batch, seq) shapes candidates are timed on: option `shapes` ("8x128" strings or
    [batch, seq] pairs) or the opt shape; each must lie inside the engine's ranges."""
    assert config.opt_batch is not None and config.opt_seq is not None
    given = config.backend_options.get("shapes")
    if given is None:
        shapes = [(config.opt_batch, config.opt_seq)]
        small = (config.min_batch, min(max(config.min_seq, 32), config.max_seq))
        if config.precision == AUTO_PRECISION and small not in shapes:
            shapes.append(small)  # the measured default also times what one short request costs
        return shapes
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


def _guarded(config: CompileConfig, task: str | None) -> CompileConfig:
    """Precision `auto` holds candidates to the task's guard (`optimize.guards`), with the
    bounds the user gave, if any."""
    if config.precision != AUTO_PRECISION:
        return config
    tolerance = task_guard(task) if config.tolerance is None else with_task_checks(config.tolerance, task)
    return replace(config, tolerance=tolerance)


def _request(config: CompileConfig, shapes: list[tuple[int, int]]) -> dict[str, Any]:
    """What of the build request a cached choice depends on (the tuning key's `request`)."""
    tol = config.tolerance
    return {"precision": config.precision, "tolerance": tol.to_json() if tol else None, "task": config.task,
            "ranges": [config.min_batch, config.max_batch, config.min_seq, config.max_seq],
            "shapes": [f"{b}x{s}" for b, s in shapes], "backends": config.backend_options.get("backends"),
            "passes": config.passes, "calibration": config.calibration, "calibration_method": config.calibration_method,
            "calibration_samples": config.calibration_samples}


def _note(reporter: Any, what: str, seconds: float = 0.0) -> None:
    if reporter is not None:
        reporter.start(what)
        reporter.finish(what, round(seconds, 3))


def _restore_winner(out_dir: Path, cached: dict[str, Any], tuning: TuningCache, entry_id: str, name: str,
                    source: dict[str, Any], reporter: Any) -> Any:
    """Copy the engine kept for a cached search into place; None when there is none usable
    (the note says why, and the caller rebuilds the winner)."""
    t0 = time.perf_counter()
    engines = tuning.engines
    record, why = engines.restore(entry_id, cached["chosen"], cached.get("recorded"), out_dir)
    if record is None:
        _note(reporter, f"tuning cache: {why}: rebuilding {cached['chosen']}")
        return None
    manifest = Manifest.read(out_dir)
    # The same model (content digest) may come from another path, under another name.
    manifest.name, manifest.source = name, source
    manifest.build["auto"] = {**cached["auto"], "tuning": {
        "cache": str(tuning.path), "hit": True, "recorded": cached.get("recorded"),
        "engine": {"copied_from": str(engines.root / entry_id), "kept": record.get("stored")}}}
    manifest.write(out_dir)
    try:
        engine = load(out_dir)
    except EngineError as exc:
        _note(reporter, f"tuning cache: the kept engine does not load ({str(exc)[:80]}): rebuilding {cached['chosen']}")
        return None
    _note(reporter, f"tuning cache: {cached['chosen']} was fastest here ({tuning.path}, "
                    f"{cached.get('recorded', '?')}); its engine copied from the cache", time.perf_counter() - t0)
    return engine


def _keep_engine(tuning: TuningCache, entry_id: str, chosen: str, recorded: str | None, out_dir: Path,
                 reporter: Any) -> None:
    """Keep the winner's engine for the next build; a cache that cannot take it costs only speed."""
    try:
        kept = tuning.engines.keep(entry_id, chosen, recorded, out_dir)
    except OSError as exc:
        kept, why = False, str(exc)
    else:
        why = f"larger than the cache's {tuning.engines.max_bytes >> 20} MiB"
    if not kept:
        _note(reporter, f"tuning cache: the engine is not kept ({why[:80]}); the next build rebuilds it")


def _rebuild_winner(source: str | Path, out_dir: Path, config: CompileConfig, cached: dict[str, Any],
                    tuning: TuningCache, name: str | None, reporter: Any) -> Any:
    """Build and verify only the candidate a cached search chose; None when it no longer
    passes (then the caller searches again)."""
    auto = cached["auto"]
    chosen = next(c for c in auto["candidates"] if c["candidate"] == cached["chosen"])
    _note(reporter, f"tuning cache: {chosen['candidate']} was fastest here ({tuning.path}, {cached.get('recorded', '?')})")
    sub = replace(config, backend=chosen["backend"], precision=chosen["precision"],
                  backend_options=dict(chosen.get("options") or {}), tolerance=config.tolerance)
    try:
        build_engine(source, out_dir, sub, name=name, reporter=reporter)
    except OptimizeError as exc:
        _note(reporter, f"cached choice {chosen['candidate']} no longer passes ({str(exc)[:80]}): searching again")
        return None
    manifest = Manifest.read(out_dir)
    manifest.build["auto"] = {**auto, "tuning": {"cache": str(tuning.path), "hit": True,
                                                  "recorded": cached.get("recorded")}}
    manifest.write(out_dir)
    return load(out_dir)


def compile_auto(source: str | Path, out_dir: str | Path, config: CompileConfig, *, name: str | None = None,
                 reporter: Any = None, tuning: TuningCache | None = None) -> Any:
    """Compile every candidate, time the ones that pass, install the fastest at `out_dir`;
    with `tuning`, reuse (and record) the choice for this machine and model."""
    out_dir = Path(out_dir)
    key = None
    # Loaded once here for what the search depends on (the task, the digest); every candidate
    # captures it again anyway.
    src = load_source(source, config)
    task = src.describe().get("task")
    config = _guarded(config, task)
    if tuning is not None:
        key = tuning_key(src.digest, _request(config, timing_shapes(config)))
        cached = tuning.lookup(key)
        if cached is not None:
            engine = _restore_winner(out_dir, cached, tuning, key_id(key), name or src.name, src.describe(), reporter)
            if engine is not None:
                return engine
            del src
            engine = _rebuild_winner(source, out_dir, config, cached, tuning, name, reporter)
            if engine is not None:
                _keep_engine(tuning, key_id(key), cached["chosen"], cached.get("recorded"), out_dir, reporter)
                return engine
    del src
    found, skipped = survey(config, task)
    if not found:
        reasons = "; ".join(f"{c.label}: {c.reason}" for c in skipped)
        raise ConfigError(f"no backend can run on this machine for precision {config.precision}: {reasons}"[:2000])
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
                del engine
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
            "candidates": [c.to_json() for c in [*found, *skipped]],
            "chosen": best.label,
        }
        entry = None
        if tuning is not None and key is not None:
            entry = tuning.store(key, {"chosen": best.label, "auto": manifest.build["auto"]})
            manifest.build["auto"]["tuning"] = {"cache": str(tuning.path), "hit": False}
        manifest.write(chosen_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        chosen_dir.rename(out_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if tuning is not None and key is not None and entry is not None:
        _keep_engine(tuning, key_id(key), best.label, entry["recorded"], out_dir, reporter)
    return load(out_dir)
