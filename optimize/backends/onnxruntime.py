"""Backend `onnxruntime`: ONNX export of the captured program, run by ONNX Runtime.

Export goes through the dynamo exporter from the same `ExportedProgram` the other backends
use, so dynamic axes come from the program's symbolic dims; they are renamed after the
TensorSpec dims (`batch`, `seq`) so the ONNX file documents itself.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import torch
from torch.export import ExportedProgram

from optimize.backends import register_backend
from optimize.backends.base import Backend, BuildContext
from optimize.engine import Engine
from optimize.errors import CaptureError, EngineError
from optimize.manifest import Manifest
from optimize.specs import TensorSpec, numpy_dtype, torch_dtype

MODEL_FILE = "model.onnx"


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


def _rename_dynamic_axes(model: onnx.ModelProto, specs: list[TensorSpec]) -> None:
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


def export_onnx(program: ExportedProgram, ctx: BuildContext, path: Path) -> onnx.ModelProto:
    """Export `program` to `path`, check it, and return the ONNX model (dynamic axes named)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            onnx_program = torch.onnx.export(
                program,
                (),
                kwargs=example_inputs(ctx.inputs),
                dynamo=True,
                input_names=[s.name for s in ctx.inputs],
                output_names=[s.name for s in ctx.outputs],
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; report them as one error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"ONNX export failed: {first}") from exc
    model = onnx_program.model_proto
    _rename_dynamic_axes(model, ctx.inputs)
    onnx.checker.check_model(model, full_check=False)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.save_model(model, str(path))
    return model


def session_providers() -> list[str]:
    """Execution providers in order of preference, restricted to those this ORT build has."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    preferred = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in preferred if p in available] or ["CPUExecutionProvider"]


class OnnxRuntimeEngine(Engine):
    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(path / MODEL_FILE), options, providers=session_providers())
        except Exception as exc:  # ORT raises its own exception types
            raise EngineError(f"ONNX Runtime cannot open {path / MODEL_FILE}: {exc}") from exc
        self._output_names = [s.name for s in manifest.outputs]
        self._input_dtypes = {s.name: numpy_dtype(s.dtype) for s in manifest.inputs}

    @property
    def providers(self) -> list[str]:
        return self._session.get_providers()

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=self._input_dtypes[k]) for k, v in inputs.items()}
        results = self._session.run(self._output_names, feeds)
        return {k: torch.from_numpy(v) for k, v in zip(self._output_names, results)}


@register_backend
class OnnxRuntimeBackend(Backend):
    name: ClassVar[str] = "onnxruntime"
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32"})

    def build(self, program: ExportedProgram, ctx: BuildContext, directory: Path) -> list[str]:
        export_onnx(program, ctx, directory / MODEL_FILE)
        return [MODEL_FILE]

    def load(self, directory: Path, manifest: Manifest) -> Engine:
        return OnnxRuntimeEngine(directory, manifest)
