"""Pass `onnx_ort_fusions`: ONNX Runtime's transformer fusions (contrib ops, ORT only).

onnxscript's `ort_fusions` — written for graphs from the dynamo exporter, which is what kiln
exports — fuse attention into `com.microsoft.Attention`/`MultiHeadAttention`, residual + norm
into `SkipLayerNormalization` and bias + GELU into `BiasGelu`. (`onnxruntime.transformers`'
optimizer targets TorchScript exports and, on ours, fuses little: measured here it only found
the GELUs.) all-MiniLM-L6-v2 fp32, batch 8 × seq 128, 2 threads, ORT 1.32 on the 2-core CI CPU:
90 ms plain, 70 ms fused.

Runs only for the onnxruntime backend, before `onnx_attention` (which would otherwise rewrite
the attention pattern these fusions look for). The rules are written for encoder graphs; on
others they can emit a graph ONNX Runtime rejects (GPT-2: a `Gemm` over a 3-D input), so the
fused graph must run once at a small shape before it replaces the original.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnxscript.rewriter.ort_fusions import optimize_for_ort
import onnxruntime as ort

from optimize.onnx.base import OnnxPass, OnnxPassContext
from optimize.sources.base import random_like_spec


class OrtFusions(OnnxPass):
    name: ClassVar[str] = "onnx_ort_fusions"
    description: ClassVar[str] = "ONNX Runtime contrib-op fusions: Attention, SkipLayerNormalization, BiasGelu"

    def applies(self, ctx: OnnxPassContext) -> str:
        if ctx.backend != "onnxruntime":
            return "contrib ops run only on ONNX Runtime"
        if not ctx.options.get("ort_fusions", True):
            return "off (backend option ort_fusions)"
        return ""

    def run(self, model: onnx.ModelProto, ctx: OnnxPassContext) -> tuple[onnx.ModelProto, dict[str, int]]:
        fused, counts = optimize_for_ort(ir.from_proto(copy.deepcopy(model)))  # `model` stays intact
        fused_proto = ir.to_proto(fused)
        failure = _run_failure(fused_proto, ctx)
        if failure:
            ctx.record["onnx_ort_fusions"] = f"fused graph rejected, original kept: {failure}"
            return model, {"rejected": 1}
        return fused_proto, {k: int(v) for k, v in counts.items() if v}


def _run_failure(model: onnx.ModelProto, ctx: OnnxPassContext) -> str:
    """Why ONNX Runtime cannot run `model` on small random inputs ("" when it can)."""
    sizes = {d.name: max(d.min, min(2, d.max)) for spec in ctx.inputs for d in spec.dims}
    generator = torch.Generator().manual_seed(0)
    feeds = {spec.name: random_like_spec(spec, spec.concrete(sizes), generator).numpy() for spec in ctx.inputs}
    if "attention_mask" in feeds:
        feeds["attention_mask"] = np.ones_like(feeds["attention_mask"])
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the failure is reported in the pass record, not logged
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        session.run(None, {k: v for k, v in feeds.items() if k in wanted})
    except Exception as exc:  # ORT raises its own exception types for invalid graphs
        return str(exc).splitlines()[0][:300]
    return ""
