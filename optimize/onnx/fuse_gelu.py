"""Pass `onnx_fuse_gelu`: decomposed GELUs → the standard `Gelu` op (opset 20).

Exporters below opset 20 spell GELU as Div/Erf/Add/Mul (exact) or Pow/Mul/Add/Tanh/Mul (tanh
approximation). The patterns below are onnxscript's GELU patterns (`ort_fusions/gelu.py`,
`erfgelu.py`) but rewritten to the standard `Gelu` instead of ONNX Runtime's contrib op, so
TensorRT and OpenVINO can take the result too. A model below opset 20 is first upgraded with
ONNX's version converter — only when the upgrade lets something fuse.
"""

from __future__ import annotations

import math
from typing import ClassVar

import onnx
import onnx_ir as ir
from onnx import version_converter
from onnxscript.rewriter import pattern

from optimize.onnx.base import OnnxPass, OnnxPassContext
from optimize.onnx.fuse_layer_norm import model_opset

GELU_OPSET = 20
_SQRT_TWO = math.sqrt(2.0)
_SQRT_TWO_OVER_PI = math.sqrt(2.0 / math.pi)


def _erf_a(op, x):  # 0.5 * (x * (erf(x / sqrt2) + 1))
    return 0.5 * (x * (op.Erf(x / _SQRT_TWO) + 1.0))


def _erf_b(op, x):  # x * (0.5 * (erf(x / sqrt2) + 1)) — torch's exporter below opset 20
    return x * (0.5 * (op.Erf(x / _SQRT_TWO) + 1.0))


def _erf_c(op, x):  # (x * (erf(x / sqrt2) + 1)) * 0.5
    return (x * (op.Erf(x / _SQRT_TWO) + 1.0)) * 0.5


def _erf_d(op, x):  # x * 0.5 * (1 + erf(x * (1 / sqrt2)))
    return (x * 0.5) * (op.Erf(x * (1.0 / _SQRT_TWO)) + 1.0)


def _tanh_inner(op, x):
    return op.Tanh(_SQRT_TWO_OVER_PI * (x + 0.044715 * op.Pow(x, 3.0))) + 1.0


def _tanh_a(op, x):  # x * (0.5 * (tanh(...) + 1))
    return x * (0.5 * _tanh_inner(op, x))


def _tanh_b(op, x):  # 0.5 * x * (tanh(...) + 1)
    return (0.5 * x) * _tanh_inner(op, x)


def _gelu(op, x):
    return op.Gelu(x)


def _gelu_tanh(op, x):
    return op.Gelu(x, approximate="tanh")


_ERF_RULES = [pattern.RewriteRule(p, _gelu, name=f"gelu_erf_{p.__name__[-1]}") for p in (_erf_a, _erf_b, _erf_c, _erf_d)]
_TANH_RULES = [pattern.RewriteRule(p, _gelu_tanh, name=f"gelu_tanh_{p.__name__[-1]}") for p in (_tanh_a, _tanh_b)]


def _count(model: onnx.ModelProto) -> dict[str, int]:
    counts = {"gelu_erf": 0, "gelu_tanh": 0}
    for node in model.graph.node:
        if node.op_type == "Gelu" and node.domain in ("", "ai.onnx"):
            tanh = any(a.name == "approximate" and a.s == b"tanh" for a in node.attribute)
            counts["gelu_tanh" if tanh else "gelu_erf"] += 1
    return counts


class FuseGelu(OnnxPass):
    name: ClassVar[str] = "onnx_fuse_gelu"
    description: ClassVar[str] = "decomposed GELUs (erf and tanh forms) → Gelu (opset 20)"

    def run(self, model: onnx.ModelProto, ctx: OnnxPassContext) -> tuple[onnx.ModelProto, dict[str, int]]:
        before = _count(model)
        candidate = model
        if model_opset(model) < GELU_OPSET:
            if not any(n.op_type in ("Erf", "Tanh") for n in model.graph.node):
                return model, {k: 0 for k in before}
            candidate = version_converter.convert_version(model, GELU_OPSET)
        graph = ir.from_proto(candidate)
        rules = pattern.RewriteRuleSet(_ERF_RULES + _TANH_RULES, commute=True)
        if not rules.apply_to_model(graph):
            return model, {k: 0 for k in before}
        fused = ir.to_proto(graph)
        after = _count(fused)
        counts = {k: after[k] - before[k] for k in after}
        if candidate is not model:
            counts["opset_upgraded"] = 1
        return fused, counts

