"""Pass `onnx_quantize`: explicit int8 quantization with QuantizeLinear/DequantizeLinear nodes.

Strongly typed engines (TensorRT 10+, TensorRT-RTX) quantize only where the graph has Q/DQ
nodes, and ONNX Runtime's CPU kernels pick up the same Q/DQ graph. Three modes:

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

ONNX Runtime's quantization tooling (`quantize_static`, `quantize_dynamic`) does the rewriting;
the calibration data, the choices above and the report are ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

from optimize.onnx.base import Feeds, OnnxPass, OnnxPassContext
from optimize.onnx.calibration import ORT_METHODS, CalibrationError, SampleReader, samples_or_fail
from optimize.onnx.graph import Graph, topological_sort

# Percentile of |activation| taken as the int8 range in `percentile` calibration: clips the
# rare outliers (0.001% of values) instead of stretching the scale for them.
PERCENTILE = 99.999
# At most this share of weight MatMuls is kept in float when int8 misses the tolerance: beyond
# it int8 is not worth having, and the engine's own verification rejects it.
MAX_FLOAT_FRACTION = 1 / 3
SENSITIVITY_BATCHES = 4  # sample batches the SQNR ranking is measured on
MODES = ("static", "weight_only", "dynamic")


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
            if node.op_type != "MatMul" or any(p is not None and p.op_type == "DequantizeLinear" for p in producers):
                matmuls += 1
    hist: dict[str, int] = {}
    for node in g.graph.node:
        hist[node.op_type] = hist.get(node.op_type, 0) + 1
    return {
        "matmuls_quantized": matmuls,
        "quantize_nodes": hist.get("QuantizeLinear", 0) + hist.get("DynamicQuantizeLinear", 0),
        "dequantize_nodes": hist.get("DequantizeLinear", 0),
    }


def weight_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each MatMul's constant [K, N] weight by DequantizeLinear(int8 weight, per-column
    scale): symmetric, zero point 0, scale = max|W[:, n]| / 127."""
    g = Graph(model)
    for node in list(g.graph.node):
        if node.op_type != "MatMul":
            continue
        weight = g.constant(node.input[1])
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
            continue
        scale = np.abs(weight).max(axis=0) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        quantized = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
        q_name = g.add_initializer(quantized, node.input[1] + "_int8")
        s_name = g.add_initializer(scale, node.input[1] + "_scale")
        out = g.fresh(node.input[1] + "_dequantized")
        g.graph.node.append(onnx.helper.make_node("DequantizeLinear", [q_name, s_name], [out],
                                                  name=g.fresh("weight_dequantize"), axis=1))
        node.input[1] = out
    topological_sort(g.graph)
    g.reindex()
    g.prune()
    return model


