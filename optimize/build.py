"""One engine from one backend: precision plan → source → capture → FX passes → (for a backend
that consumes ONNX) ONNX export → ONNX passes → backend build → reload and verify → move into
place, each a stage of the progress display with its time in the manifest. `optimize.compile`
calls it directly, `auto` once per candidate."""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from torch.export import ExportedProgram

from optimize.backends import Backend, BuildContext, get_backend
from optimize.capture import capture, export_module, model_family, output_specs
from optimize.passes import PassContext, PassResult, run_passes
from optimize.passes.order import full_report
from optimize.precision import PrecisionPlan
from optimize.reporter import Reporter, Silent
from optimize.runtime.config import CompileConfig
from optimize.runtime.engine import AheadOfTimeEngine, Engine
from optimize.runtime.errors import AccuracyError, ConfigError
from optimize.runtime.loading import load
from optimize.runtime.manifest import MANIFEST_FILE, Manifest, build_environment
from optimize.runtime.pipeline import store_pipeline
from optimize.runtime.precision import facts
from optimize.samples import calibration_feeds, verification_feeds
from optimize.sources import load_source
from optimize.sources.base import Source
from optimize.staging import staged_directory
from optimize.verify import compare_real_tokens, judge, verification_sizes, verify, verify_batches


def build_engine(source: str | Path, out_dir: str | Path, config: CompileConfig, *, name: str | None = None,
                 reporter: Reporter | None = None) -> Engine:
    """Build `source` into a verified engine of `config.backend` (a backend, not "auto") at
    `out_dir` and return it loaded; see `optimize.compile`."""
    reporter = reporter or Silent()
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / MANIFEST_FILE).exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} exists and is not an engine directory; refusing to overwrite it")
    backend = get_backend(config.backend)
    if config.precision not in backend.precisions:
        needs = facts(config.precision).needs
        raise ConfigError(
            f"backend {backend.name!r} supports precision {', '.join(sorted(backend.precisions))}; got {config.precision!r}"
            + (f": {needs}" if needs else "")
        )
    plan = backend.precision_plan(config)  # resolves (and checks) the backend's options too
    buildable, why = backend.can_build_here()
    if not buildable:
        raise ConfigError(f"backend {backend.name!r}: {why}")
    timings: dict[str, float] = {}

    @contextmanager
    def stage(label: str, total: int | None = None) -> Iterator[None]:
        reporter.start(label, total)
        t0 = time.perf_counter()
        yield
        timings[label] = round(time.perf_counter() - t0, 3)
        reporter.finish(label, timings[label])

    with stage("load source"):
        src = load_source(source, config)
    with stage("capture"):
        program = capture(src, plan.capture)
        outputs = output_specs(program, src.inputs)
    with stage("FX passes"):
        program, pass_results = apply_passes(program, src, config, backend.name, backend.passes, plan)
    ctx = BuildContext(
        config=config, inputs=src.inputs, outputs=outputs, reporter=reporter, source=src,
        samples=functools.cache(lambda: calibration_feeds(src, config)), reference=src.module,
        previous=out_dir if (out_dir / MANIFEST_FILE).is_file() else None, plan=plan,
    )
    if backend.consumes_onnx:
        pass_results += prepare_onnx(program, ctx, backend, stage)

    try:
        with staged_directory(out_dir) as staging:
            with stage(f"build ({backend.name})"):
                payload = backend.build(program, ctx, staging)
                if src.pipeline is not None and src.pipeline_dir is not None:
                    payload += store_pipeline(src.pipeline, src.pipeline_dir, staging)
            manifest = Manifest(
                name=name or src.name,
                backend=backend.name,
                config=config,
                inputs=src.inputs,
                outputs=outputs,
                source=src.describe(),
                payload=payload,
                passes=[r.to_json() for r in full_report(pass_results, backend.name)],
                build=ctx.record,
                pipeline=src.pipeline,
                environment=build_environment(),
            )
            manifest.write(staging)

            runnable, why_not = backend.can_run_here()
            failure = ""
            if runnable:
                shapes = verification_sizes(src.inputs, config)
                sentences = verification_feeds(src, config)
                with stage("verify", total=len(shapes) + len(sentences)):
                    engine = load(staging)
                    def progress(sizes: dict[str, int]) -> None:
                        reporter.advance(" ".join(f"{k}={v}" for k, v in sizes.items()))

                    report = verify(engine.run, src.module, src.make_inputs, src.inputs, config, on_shape=progress)
                    real = verify_batches(engine.run, src.module, sentences, on_batch=progress) if sentences else None
                    del engine
                manifest.accuracy, failure = judge(report, real, config)
            else:
                # Never silent: the manifest, the progress display and the returned engine say why.
                reporter.start(f"verify skipped: {why_not}")
                reporter.finish(f"verify skipped: {why_not}", 0.0)
                tol = config.tolerance
                assert tol is not None
                manifest.accuracy = {"skipped": f"not verified: {why_not}", "tolerance": tol.to_json(),
                                     "reference": "fp32 eager"}
            manifest.timings_s = timings
            manifest.write(staging)
            if failure:
                raise AccuracyError(failure)
            _make_readable(staging)
    finally:
        torch.set_grad_enabled(True)
    if not runnable:
        return AheadOfTimeEngine(out_dir, Manifest.read(out_dir), why_not)
    return load(out_dir)


