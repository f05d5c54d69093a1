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
rewriting; the calibration data, the choices above and the report are ours. The fp8 rewrite is
ours too: ORT's float8 path scales activations by their standard deviation, not their range.
When the calibration samples miss the tolerance, `static` and `fp8` keep the MatMuls whose
inputs quantize worst in float (ranked by signal-to-quantization-noise ratio).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
import onnxruntime as ort
import torch

from optimize.onnx.base import Feeds, OnnxPass, OnnxPassContext, StageProgress
from optimize.onnx.calibration import ORT_METHODS, CalibrationError, SampleReader, samples_or_fail
from optimize.onnx.graph import Graph, topological_sort
from optimize.runtime.errors import ConfigError, OptimizeError
from optimize.verify import compare_real_tokens

# Percentile of |activation| taken as the int8 range in `percentile` calibration: clips the
# rare outliers (0.001% of values) instead of stretching the scale for them.
PERCENTILE = 99.999
# At most this share of weight MatMuls is kept in float when int8 misses the tolerance: beyond
# it int8 is not worth having, and the engine's own verification rejects it. all-MiniLM-L6-v2
# under ORT static uint8 needs 8 of its 18 (after the attention pass fuses Q, K and V) to reach
# cosine 0.99 on held-out sentences; a third (6) leaves it at 0.988.
MAX_FLOAT_FRACTION = 1 / 2
SENSITIVITY_BATCHES = 4  # sample batches the SQNR ranking is measured on
MODES = ("static", "weight_only", "dynamic", "fp8")
SQNR_FORMATS = ("int8", "uint8", "fp8")
FP8_CALIBRATION_METHODS = ("minmax", "percentile")

FP8 = onnx.TensorProto.FLOAT8E4M3FN
FP8_MAX = 448.0  # largest finite E4M3FN value, 1.75 × 2^8 (the format has no infinity)
FP8_OPSET = 19  # QuantizeLinear/DequantizeLinear accept float8 types from opset 19 on
FP8_IR_VERSION = 9  # the IR version that added the float8 element types
# |activation| histograms for fp8 calibration: log2-spaced bins, HIST_BINS_PER_OCTAVE per
# doubling over [2^HIST_MIN_EXP, 2^HIST_MAX_EXP]. A percentile comes out at most a factor
# 2^(1/64) (1.1%) above the exact one, a sixth of E4M3's finest relative step (2^-3 / 1.75), in
# memory that does not grow with the number of samples.
HIST_MIN_EXP, HIST_MAX_EXP, HIST_BINS_PER_OCTAVE = -32, 32, 64


