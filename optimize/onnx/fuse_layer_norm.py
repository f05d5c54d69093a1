"""Pass `onnx_fuse_layer_norm`: decomposed layer norms → the standard `LayerNormalization` op.

Graphs from older exporters or hand-written norms spell a layer norm as ReduceMean, Sub, Pow,
ReduceMean, Add(eps), Sqrt, Div, Mul, Add. One `LayerNormalization` (opset 17) computes the same
with its statistics in fp32 (`stash_type`), which is what keeps it from overflowing in fp16
engines (NVIDIA/TensorRT#2564), and lets every backend use its fused kernel. The patterns are
onnxscript's (`rules.fusion._layer_norm`), matched with commuted operands.
"""

from __future__ import annotations

from typing import ClassVar

import onnx
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.fusion import _layer_norm

from optimize.onnx.base import OnnxPass, OnnxPassContext
from optimize.onnx.graph import op_histogram

MIN_OPSET = 17  # LayerNormalization was added in opset 17


def model_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


class FuseLayerNorm(OnnxPass):
    name: ClassVar[str] = "onnx_fuse_layer_norm"
    description: ClassVar[str] = "decomposed layer norms → LayerNormalization (opset 17)"

    def run(self, model: onnx.ModelProto, ctx: OnnxPassContext) -> tuple[onnx.ModelProto, dict[str, int]]:
        if model_opset(model) < MIN_OPSET:
            return model, {"layernorm": 0}
        before = op_histogram(model).get("LayerNormalization", 0)
        graph = ir.from_proto(model)
        rules = pattern.RewriteRuleSet(_layer_norm.layer_normalization_rules, commute=True)
        if not rules.apply_to_model(graph):
            return model, {"layernorm": 0}
        fused = ir.to_proto(graph)
        return fused, {"layernorm": op_histogram(fused).get("LayerNormalization", 0) - before}

