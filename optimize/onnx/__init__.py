"""The ONNX path: export the captured program, then prepare the graph for an ONNX-consuming
backend (TensorRT, ONNX Runtime, OpenVINO) with small passes, one module each, that report what
they matched. The build (`optimize.build`) runs both steps as stages of their own, before the
backend builds from the prepared model.

The passes are the ONNX stage of the pass order (`optimize.passes.order`, where they are
registered); a backend names the ones it takes (`Backend.passes`), a pass skips itself when it
does not apply (e.g. mixed precision at fp32), and `CompileConfig.passes` turns any of them off
by name. With `CompileConfig.verify_passes` the
model is run by ONNX Runtime after every pass that changed something and compared with the fp32
eager model, so the first pass that breaks accuracy is named.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
import onnxruntime as ort

from optimize.onnx.base import Feeds, OnnxPass, OnnxPassContext
from optimize.onnx.export import export_program, save_model
from optimize.onnx.graph import Graph
from optimize.passes.base import ONNX, PassResult
from optimize.passes import order
from optimize.runtime.errors import ConfigError, OptimizeError
from optimize.verify import compare_real_tokens

if TYPE_CHECKING:
    from optimize.backends.base import BuildContext

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
    names: Iterable[str] | None = None,
    verifier: Verifier | None = None,
) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Run the ONNX passes named in `names` (None: all; old names accepted), in the pass order;
    return the final model and one result per pass named. Raises `AccuracyError` naming the
    first pass that broke accuracy (with `verifier`), `InvalidModelError` when a pass produced
    an invalid model."""
    available = order.names(ONNX)
    wanted = set(available) if names is None else {order.RENAMED.get(n, n) for n in names}
    unknown = sorted(wanted - set(available))
    if unknown:
        raise ConfigError(f"unknown ONNX pass(es) {', '.join(unknown)}; available: {', '.join(available)}")

    def apply(p: OnnxPass, model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
        model, matches = p.run(model, ctx)
        model = _tidy(model)
        try:
            check_model(model)
        except onnx.checker.ValidationError as exc:
            raise InvalidModelError(f"ONNX pass {p.name} produced an invalid model: {str(exc).splitlines()[0]}") from exc
        return model, matches

    model, results = order.run_stage(ONNX, model, ctx, apply, wanted, verifier, ctx.config.tolerance,
                                     label="ONNX pass")
    return model, [r for r in results if r.name in wanted]


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


def run_onnx_stage(
    model: onnx.ModelProto,
    ctx: BuildContext,
    workdir: Path,
    allowed: Iterable[str],
    options: dict[str, Any],
    backend: str,
) -> tuple[onnx.ModelProto, list[PassResult]]:
    """The ONNX stage of one build: run the ONNX passes among `allowed` (the backend's passes)
    over the exported `model` with the backend's pass `options`, verified pass by pass when the
    config asks; the passes' details go to `ctx.record` (the manifest's `build`). `workdir` is
    scratch space for the calibrators. Returns the prepared model and the passes' results."""
    pctx = OnnxPassContext(
        config=ctx.config, inputs=ctx.inputs, outputs=ctx.outputs, backend=backend, workdir=workdir,
        samples=ctx.samples, reference=ctx.reference, reporter=ctx.reporter, options=dict(options),
        plan=ctx.plan,
    )
    verifier = ort_verifier(pctx) if ctx.config.verify_passes else None
    stage = set(order.names(ONNX))
    model, results = run_onnx_passes(model, pctx, [n for n in allowed if n in stage], verifier)
    ctx.record.update(pctx.record)
    return model, results


__all__ = [
    "OnnxPass", "OnnxPassContext", "run_onnx_passes", "run_onnx_stage", "export_program", "save_model", "Feeds",
    "InvalidModelError", "ort_verifier",
]