@contextlib.contextmanager
def ort_quiet() -> Iterator[None]:
    """ONNX Runtime's quantization tools log advice ("Please consider to run pre-processing
    before quantization") on the root logger and print each calibration step: noise in kiln's
    progress display, dropped while they run."""

    def not_advice(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider")

    root = logging.getLogger()
    root.addFilter(not_advice)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(not_advice)


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


class AbsHistogram:
    """Counts of |x| in log2-spaced bins (see `HIST_BINS_PER_OCTAVE`) and the largest |x|: high
    percentiles of more activation values than memory holds."""

    def __init__(self) -> None:
        # bin 0 holds |x| < 2^HIST_MIN_EXP (zeros among them); the last also holds larger values
        self.counts = np.zeros((HIST_MAX_EXP - HIST_MIN_EXP) * HIST_BINS_PER_OCTAVE + 1, np.int64)
        self.max = 0.0

    def add(self, x: np.ndarray) -> None:
        magnitude = np.abs(x.astype(np.float32, copy=False)).reshape(-1)
        if not magnitude.size:
            return
        self.max = max(self.max, float(magnitude.max()))
        with np.errstate(divide="ignore"):
            position = (np.log2(magnitude) - HIST_MIN_EXP) * HIST_BINS_PER_OCTAVE
        bins = np.clip(np.floor(position) + 1, 0, len(self.counts) - 1).astype(np.int64)
        self.counts += np.bincount(bins, minlength=len(self.counts))

    def percentile(self, q: float) -> float:
        """The upper edge of the bin holding the `q`-th percentile, capped at the largest |x|
        seen: at most one bin (1.1%) above the exact value. "Exact" is the smallest |x| with at
        least q% of the values at or below it (numpy's `inverted_cdf` method); in a sparse tail
        (99.999% of 10^5 values) the interpolating default can lie a few % lower."""
        total = int(self.counts.sum())
        if not total:
            return 0.0
        k = int(np.searchsorted(np.cumsum(self.counts), q / 100 * total))
        return min(self.max, 2.0 ** (HIST_MIN_EXP + k / HIST_BINS_PER_OCTAVE))


def real_token_values(model: onnx.ModelProto, batches: list[Feeds],
                      names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Per sample batch, the values of the named tensors of `model` (run by ONNX Runtime on CPU)
    at real tokens, flattened: positions where `attention_mask` is 0 (padding) are left out."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in session.get_inputs()}
    for feeds in batches:
        inputs = {k: v.numpy().astype(np.int64 if "int64" in types[k] else v.numpy().dtype)
                  for k, v in feeds.items() if k in types}
        mask = feeds["attention_mask"].numpy().astype(bool) if "attention_mask" in feeds else None
        values = {}
        for name, value in zip(names, session.run(names, inputs)):
            if mask is not None and value.ndim >= 2 and value.shape[:2] == mask.shape:
                value = value[mask]
            values[name] = value.reshape(-1)
        yield values


def _fake_quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """`x` quantized per tensor and back: symmetric `int8` and `fp8` (E4M3) scaled to the
    PERCENTILE-th percentile of |x|, asymmetric `uint8` to [min, max]."""
    if fmt == "uint8":
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        step = max(hi - lo, 1e-12) / 255
        zero = np.round(-lo / step)
        return (np.clip(np.round(x / step) + zero, 0, 255) - zero) * step
    amax = max(float(np.percentile(np.abs(x), PERCENTILE)), 1e-12)
    if fmt == "fp8":
        scale = amax / FP8_MAX
        return to_fp8(x / scale).astype(np.float64) * scale
    step = amax / 127
    return np.clip(np.round(x / step), -127, 127) * step


def activation_sqnr(model: onnx.ModelProto, batches: list[Feeds], names: list[str],
                    fmt: str = "int8") -> dict[str, float]:
    """Signal-to-quantization-noise ratio (dB) of each named activation under per-tensor
    quantization to `fmt` ("int8" symmetric, "uint8" asymmetric or "fp8" E4M3), over the
    samples' real tokens (see `real_token_values`). Low values flag activations with outliers —
    all-MiniLM-L6-v2's GELU outputs in the first layers score 15–20 dB in int8 where the others
    score 21–34 — whose MatMuls are the sensitive ones. Raises `ValueError` for another `fmt`."""
    if fmt not in SQNR_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(SQNR_FORMATS)}; got {fmt!r}")
    values: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in real_token_values(model, batches, names):
        for name, value in batch.items():
            values[name].append(value)
    sqnr = {}
    for name, parts in values.items():
        x = np.concatenate(parts).astype(np.float64)
        noise = float(((x - _fake_quantize(x, fmt)) ** 2).sum())
        sqnr[name] = 10 * np.log10(float((x**2).sum()) / noise) if noise > 0 else float("inf")
    return sqnr


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


def _score(model: Path | onnx.ModelProto, batches: list[Feeds], reference: Any) -> tuple[float, float]:
    """(max abs error, min cosine) of a quantized model (a file or in memory) against the fp32
    eager reference."""

    session = ort.InferenceSession(str(model) if isinstance(model, Path) else model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
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
    description: ClassVar[str] = "int8 / fp8 (E4M3) Q/DQ: per-channel weights, calibrated per-tensor activations"

    def applies(self, ctx: OnnxPassContext) -> str:
        if ctx.config.precision not in ("int8", "int8-weight", "fp8"):
            return f"precision is {ctx.config.precision}"
        return ""

    def mode(self, ctx: OnnxPassContext) -> str:
        if ctx.config.precision == "int8":
            return "static"
        if ctx.config.precision == "fp8":
            return "fp8"
        return str(ctx.options.get("int8_weight_mode", "weight_only"))

    def run(self, model: onnx.ModelProto, ctx: OnnxPassContext) -> tuple[onnx.ModelProto, dict[str, int]]:
        mode = self.mode(ctx)
        _, activations = _weight_matmuls(model)
        ctx.record["quantization"] = {"mode": mode}
        if mode == "weight_only":
            model = weight_only(model)
            return model, {**_count_quantized(model), "activation_matmuls_kept": len(activations)}
        if mode == "fp8":
            model, kept_float = self._fp8(model, ctx, activations)
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
            with ort_quiet():
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
        """Calibrate and quantize to int8 with ORT's `quantize_static`, keeping sensitive MatMuls
        in float (see `_keep_sensitive`); returns the names kept in float.

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
        ctx.record["quantization"].update({"calibration": method, "batches": len(batches),
                                           "activations": "int8 symmetric" if symmetric else "uint8 asymmetric"})
        cache = ctx.workdir / "calibration.json"  # ranges are computed once, reused per attempt

        def attempt(kept: list[str]) -> Path:
            try:
                with ctx.progress(f"calibrate int8 ({method}, {len(batches)} batches)" if not cache.exists()
                                  else f"quantize, {len(kept)} sensitive MatMuls in float", total=len(batches)) as bar, \
                        ort_quiet():
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
            return target

        _, kept = self._keep_sensitive(model, ctx, batches, activations, attempt, "int8" if symmetric else "uint8")
        return kept

    def _fp8(self, model: onnx.ModelProto, ctx: OnnxPassContext,
             activations: list[str]) -> tuple[onnx.ModelProto, list[str]]:
        """Calibrate the weight MatMuls' inputs and rewrite them to fp8 Q/DQ (see `fp8_qdq`),
        keeping sensitive MatMuls in float (see `_keep_sensitive`). Returns the quantized model
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
        return self._keep_sensitive(model, ctx, batches, activations,
                                    lambda kept: fp8_qdq(model, amax, set(activations) | set(kept)), "fp8")

    def _keep_sensitive(self, model: onnx.ModelProto, ctx: OnnxPassContext, batches: list[Feeds],
                        activations: list[str], attempt: Callable[[list[str]], Any], fmt: str) -> tuple[Any, list[str]]:
        """Quantize with `attempt(kept)` (the MatMuls named in `kept` stay in float; it returns
        the model or its file); while the result misses the tolerance on the calibration samples,
        keep the MatMuls whose inputs quantize worst in `fmt` (lowest SQNR) in float — 1, 2, 4,
        ... inputs, up to `MAX_FLOAT_FRACTION` of the MatMuls. Returns the last result (which may
        still miss the tolerance: the engine's verification judges it) and the names kept in
        float (also in the record's `kept_float`)."""
        g = Graph(model)
        by_input: dict[str, list[str]] = {}
        for node in g.graph.node:
            if node.op_type in ("MatMul", "Gemm") and node.name not in activations:
                by_input.setdefault(node.input[0], []).append(node.name)
        record = ctx.record["quantization"]
        ranking: list[str] | None = None  # inputs, worst first; measured on the first miss
        tol = ctx.config.tolerance
        kept: list[str] = []
        inputs_kept = 0
        limit = int(sum(len(names) for names in by_input.values()) * MAX_FLOAT_FRACTION)
        while True:
            result = attempt(kept)
            if ctx.reference is None or tol is None or not ctx.options.get("int8_keep_sensitive", True):
                break
            err, cos = _score(result, batches, ctx.reference)
            record["calibration_samples_accuracy"] = {"max_abs_error": err, "min_cosine": cos}
            if err <= tol.max_abs_error and cos >= tol.min_cosine:
                break
            if ranking is None:
                sqnr = activation_sqnr(model, batches[:SENSITIVITY_BATCHES], sorted(by_input), fmt)
                ranking = sorted(sqnr, key=lambda name: sqnr[name])
                record["activation_sqnr_db"] = {name: round(float(sqnr[name]), 1) for name in ranking}
            # Double the number of float inputs per attempt (a handful of re-quantizations at
            # most), never past the limit: an input's MatMuls go to float together or not at all.
            added = 0
            while (ranking and added < max(1, inputs_kept)
                   and len(kept) + len(by_input[ranking[0]]) <= limit):
                kept += by_input[ranking.pop(0)]
                added += 1
            if not added:
                break
            inputs_kept += added
        record["kept_float"] = kept
        return result, kept