def apply_passes(
    program: ExportedProgram, src: Source, config: CompileConfig, backend: str, allowed: frozenset[str],
    plan: PrecisionPlan | None = None,
) -> tuple[ExportedProgram, list[PassResult]]:
    """Run the FX passes on the captured program; re-export it when any pass changed it."""
    gm = program.module()
    ctx = PassContext(config=config, inputs=src.inputs, backend=backend, plan=plan)  # type: ignore[arg-type]
    verifier = None
    if config.verify_passes:
        sizes = {d.name: d.opt for s in src.inputs for d in s.dims}
        feeds = src.make_inputs(sizes, torch.Generator().manual_seed(config.seed + 2))
        with torch.inference_mode():
            expected = src.module(**feeds)

        def verifier(candidate: torch.fx.GraphModule) -> dict[str, float]:
            with torch.inference_mode():
                stats = compare_real_tokens(feeds, expected, candidate(**feeds))
            return {"max_abs_error": max(v["max_abs_error"] for v in stats.values()),
                    "min_cosine": min(v["min_cosine"] for v in stats.values())}

    tol = config.tolerance
    assert tol is not None
    results = run_passes(gm, ctx, allowed, verifier, (tol.max_abs_error, tol.min_cosine))
    if any(r.total for r in results):
        program = export_module(gm, src)
    return program, results


def prepare_onnx(program: ExportedProgram, ctx: BuildContext, backend: Backend,
                 stage: Callable[[str], AbstractContextManager[None]]) -> list[PassResult]:
    """Export `program` to ONNX and run the ONNX stage of the pass order for `backend`, each as
    a stage of the build; the prepared model goes to `ctx.onnx_model`, the passes' results are
    returned for the report."""
    # why: optimize.onnx imports onnx, onnxscript and onnxruntime (~2 s, measured): only ONNX consumers need it
    from optimize.onnx import export_program, run_onnx_stage

    with stage("ONNX export"):
        model = export_program(program, ctx.inputs, ctx.outputs,
                               model_name=model_family(ctx.source) if ctx.source is not None else "")
    with stage("ONNX passes"), tempfile.TemporaryDirectory(prefix="kiln-onnx-") as workdir:
        ctx.onnx_model, results = run_onnx_stage(model, ctx, Path(workdir), backend.passes,
                                                 backend.onnx_options(ctx.config), backend.name)
    return results


def _make_readable(directory: Path) -> None:
    """mkdtemp (and some writers) create owner-only files; an engine is meant to be shared."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


__all__ = ["build_engine", "apply_passes", "prepare_onnx"]
