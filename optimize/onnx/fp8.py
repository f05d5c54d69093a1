"""fp8 (E4M3) quantization, kiln's own Q/DQ rewrite (ORT's float8 path scales activations by
their standard deviation, not their range): the same MatMuls as int8's static mode in
FLOAT8E4M3FN (3 mantissa bits, largest value 448), weights per output channel, activations per
tensor, both with scale = amax / 448 and zero point 0; amax of activations is their max or
99.999th percentile over the calibration samples' real tokens. Entropy calibration is int8's (a
threshold over 256 uniform levels) and is refused. Needs ONNX opset 19, where
QuantizeLinear/DequantizeLinear took float8 types; older graphs are raised to it. The pass
`onnx_quantize` (`optimize.onnx.quantize`) calibrates and rewrites with these for precision fp8.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import ml_dtypes
import numpy as np
import onnx

from optimize.onnx.base import Feeds, StageProgress
from optimize.onnx.calibration import PERCENTILE, AbsHistogram, real_token_values
from optimize.onnx.graph import Graph, topological_sort
from optimize.runtime.errors import ConfigError, OptimizeError

FP8_CALIBRATION_METHODS = ("minmax", "percentile")
FP8 = onnx.TensorProto.FLOAT8E4M3FN
FP8_MAX = 448.0  # largest finite E4M3FN value, 1.75 × 2^8 (the format has no infinity)
FP8_OPSET = 19  # QuantizeLinear/DequantizeLinear accept float8 types from opset 19 on
FP8_IR_VERSION = 9  # the IR version that added the float8 element types


def to_fp8(x: np.ndarray) -> np.ndarray:
    """`x` rounded to E4M3FN (to nearest, ties to even), saturating at ±448 as QuantizeLinear
    does: ml_dtypes would turn larger magnitudes into NaN."""
    return np.clip(x, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def fp8_weight(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(E4M3FN values, float32 scales) of a 2-D `weight`, one scale per slice along `axis` (the
    output channel): scale = max|slice| / 448, so each slice's largest value maps to 448. An
    all-zero slice gets scale 1."""
    scale = np.abs(weight).max(axis=1 - axis) / np.float32(FP8_MAX)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return to_fp8(weight / np.expand_dims(scale, 1 - axis)), scale


def _add_fp8(g: Graph, value: np.ndarray, hint: str) -> str:
    """Add an E4M3FN initializer, serialized as raw bytes (numpy has no float8 type of its own)."""
    name = g.fresh(hint)
    tensor = onnx.helper.make_tensor(name, FP8, value.shape, value.astype(ml_dtypes.float8_e4m3fn).tobytes(), raw=True)
    g.graph.initializer.append(tensor)
    g.initializers[name] = tensor
    g.types[name] = FP8
    return name


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of `graph`, including those in subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


def raise_opset(model: onnx.ModelProto, version: int) -> tuple[onnx.ModelProto, str]:
    """`model` with a default-domain opset of at least `version`, and what was done ("" when
    nothing was needed). When every op it uses has the same definition at both opsets the opset
    import is just bumped: exact, no node changes. Otherwise onnx's version converter rewrites the
    ops whose definition changed (e.g. Split, whose sizes became an input in opset 18). Raises
    `OptimizeError` when the converter cannot."""
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    current = default[0].version if default else version
    if current >= version:
        return model, ""
    changed = sorted({
        n.op_type for n in _nodes(model.graph) if n.domain in ("", "ai.onnx")
        and onnx.defs.get_schema(n.op_type, current, "").since_version
        != onnx.defs.get_schema(n.op_type, version, "").since_version
    })
    if not changed:
        for opset in default:
            opset.version = version
        note = f"opset {current} → {version} (bumped: no op used changed in between)"
    else:
        try:
            model = onnx.version_converter.convert_version(model, version)
        except Exception as exc:  # the converter raises its C++ errors as plain RuntimeError
            raise OptimizeError(f"fp8 needs ONNX opset {version}; converting the model from opset {current} "
                                f"failed: {str(exc).splitlines()[0]}") from exc
        note = f"opset {current} → {version} (version converter: {', '.join(changed)})"
    model.ir_version = max(model.ir_version, FP8_IR_VERSION)
    return model, note


