"""Backend `openvino`: kiln's prepared ONNX converted to an OpenVINO model, run by OpenVINO.

The shape ranges of the TensorSpecs become the model's bounded dynamic dims. Quantization goes
through NNCF: `int8-weight` compresses the weights to int8 (activations stay float), `int8` is
NNCF's post-training quantization with the transformer preset, calibrated on the same real
samples as every other backend (`optimize.samples`). Inference precision is pinned to what the
manifest says: f32 for fp32 and the int8 modes (OpenVINO would otherwise choose bf16 by itself
on CPUs that have it), bf16 for `bf16` — offered only on CPUs with native bf16 dot products
(AVX512_BF16 or AMX), where it halves the cost of every MatMul; elsewhere OpenVINO would
emulate it. Payload: `model.xml` + `model.bin`.

Options (`CompileConfig.backend_options`):
- `hint` ("latency" default | "throughput"): OpenVINO's performance hint;
- `threads` (0 = OpenVINO's choice): inference threads;
- `device` ("CPU" default): the OpenVINO device.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar
import time

import numpy as np
import torch
from torch.export import ExportedProgram

from optimize.backends import register_backend
from optimize.backends.base import Backend, BuildContext, cpu_has_native_bf16
from optimize.onnx import prepare_onnx
from optimize.onnx.export import save_model
from optimize.runtime.backends.openvino import HINTS, MODEL_FILE, OPTIONS, WEIGHTS_FILE, OpenVINOEngine
from optimize.runtime.config import CompileConfig
from optimize.runtime.engine import Engine
from optimize.runtime.errors import ConfigError
from optimize.runtime.manifest import Manifest
from optimize.runtime.specs import Dim

PASSES = ("onnx_fold_constants", "onnx_fuse_layernorm", "onnx_fuse_gelu", "onnx_attention")


def _openvino() -> Any:
    try:
        # why: optional (kiln[cpu-engines])
        import openvino
    except ImportError:
        raise ConfigError("backend 'openvino' needs OpenVINO: pip install 'kiln[cpu-engines]' (openvino, nncf)") from None
    return openvino


def native_bf16(device: str = "CPU") -> bool:
    """Whether OpenVINO runs bf16 natively on `device`: it must list BF16 among the device's
    optimization capabilities, and a CPU must have bf16 dot products (AVX512_BF16 or AMX)."""
    if device == "CPU" and not cpu_has_native_bf16():
        return False
    try:
        # why: optional (kiln[cpu-engines])
        import openvino as ov

        return "BF16" in ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - not installed, or an unknown device or property: assume not
        return False


@register_backend
class OpenVINOBackend(Backend):
    name: ClassVar[str] = "openvino"
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "bf16", "int8", "int8-weight"})
    options: ClassVar[dict[str, Any]] = OPTIONS

    def capture_precision(self, precision: str) -> str:
        return "fp32"

    def can_run_here(self) -> tuple[bool, str]:
        try:
            # why: optional (kiln[cpu-engines])
            import openvino as ov
        except ImportError:
            return False, "openvino is not installed"
        if "CPU" not in ov.Core().available_devices:
            return False, "OpenVINO has no CPU device here"
        return True, ""

    def native_precisions(self) -> frozenset[str]:
        return self.precisions if native_bf16() else self.precisions - {"bf16"}

    def resolve_options(self, config: CompileConfig) -> dict[str, Any]:
        options = super().resolve_options(config)
        if config.precision == "bf16" and options["device"] == "CPU" and not native_bf16():
            raise ConfigError("backend 'openvino' offers bf16 only on CPUs with native bf16 (AVX512_BF16 or AMX); "
                              "this one would emulate it, slower than fp32")
        if options["hint"] not in HINTS:
            raise ConfigError(f"backend option hint must be one of {', '.join(HINTS)}; got {options['hint']!r}")
        return options

    def build(self, program: ExportedProgram, ctx: BuildContext, directory: Path) -> list[str]:
        ov = _openvino()
        options = self.resolve_options(ctx.config)
        with tempfile.TemporaryDirectory(prefix="kiln-openvino-") as workdir:
            model = prepare_onnx(program, ctx, Path(workdir), PASSES, options, backend=self.name)
            onnx_path = save_model(model, Path(workdir) / "model.onnx")
            ov_model = ov.convert_model(str(onnx_path))
        specs = {s.name: s for s in ctx.inputs}
        ov_model.reshape({
            port.get_any_name(): ov.PartialShape([
                ov.Dimension(d.min, d.max) if isinstance(d, Dim) else ov.Dimension(d)
                for d in specs[port.get_any_name()].shape
            ])
            for port in ov_model.inputs
        })
        precision = ctx.config.precision
        if precision == "int8-weight":
            # why: optional (kiln[cpu-engines])
            import nncf

            ov_model = nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
            ctx.record["quantization"] = {"mode": "weight_only", "tool": f"nncf {nncf.__version__}", "weights": "int8 asymmetric"}
        elif precision == "int8":
            ov_model = self._quantize(ov_model, ctx)
        ov.save_model(ov_model, str(directory / MODEL_FILE), compress_to_fp16=False)
        ctx.record["openvino"] = {"version": ov.__version__, "hint": options["hint"], "device": options["device"]}
        return [MODEL_FILE, WEIGHTS_FILE]

    def _quantize(self, ov_model: Any, ctx: BuildContext) -> Any:
        """NNCF post-training quantization (transformer preset) on the calibration samples."""
        # why: optional (kiln[cpu-engines])
        import nncf

        batches = ctx.samples() if ctx.samples is not None else []
        if not batches:
            raise ConfigError("int8 calibration needs samples and none are available")
        names = [p.get_any_name() for p in ov_model.inputs]
        reporter = ctx.reporter
        if reporter is not None:
            reporter.start(f"calibrate int8 (nncf, {len(batches)} batches)", len(batches))

        def transform(feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
            if reporter is not None:
                reporter.advance()
            return {n: feeds[n].numpy() for n in names}


        t0 = time.perf_counter()
        quantized = nncf.quantize(ov_model, nncf.Dataset(batches, transform), subset_size=len(batches),
                                  model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED)
        if reporter is not None:
            reporter.finish(f"calibrate int8 (nncf, {len(batches)} batches)", round(time.perf_counter() - t0, 3))
        ctx.record["quantization"] = {"mode": "static", "tool": f"nncf {nncf.__version__}", "preset": "mixed",
                                      "model_type": "transformer", "batches": len(batches)}
        return quantized

    def load(self, directory: Path, manifest: Manifest) -> Engine:
        return OpenVINOEngine(directory, manifest)


__all__ = ["OpenVINOBackend", "native_bf16"]
