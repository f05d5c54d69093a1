"""The ONNX path: export the captured program, then prepare the graph for an ONNX-consuming
backend (TensorRT, ONNX Runtime, OpenVINO) with small passes, one module each, that report what
they matched.

Passes run in the fixed order of `PIPELINE`; a backend names the ones it wants, a pass skips
itself when it does not apply (e.g. mixed precision at fp32), and `CompileConfig.passes` turns
any of them off by name. With `CompileConfig.verify_passes` the model is run by ONNX Runtime
after every pass that changed something and compared with the fp32 eager model, so the first
pass that breaks accuracy is named.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from torch.export import ExportedProgram
import onnxruntime as ort

from optimize.capture import model_family
from optimize.onnx.attention import AttentionCleanup
from optimize.onnx.base import Feeds, OnnxPass, OnnxPassContext
from optimize.onnx.export import export_program, save_model
from optimize.onnx.fold_constants import FoldConstants
from optimize.onnx.fuse_gelu import FuseGelu
from optimize.onnx.fuse_layernorm import FuseLayerNorm
from optimize.onnx.graph import Graph
from optimize.onnx.mixed_precision import MixedPrecision
from optimize.onnx.ort_fusions import OrtFusions
from optimize.onnx.quantize import Quantize
from optimize.passes.base import PassResult
from optimize.runtime.errors import AccuracyError, ConfigError, OptimizeError
from optimize.verify import compare_real_tokens

if TYPE_CHECKING:
    from optimize.backends.base import BuildContext

# Clean-ups and fusions first, so precision passes see the final structure (Q/DQ nodes would
# hide patterns from the fusions). ORT's fusions look for the exporter's attention pattern, so
# they run before the attention clean-up rewrites it. Quantization calibrates on the fp32
# graph; mixed precision comes last, so int8 engines can run their other ops in fp16.
PIPELINE: list[type[OnnxPass]] = [
    FoldConstants, FuseLayerNorm, FuseGelu, OrtFusions, AttentionCleanup, Quantize, MixedPrecision,
]
ONNX_PASSES: dict[str, type[OnnxPass]] = {p.name: p for p in PIPELINE}
ALL_ONNX_PASSES = tuple(ONNX_PASSES)

Verifier = Callable[[onnx.ModelProto], dict[str, Any]]


class InvalidModelError(OptimizeError):
    """A pass produced a model that fails `onnx.checker` (a kiln bug, reported with the pass)."""


# ONNX Runtime contrib ops that ORT registers in the default ONNX domain, where onnx.checker
# does not know them: onnxscript's RMSNorm fusion (Llama, Qwen2) emits ORT's
# SimplifiedLayerNormalization there, because that is where ORT looks it up.
ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def check_model(model: onnx.ModelProto) -> None:
    """`onnx.checker.check_model`, reading `ORT_DEFAULT_DOMAIN_OPS` as the contrib ops they are
    (ONNX Runtime itself runs every fused graph before it is kept, see `onnx_ort_fusions`).
    Raises `onnx.checker.ValidationError`."""
    if any(n.op_type in ORT_DEFAULT_DOMAIN_OPS and n.domain in ("", "ai.onnx") for n in model.graph.node):
        view = onnx.ModelProto()
        view.CopyFrom(model)
        for node in view.graph.node:
            if node.op_type in ORT_DEFAULT_DOMAIN_OPS and node.domain in ("", "ai.onnx"):
                node.domain = "com.microsoft"
        if not any(o.domain == "com.microsoft" for o in view.opset_import):
            view.opset_import.add(domain="com.microsoft", version=1)
        model = view
    onnx.checker.check_model(model, full_check=False)


def _tidy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop initializers and nodes nothing reads any more (rewrites leave them behind)."""
    Graph(model).prune()
    return model


