"""Calibration over real samples with ONNX Runtime's calibrators.

The data reader turns kiln's sample batches (torch tensors, see `optimize.samples`) into what
`onnxruntime.quantization` expects and advances the compile's progress display per batch.
`tensor_ranges` measures every float tensor's [min, max] — the input of the fp16 overflow
guard; int8 quantization hands the same reader to ORT's percentile/entropy calibrators.
`real_token_values` reads named tensors at the samples' real tokens (fp8 calibration and the
sensitivity ranking), and `AbsHistogram` takes high percentiles of more values than memory holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator
import onnxruntime as ort

from optimize.onnx.base import Feeds, OnnxPassContext, StageProgress
from optimize.runtime.errors import OptimizeError

# Percentile of |activation| taken as the int8 range in `percentile` calibration: clips the
# rare outliers (0.001% of values) instead of stretching the scale for them.
PERCENTILE = 99.999
# |activation| histograms for fp8 calibration: log2-spaced bins, HIST_BINS_PER_OCTAVE per
# doubling over [2^HIST_MIN_EXP, 2^HIST_MAX_EXP]. A percentile comes out at most a factor
# 2^(1/64) (1.1%) above the exact one, a sixth of E4M3's finest relative step (2^-3 / 1.75), in
# memory that does not grow with the number of samples.
HIST_MIN_EXP, HIST_MAX_EXP, HIST_BINS_PER_OCTAVE = -32, 32, 64
ORT_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
_NUMPY_TYPES = {
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.BOOL: np.bool_,
}


class CalibrationError(OptimizeError):
    """Calibration could not run (no samples, or the model failed on them)."""


class SampleReader(CalibrationDataReader):
    """Hands sample batches to an ONNX Runtime calibrator, one `get_next` per batch."""

    def __init__(self, batches: list[Feeds], model: onnx.ModelProto, progress: StageProgress | None = None) -> None:
        types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        self._batches = [
            {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=_NUMPY_TYPES.get(types.get(k, 0))) for k, v in b.items()
             if k in types}
            for b in batches
        ]
        self._progress = progress
        self._iter: Iterator[dict[str, np.ndarray]] = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        if batch is not None and self._progress is not None:
            shape = next(iter(batch.values())).shape
            self._progress.advance("×".join(str(s) for s in shape))
        return batch

    def rewind(self) -> None:
        self._iter = iter(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve only batches [start_index, end_index) next; ORT's strided calibration calls
        this to collect one slice at a time (kiln uses slices of one batch: batches of real
        sentences differ in length, and ORT's histogram collector cannot stack ragged batches)."""
        self._iter = iter(self._batches[start_index:end_index])


def samples_or_fail(ctx: OnnxPassContext, why: str) -> list[Feeds]:
    batches = ctx.samples() if ctx.samples is not None else []
    if not batches:
        raise CalibrationError(f"{why} needs calibration samples and none are available")
    return batches


def tensor_ranges(model: onnx.ModelProto, ctx: OnnxPassContext) -> dict[str, tuple[float, float]]:
    """[min, max] of every float tensor the model computes, over the calibration samples."""
    batches = samples_or_fail(ctx, "the fp16 range check")
    path = ctx.workdir / "ranges.onnx"
    onnx.save_model(model, str(path))
    calibrator = create_calibrator(
        str(path), op_types_to_calibrate=None, augmented_model_path=str(ctx.workdir / "ranges_augmented.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
    )
    try:
        with ctx.progress(f"measure tensor ranges ({len(batches)} batches)", total=len(batches)) as bar:
            calibrator.collect_data(SampleReader(batches, model, bar))
        data: Any = calibrator.compute_data()
    except Exception as exc:  # ORT raises its own types when the model fails on a sample
        raise CalibrationError(f"range calibration failed: {str(exc).splitlines()[0]}") from exc
    finally:
        path.unlink(missing_ok=True)
        (ctx.workdir / "ranges_augmented.onnx").unlink(missing_ok=True)
    return {name: (float(np.min(t.range_value[0])), float(np.max(t.range_value[1]))) for name, t in data.data.items()}


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
