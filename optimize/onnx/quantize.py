"""Pass `onnx_quantize`: explicit int8 / fp8 quantization with QuantizeLinear/DequantizeLinear nodes.

Strongly typed engines (TensorRT 10+, TensorRT-RTX) quantize only where the graph has Q/DQ
nodes, and ONNX Runtime's CPU kernels pick up the same Q/DQ graph. Four modes:

- `static` (precision `int8`): every MatMul with a constant weight gets per-channel int8
  weights (symmetric, one scale per output column) and per-tensor int8 activations whose scale
  comes from calibrating on real samples — percentile (99.999th, robust to the few outliers of
  transformer activations), entropy (KL-divergence-optimal threshold, TensorRT's classic
  choice) or min/max. Activation×activation MatMuls (attention scores, probabilities × V) stay
  in float: their ranges vary per input far more than weights' do.
- `weight_only` (precision `int8-weight`, for TensorRT): int8 per-channel weights behind a
  DequantizeLinear, activations untouched; no calibration.
- `dynamic` (precision `int8-weight`, for ONNX Runtime on CPU): ORT's dynamic quantization,
  activations quantized per batch at run time.
- `fp8` (precision `fp8`, for TensorRT on SM89+): the same MatMuls as `static` in FLOAT8E4M3FN
  (E4M3: 3 mantissa bits, largest value 448) — weights per output channel, activations per
  tensor, both with scale = amax / 448 and zero point 0; amax of activations is their max or
  99.999th percentile over the calibration samples' real tokens. Entropy calibration is int8's
  (a threshold over 256 uniform levels) and is refused. Needs ONNX opset 19, where
  QuantizeLinear/DequantizeLinear took float8 types; older graphs are raised to it.

ONNX Runtime's quantization tooling (`quantize_static`, `quantize_dynamic`) does the int8
rewriting (`optimize.onnx.int8`); the calibration data (`optimize.onnx.calibration`), the
choices above and the report are ours. The fp8 rewrite is ours too (`optimize.onnx.fp8`): ORT's
float8 path scales activations by their standard deviation, not their range. When the
calibration samples miss the tolerance, `static` and `fp8` keep the MatMuls whose inputs
quantize worst in float (ranked by signal-to-quantization-noise ratio,
`optimize.onnx.sensitivity`). This module is the pass: it picks the mode and reports.
"""

from __future__ import annotations

from typing import ClassVar

import onnx

from optimize.onnx.base import OnnxPass, OnnxPassContext
from optimize.onnx.calibration import CalibrationError, samples_or_fail
from optimize.onnx.fp8 import FP8_OPSET, check_fp8_calibration, fp8_activation_amax, fp8_qdq, raise_opset
from optimize.onnx.graph import Graph
from optimize.onnx.int8 import quantize_dynamic_int8, quantize_static_int8, weight_only
from optimize.onnx.sensitivity import keep_sensitive