def activation_sqnr(model: onnx.ModelProto, batches: list[Feeds], names: list[str], symmetric: bool) -> dict[str, float]:
    """Signal-to-quantization-noise ratio (dB) of each named activation under per-tensor int8,
    over the samples' real tokens (positions where `attention_mask` is 0 are left out). Low
    values flag activations with outliers — all-MiniLM-L6-v2's GELU outputs in the first layers
    score 15–20 dB where the others score 21–34 — whose MatMuls are the sensitive ones."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in session.get_inputs()}
    values: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feeds in batches:
        inputs = {k: v.numpy().astype(np.int64 if "int64" in types[k] else v.numpy().dtype)
                  for k, v in feeds.items() if k in types}
        mask = feeds["attention_mask"].numpy().astype(bool) if "attention_mask" in feeds else None
        for name, value in zip(names, session.run(names, inputs)):
            if mask is not None and value.ndim >= 2 and value.shape[:2] == mask.shape:
                value = value[mask]
            values[name].append(value.reshape(-1))
    sqnr = {}
    for name, parts in values.items():
        x = np.concatenate(parts).astype(np.float64)
        if symmetric:
            step = max(float(np.percentile(np.abs(x), PERCENTILE)), 1e-12) / 127
            q = np.clip(np.round(x / step), -127, 127) * step
        else:
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            step = max(hi - lo, 1e-12) / 255
            zero = np.round(-lo / step)
            q = (np.clip(np.round(x / step) + zero, 0, 255) - zero) * step
        noise = float(((x - q) ** 2).sum())
        sqnr[name] = 10 * np.log10(float((x**2).sum()) / noise) if noise > 0 else float("inf")
    return sqnr


def _score(model_path: Path, batches: list[Feeds], reference: Any) -> tuple[float, float]:
    """(max abs error, min cosine) of a quantized model against the fp32 eager reference."""
    import onnxruntime as ort
    import torch

    from optimize.verify import compare_real_tokens

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    types = {i.name: i.type for i in session.get_inputs()}
    worst_err, worst_cos = 0.0, 1.0
    for feeds in batches:
        inputs = {k: v.numpy().astype(np.int64 if "int64" in types[k] else v.numpy().dtype)
                  for k, v in feeds.items() if k in types}
        got = {k: torch.from_numpy(v) for k, v in zip(names, session.run(names, inputs))}
        with torch.inference_mode():
            want = reference(**feeds)
        for stats in compare_real_tokens(feeds, want, got).values():
            worst_err = max(worst_err, stats["max_abs_error"])
            worst_cos = min(worst_cos, stats["min_cosine"])
    return worst_err, worst_cos


class Quantize(OnnxPass):
    name: ClassVar[str] = "onnx_quantize"
    description: ClassVar[str] = "int8 Q/DQ: per-channel weights, calibrated per-tensor activations"

    def applies(self, ctx: OnnxPassContext) -> str:
        if ctx.config.precision not in ("int8", "int8-weight"):
            return f"precision is {ctx.config.precision}"
        return ""

    def mode(self, ctx: OnnxPassContext) -> str:
        if ctx.config.precision == "int8":
            return "static"
        return str(ctx.options.get("int8_weight_mode", "weight_only"))

    def run(self, model: onnx.ModelProto, ctx: OnnxPassContext) -> tuple[onnx.ModelProto, dict[str, int]]:
        mode = self.mode(ctx)
        _, activations = _weight_matmuls(model)
        ctx.record["quantization"] = {"mode": mode}
        if mode == "weight_only":
            model = weight_only(model)
            return model, {**_count_quantized(model), "activation_matmuls_kept": len(activations)}
        source, target = ctx.workdir / "float.onnx", ctx.workdir / "quantized.onnx"
        onnx.save_model(model, str(source))
        # ORT ≥1.20 fails on graphs its optimizer touched unless told the default float type
        # ("Unable to find data type for weight_name", FIELD_NOTES).
        # Only MatMul inputs are quantized: an int8 output would add a second rounding per MatMul
        # (and on the FFN pre-GELU activations, a wide range) for no speed on these backends.
        extra: dict[str, object] = {"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True,
                                    "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]}
        kept_float: list[str] = []
        if mode == "dynamic":
            quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                             weight_type=QuantType.QInt8, extra_options=extra)
        else:
            kept_float = self._static(model, ctx, source, target, extra, activations)
        quantized = onnx.load_model(str(target))
        for path in ctx.workdir.glob("*.onnx"):
            path.unlink()
        counts = {**_count_quantized(quantized), "activation_matmuls_kept": len(activations)}
        if mode == "static":
            counts["sensitive_matmuls_kept_float"] = len(kept_float)
        return quantized, counts

    def _static(self, model: onnx.ModelProto, ctx: OnnxPassContext, source: Path, target: Path,
                extra: dict[str, object], activations: list[str]) -> list[str]:
        """Calibrate and quantize; while the result misses the tolerance on the calibration
        samples, keep the MatMuls whose inputs quantize worst (lowest SQNR) in float — 1, 2, 4,
        ... inputs, up to `MAX_FLOAT_FRACTION` of the MatMuls. Returns the names kept in float.

        all-MiniLM-L6-v2, uint8 activations: held-out sentences score cosine 0.981 with every
        MatMul in int8, 0.989 with the 6 worst inputs in float; very short inputs ("Thanks!")
        are the hard case (0.925 with all in int8): per-tensor scales come from longer ones."""
        batches = samples_or_fail(ctx, "int8 calibration")
        method = ctx.config.calibration_method
        # TensorRT takes only symmetric int8 (zero point 0); CPUs run uint8 activations × int8
        # weights fastest (x86 u8s8 kernels).
        symmetric = ctx.options.get("int8_activations", "int8") == "int8"
        extra.update({
            "ActivationSymmetric": symmetric,
            "WeightSymmetric": True,
            "CalibPercentile": PERCENTILE,
            "CalibStridedMinMax": 1,  # one batch per collection: see SampleReader.set_range
        })
        record = ctx.record["quantization"]
        record.update({"calibration": method, "batches": len(batches),
                       "activations": "int8 symmetric" if symmetric else "uint8 asymmetric"})
        cache = ctx.workdir / "calibration.json"  # ranges are computed once, reused per attempt
        g = Graph(model)
        by_input: dict[str, list[str]] = {}
        for node in g.graph.node:
            if node.op_type in ("MatMul", "Gemm") and node.name not in activations:
                by_input.setdefault(node.input[0], []).append(node.name)
        ranking: list[tuple[float, str]] = []
        tol = ctx.config.tolerance
        kept: list[str] = []
        limit = int(len(sum(by_input.values(), [])) * MAX_FLOAT_FRACTION)
        while True:
            try:
                with ctx.progress(f"calibrate int8 ({method}, {len(batches)} batches)" if not cache.exists()
                                  else f"quantize, {len(kept)} sensitive MatMuls in float", total=len(batches)) as bar:
                    quantize_static(
                        str(source), str(target), SampleReader(batches, model, bar), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                        reduce_range=bool(ctx.options.get("int8_reduce_range", False)),
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=ORT_METHODS[method],
                        nodes_to_exclude=activations + kept, extra_options=extra, calibration_cache_path=str(cache),
                    )
            except Exception as exc:  # ORT raises its own types when a sample fails
                raise CalibrationError(f"int8 calibration failed: {str(exc).splitlines()[0]}") from exc
            if ctx.reference is None or tol is None or not ctx.options.get("int8_keep_sensitive", True):
                break
            err, cos = _score(target, batches, ctx.reference)
            record["calibration_samples_accuracy"] = {"max_abs_error": err, "min_cosine": cos}
            if (err <= tol.max_abs_error and cos >= tol.min_cosine) or len(kept) >= limit:
                break
            if not ranking:
                sqnr = activation_sqnr(model, batches[:SENSITIVITY_BATCHES], sorted(by_input), symmetric)
                ranking = sorted((db, name) for name, db in sqnr.items())
                record["activation_sqnr_db"] = {name: round(float(db), 1) for db, name in ranking}
            # Double the number of float inputs per attempt: a handful of re-quantizations at most.
            for _ in range(max(1, len({t for t in by_input if set(by_input[t]) <= set(kept)}))):
                if ranking:
                    kept += by_input[ranking.pop(0)[1]]
        record["kept_float"] = kept
        return kept

