"""Which MatMuls to keep out of int8 / fp8: while a quantized model misses the tolerance on the
calibration samples, the MatMuls whose inputs quantize worst (lowest signal-to-quantization-noise
ratio) go back to float, a few more per attempt. Shared by int8's static mode
(`optimize.onnx.int8`) and fp8 (`optimize.onnx.fp8`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from optimize.onnx.base import Feeds, OnnxPassContext
from optimize.onnx.calibration import PERCENTILE, real_token_values
from optimize.onnx.fp8 import FP8_MAX, to_fp8
from optimize.onnx.graph import Graph
from optimize.verify import compare_real_tokens

# At most this share of weight MatMuls is kept in float when int8 misses the tolerance: beyond
# it int8 is not worth having, and the engine's own verification rejects it. all-MiniLM-L6-v2
# under ORT static uint8 needs 8 of its 18 (after the attention pass fuses Q, K and V) to reach
# cosine 0.99 on held-out sentences; a third (6) leaves it at 0.988.
MAX_FLOAT_FRACTION = 1 / 2
SENSITIVITY_BATCHES = 4  # sample batches the SQNR ranking is measured on
SQNR_FORMATS = ("int8", "uint8", "fp8")


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


def score(model: Path | onnx.ModelProto, batches: list[Feeds], reference: Any) -> tuple[float, float]:
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


def keep_sensitive(model: onnx.ModelProto, ctx: OnnxPassContext, batches: list[Feeds],
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
        err, cos = score(result, batches, ctx.reference)
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


__all__ = ["MAX_FLOAT_FRACTION", "activation_sqnr", "keep_sensitive", "score"]