def fp8_qdq(model: onnx.ModelProto, amax: dict[str, float], exclude: set[str]) -> onnx.ModelProto:
    """A copy of `model` in which every MatMul/Gemm with a constant 2-D fp32 weight, but those
    named in `exclude` and those whose input 0 has no entry in `amax`, computes on E4M3FN
    values: the weight per output channel behind a DequantizeLinear (see `fp8_weight`), input 0
    through a per-tensor QuantizeLinear→DequantizeLinear pair with scale amax / 448. Zero points
    are E4M3FN zeros (they set QuantizeLinear's output type). A tensor read by several MatMuls
    (Q, K and V) gets one pair. The model must be at opset ≥ 19 (see `raise_opset`)."""
    model = copy.deepcopy(model)
    g = Graph(model)
    zero = _add_fp8(g, np.zeros((), np.float32), "fp8_zero_point")
    dequantized: dict[tuple[str, int], str] = {}  # (tensor, weight axis or -1 for activations) → its DQ output
    for node in list(g.graph.node):
        if node.op_type not in ("MatMul", "Gemm") or node.name in exclude or node.input[0] not in amax:
            continue
        weight = g.constant(node.input[1])
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axis = 0 if node.op_type == "Gemm" and attrs.get("transB", 0) else 1  # Gemm(transB) weights are [N, K]
        if (node.input[1], axis) not in dequantized:
            values, scale = fp8_weight(weight, axis)
            inputs = [_add_fp8(g, values, node.input[1] + "_fp8"), g.add_initializer(scale, node.input[1] + "_scale"),
                      _add_fp8(g, np.zeros(scale.shape, np.float32), node.input[1] + "_zero_point")]
            out = g.fresh(node.input[1] + "_dequantized")
            g.graph.node.append(onnx.helper.make_node("DequantizeLinear", inputs, [out],
                                                      name=g.fresh("weight_dequantize"), axis=axis))
            dequantized[node.input[1], axis] = out
        if (node.input[0], -1) not in dequantized:
            x_scale = np.array(amax[node.input[0]] / FP8_MAX if amax[node.input[0]] > 0 else 1.0, np.float32)
            s_name = g.add_initializer(x_scale, node.input[0] + "_scale")
            q, out = g.fresh(node.input[0] + "_fp8"), g.fresh(node.input[0] + "_dequantized")
            g.graph.node.extend([
                onnx.helper.make_node("QuantizeLinear", [node.input[0], s_name, zero], [q], name=g.fresh("quantize")),
                onnx.helper.make_node("DequantizeLinear", [q, s_name, zero], [out], name=g.fresh("dequantize")),
            ])
            dequantized[node.input[0], -1] = out
        node.input[0], node.input[1] = dequantized[node.input[0], -1], dequantized[node.input[1], axis]
    topological_sort(g.graph)
    g.reindex()
    g.prune()
    return model


def check_fp8_calibration(method: str) -> None:
    """Raise `ConfigError` unless `method` can calibrate fp8: entropy calibration picks a
    threshold for 256 uniform levels, which fp8's log-spaced ones are not."""
    if method not in FP8_CALIBRATION_METHODS:
        raise ConfigError(f"calibration_method {method} is for int8; fp8 takes {' or '.join(FP8_CALIBRATION_METHODS)}")


def fp8_activation_amax(model: onnx.ModelProto, batches: list[Feeds], names: list[str], method: str,
                        progress: StageProgress | None = None) -> dict[str, float]:
    """The |x| that fp8's 448 stands for, per named tensor, over the samples' real tokens: the
    largest (`minmax`) or the PERCENTILE-th percentile (`percentile`, see `AbsHistogram`).
    Raises `ConfigError` for another method (see `check_fp8_calibration`)."""
    check_fp8_calibration(method)
    histograms = {name: AbsHistogram() for name in names}
    for feeds, batch in zip(batches, real_token_values(model, batches, names)):
        for name, value in batch.items():
            histograms[name].add(value)
        if progress is not None:
            progress.advance("×".join(str(s) for s in next(iter(feeds.values())).shape))
    return {name: h.max if method == "minmax" else h.percentile(PERCENTILE) for name, h in histograms.items()}



__all__ = ["FP8_MAX", "FP8_OPSET", "fp8_qdq", "fp8_weight", "fp8_activation_amax", "raise_opset", "to_fp8"]
