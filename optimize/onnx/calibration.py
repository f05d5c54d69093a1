"""Calibration over real samples with ONNX Runtime's calibrators.

The data reader turns kiln's sample batches (torch tensors, see `optimize.samples`) into what
`onnxruntime.quantization` expects and advances the compile's progress display per batch.
`tensor_ranges` measures every float tensor's [min, max] — the input of the fp16 overflow
guard; int8 quantization hands the same reader to ORT's percentile/entropy calibrators.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

from optimize.onnx.base import Feeds, OnnxPassContext, StageProgress
from optimize.runtime.errors import OptimizeError

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
