"""Pass `onnx_ort_fusions`: ONNX Runtime's transformer fusions (contrib ops, ORT only).

onnxscript's `ort_fusions` — written for graphs from the dynamo exporter, which is what kiln
exports — fuse attention into `com.microsoft.Attention`/`MultiHeadAttention`, residual + norm
into `SkipLayerNormalization` and bias + GELU into `BiasGelu`. (`onnxruntime.transformers`'
optimizer targets TorchScript exports and, on ours, fuses little: measured here it only found
the GELUs.) all-MiniLM-L6-v2 fp32, batch 8 × seq 128, 2 threads, ORT 1.32 on the 2-core CI CPU:
90 ms plain, 70 ms fused.

Runs only for the onnxruntime backend, before `onnx_attention` (which would otherwise rewrite
the attention pattern these fusions look for).
"""

from __future__ import annotations

from typing import ClassVar

import onnx
import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from optimize.onnx.base import OnnxPass, OnnxPassContext


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
        fused, counts = optimize_for_ort(ir.from_proto(model))
        return ir.to_proto(fused), {k: int(v) for k, v in counts.items() if v}