def _weight_matmuls(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Names of MatMul/Gemm nodes with a constant weight, and of the others."""
    g = Graph(model)
    const, activation = [], []
    for node in g.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            (const if g.constant(node.input[1]) is not None else activation).append(node.name)
    return const, activation


def _count_quantized(model: onnx.ModelProto) -> dict[str, int]:
    g = Graph(model)
    matmuls = 0
    for node in g.graph.node:
        if node.op_type in ("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul"):
            producers = [g.producer.get(i) for i in node.input[:2]]
            # A Gemm counts only with a DequantizeLinear input, like a MatMul: fp8 and Q/DQ
            # int8 leave the MatMuls they keep in float as they were.
            if node.op_type in ("MatMulInteger", "QLinearMatMul") or any(
                    p is not None and p.op_type == "DequantizeLinear" for p in producers):
                matmuls += 1
    hist: dict[str, int] = {}
    for node in g.graph.node:
        hist[node.op_type] = hist.get(node.op_type, 0) + 1
    return {
        "matmuls_quantized": matmuls,
        "quantize_nodes": hist.get("QuantizeLinear", 0) + hist.get("DynamicQuantizeLinear", 0),
        "dequantize_nodes": hist.get("DequantizeLinear", 0),
    }


def quantize_fp8(model: onnx.ModelProto, ctx: OnnxPassContext, activations: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """Calibrate the weight MatMuls' inputs and rewrite them to fp8 Q/DQ (see `fp8_qdq`),
    keeping sensitive MatMuls in float (see `keep_sensitive`). Returns the quantized model
    and the names kept in float. Raises `ConfigError` for entropy calibration,
    `CalibrationError` without samples.

    all-MiniLM-L6-v2, all 36 weight MatMuls in fp8: held-out sentence embeddings score
    cosine 0.995–0.998, the calibration samples 0.987 per token, so nothing is kept in float
    at fp8's 0.98. E4M3's rounding error is relative, so every input's SQNR is about the same
    (31.0–33.1 dB there): when the loop does run, its ranking says little."""
    method = ctx.config.calibration_method
    check_fp8_calibration(method)  # before the samples are computed: a config error needs none
    batches = samples_or_fail(ctx, "fp8 calibration")
    record = ctx.record["quantization"]
    record.update({"format": "FLOAT8E4M3FN", "calibration": method, "batches": len(batches),
                   "activations": "fp8 e4m3 per tensor", "weights": "fp8 e4m3 per output channel"})
    model, opset = raise_opset(model, FP8_OPSET)
    if opset:
        record["opset"] = opset
    g = Graph(model)
    inputs = sorted({n.input[0] for n in g.graph.node
                     if n.op_type in ("MatMul", "Gemm") and n.name not in activations})
    try:
        with ctx.progress(f"calibrate fp8 ({method}, {len(batches)} batches)", total=len(batches)) as bar:
            amax = fp8_activation_amax(model, batches, inputs, method, bar)
    except Exception as exc:  # ORT raises its own types when a sample fails
        raise CalibrationError(f"fp8 calibration failed: {str(exc).splitlines()[0]}") from exc
    return keep_sensitive(model, ctx, batches, activations,
                          lambda kept: fp8_qdq(model, amax, set(activations) | set(kept)), "fp8")


class Quantize(OnnxPass):
    name: ClassVar[str] = "onnx_quantize"
    description: ClassVar[str] = "int8 / fp8 (E4M3) Q/DQ: per-channel weights, calibrated per-tensor activations"

    def applies(self, ctx: OnnxPassContext) -> str:
        if not ctx.plan.quantized:
            return f"precision is {ctx.plan.precision}"
        return ""

    def mode(self, ctx: OnnxPassContext) -> str:
        if ctx.plan.fp8:
            return "fp8"
        if ctx.plan.calibrated:
            return "static"
        return str(ctx.options.get("int8_weight_mode", "weight_only"))

    def run(self, model: onnx.ModelProto, ctx: OnnxPassContext) -> tuple[onnx.ModelProto, dict[str, int]]:
        mode = self.mode(ctx)
        _, activations = _weight_matmuls(model)
        ctx.record["quantization"] = {"mode": mode}
        if mode == "weight_only":
            model = weight_only(model)
            return model, {**_count_quantized(model), "activation_matmuls_kept": len(activations)}
        if mode == "fp8":
            model, kept_float = quantize_fp8(model, ctx, activations)
            return model, {**_count_quantized(model), "activation_matmuls_kept": len(activations),
                           "sensitive_matmuls_kept_float": len(kept_float)}
        source, target = ctx.workdir / "float.onnx", ctx.workdir / "quantized.onnx"
        onnx.save_model(model, str(source))
        # ORT ≥1.20 fails on graphs its optimizer touched unless told the default float type
        # ("Unable to find data type for weight_name").
        # Only MatMul inputs are quantized: an int8 output would add a second rounding per MatMul
        # (and on the FFN pre-GELU activations, a wide range) for no speed on these backends.
        extra: dict[str, object] = {"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True,
                                    "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]}
        kept_float: list[str] = []
        if mode == "dynamic":
            quantize_dynamic_int8(source, target, extra)
        else:
            kept_float = quantize_static_int8(model, ctx, source, target, extra, activations)
        quantized = onnx.load_model(str(target))
        for path in ctx.workdir.glob("*.onnx"):
            path.unlink()
        counts = {**_count_quantized(quantized), "activation_matmuls_kept": len(activations)}
        if mode == "static":
            counts["sensitive_matmuls_kept_float"] = len(kept_float)
        return quantized, counts
