"""int8 quantization for the pass `onnx_quantize` (`optimize.onnx.quantize`), three ways:

- `quantize_static_int8` (precision `int8`): ONNX Runtime's `quantize_static` on kiln's
  calibration samples: per-channel int8 weights (symmetric, one scale per output column),
  per-tensor activations whose scale comes from percentile, entropy or min/max calibration,
  sensitive MatMuls kept in float (`optimize.onnx.sensitivity`);
- `weight_only` (precision `int8-weight`, for TensorRT): int8 per-channel weights behind a
  DequantizeLinear, activations untouched; no calibration;
- `quantize_dynamic_int8` (precision `int8-weight`, for ONNX Runtime on CPU): ORT's dynamic
  quantization, activations quantized per batch at run time.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

from optimize.onnx.base import OnnxPassContext
from optimize.onnx.calibration import ORT_METHODS, PERCENTILE, CalibrationError, SampleReader, samples_or_fail
from optimize.onnx.graph import Graph, topological_sort
from optimize.onnx.sensitivity import keep_sensitive


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


def quantize_dynamic_int8(source: Path, target: Path, extra: dict[str, object]) -> None:
    """ORT's dynamic quantization of the model file `source` into `target`: per-channel int8
    weights, activations quantized per batch at run time; no calibration."""
    with ort_quiet():
        quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                         weight_type=QuantType.QInt8, extra_options=extra)


def quantize_static_int8(model: onnx.ModelProto, ctx: OnnxPassContext, source: Path, target: Path,
                         extra: dict[str, object], activations: list[str]) -> list[str]:
    """Calibrate and quantize to int8 with ORT's `quantize_static`, keeping sensitive MatMuls
    in float (see `keep_sensitive`); returns the names kept in float.

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

    _, kept = keep_sensitive(model, ctx, batches, activations, attempt, "int8" if symmetric else "uint8")
    return kept


__all__ = ["quantize_dynamic_int8", "quantize_static_int8", "weight_only", "ort_quiet"]