def run_onnx_passes(
    model: onnx.ModelProto,
    ctx: OnnxPassContext,
    names: Sequence[str] = ALL_ONNX_PASSES,
    verifier: Verifier | None = None,
) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Run the passes of `PIPELINE` named in `names`, in pipeline order; return the final model
    and one result per pass. Raises `AccuracyError` naming the first pass that broke accuracy
    (with `verifier`), `InvalidModelError` when a pass produced an invalid model."""
    unknown = sorted(set(names) - set(ONNX_PASSES))
    if unknown:
        raise ConfigError(f"unknown ONNX pass(es) {', '.join(unknown)}; available: {', '.join(ONNX_PASSES)}")
    tol = ctx.config.tolerance
    results = []
    for cls in PIPELINE:
        if cls.name not in names:
            continue
        p = cls()
        reason = "disabled in config" if not ctx.config.passes.get(p.name, True) else p.applies(ctx)
        if reason:
            results.append(PassResult(p.name, skipped=reason))
            continue
        t0 = time.perf_counter()
        model, matches = p.run(model, ctx)
        model = _tidy(model)
        try:
            check_model(model)
        except onnx.checker.ValidationError as exc:
            raise InvalidModelError(f"ONNX pass {p.name} produced an invalid model: {str(exc).splitlines()[0]}") from exc
        result = PassResult(p.name, matches, time.perf_counter() - t0)
        if verifier is not None and result.total:
            result.accuracy = verifier(model)
            if tol is not None and "max_abs_error" in result.accuracy and not (
                result.accuracy["max_abs_error"] <= tol.max_abs_error and result.accuracy["min_cosine"] >= tol.min_cosine
            ):
                raise AccuracyError(
                    f"ONNX pass {p.name} broke accuracy: max abs error {result.accuracy['max_abs_error']:.3g} "
                    f"(allowed {tol.max_abs_error:.3g}), min cosine {result.accuracy['min_cosine']:.6f} "
                    f"(allowed {tol.min_cosine})"
                )
        results.append(result)
    return model, results


def ort_verifier(ctx: OnnxPassContext) -> Verifier | None:
    """Runs a candidate model with ONNX Runtime (CPU) on the first sample batch and compares it
    with the fp32 eager model; a model ORT cannot run on CPU (e.g. some bf16 ops) is reported,
    not failed — the engine itself is verified after the build either way. It checks the
    rewrites, not low-precision rounding: ORT's CPU provider runs fp16 ops it has no fp16 kernel
    for in fp32 behind inserted casts."""
    if ctx.reference is None or ctx.samples is None or not ctx.samples():
        return None


    feeds = ctx.samples()[0]
    with torch.inference_mode():
        expected = ctx.reference(**feeds)

    def verify(model: onnx.ModelProto) -> dict[str, Any]:
        try:
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            types = {i.name: i.type for i in session.get_inputs()}
            inputs = {k: v.numpy().astype(np.int64 if "int64" in types[k] else v.numpy().dtype) for k, v in feeds.items()}
            got = dict(zip(names, session.run(names, inputs)))
        except Exception as exc:  # ORT raises its own types for unsupported kernels
            return {"skipped": f"ONNX Runtime (CPU) cannot run it: {str(exc).splitlines()[0][:160]}"}
        outputs = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in got.items()}
        stats = compare_real_tokens(feeds, expected, outputs)
        return {"max_abs_error": max(v["max_abs_error"] for v in stats.values()),
                "min_cosine": min(v["min_cosine"] for v in stats.values())}

    return verify


def prepare_onnx(
    program: ExportedProgram,
    ctx: BuildContext,
    workdir: Path,
    passes: Sequence[str] = ALL_ONNX_PASSES,
    options: dict[str, Any] | None = None,
    backend: str = "",
) -> onnx.ModelProto:
    """Export `program` and run `passes` on it; the results go to `ctx.passes` and the passes'
    details to `ctx.record` (both end up in the manifest). Returns the prepared model."""
    model = export_program(program, ctx.inputs, ctx.outputs,
                           model_name=model_family(ctx.source) if ctx.source is not None else "")
    pctx = OnnxPassContext(
        config=ctx.config, inputs=ctx.inputs, outputs=ctx.outputs, backend=backend, workdir=workdir,
        samples=ctx.samples, reference=ctx.reference, reporter=ctx.reporter, options=dict(options or {}),
    )
    verifier = ort_verifier(pctx) if ctx.config.verify_passes else None
    model, results = run_onnx_passes(model, pctx, passes, verifier)
    ctx.passes.extend(results)
    ctx.record.update(pctx.record)
    return model


__all__ = [
    "OnnxPass", "OnnxPassContext", "PIPELINE", "ONNX_PASSES", "ALL_ONNX_PASSES", "run_onnx_passes",
    "prepare_onnx", "export_program", "save_model", "Feeds", "InvalidModelError", "ort_verifier",
]
