"""ONNX export of the captured program.

Export goes through the dynamo exporter from the same `ExportedProgram` the other backends
use, so dynamic axes come from the program's symbolic dims; they are renamed after the
TensorSpec dims (`batch`, `seq`) so the ONNX file documents itself.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch.export import ExportedProgram

from optimize.runtime.errors import CaptureError
from optimize.runtime.specs import TensorSpec, torch_dtype


def example_inputs(specs: list[TensorSpec]) -> dict[str, torch.Tensor]:
    """Tensors at each spec's `opt` shape; values only need to be valid, not meaningful."""
    out = {}
    for spec in specs:
        shape = spec.concrete({})
        hi = spec.value_range[1] if spec.value_range else 1
        if torch_dtype(spec.dtype).is_floating_point:
            out[spec.name] = torch.zeros(shape, dtype=torch_dtype(spec.dtype))
        else:
            out[spec.name] = torch.full(shape, min(hi, 1), dtype=torch_dtype(spec.dtype))
    return out


def rename_dynamic_axes(model: onnx.ModelProto, specs: list[TensorSpec]) -> None:
    """Replace exporter symbols (s43, ...) by the TensorSpec dim names wherever they appear."""
    names: dict[str, str] = {}
    by_name = {s.name: s for s in specs}
    for value in model.graph.input:
        spec = by_name.get(value.name)
        if spec is None:
            continue
        for dim, want in zip(value.type.tensor_type.shape.dim, spec.shape):
            if dim.dim_param and not isinstance(want, int):
                names.setdefault(dim.dim_param, want.name)
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def export_program(
    program: ExportedProgram, inputs: list[TensorSpec], outputs: list[TensorSpec], opset: int | None = None,
    model_name: str = "",
) -> onnx.ModelProto:
    """Export `program`, check it and infer shapes; return the ONNX model (dynamic axes named).
    Raises `CaptureError` with the exporter's first line (and `model_name`, the family the
    error names) when export fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            onnx_program = torch.onnx.export(
                program,
                (),
                kwargs=example_inputs(inputs),
                dynamo=True,
                input_names=[s.name for s in inputs],
                output_names=[s.name for s in outputs],
                opset_version=opset,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; report them as one error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"ONNX export failed{' for ' + model_name if model_name else ''}: {first}") from exc
    model = onnx_program.model_proto
    rename_dynamic_axes(model, inputs)
    onnx.checker.check_model(model, full_check=False)
    return onnx.shape_inference.infer_shapes(model)


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` to `path` as one file (weights inline; ONNX's 2 GiB protobuf limit applies)."""
    onnx.save_model(model, str(path))
    return path
