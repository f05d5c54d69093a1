"""Backend `openvino`: kiln's prepared ONNX converted to an OpenVINO model, run by OpenVINO.

The shape ranges of the TensorSpecs become the model's bounded dynamic dims. Quantization goes
through NNCF: `int8-weight` compresses the weights to int8 (activations stay float), `int8` is
NNCF's post-training quantization with the transformer preset, calibrated on the same real
samples as every other backend (`optimize.samples`). Inference precision is pinned to what the
manifest says: f32 for fp32 and the int8 modes (OpenVINO would otherwise choose bf16 by itself
on CPUs that have it), bf16 for `bf16` — offered only on CPUs with native bf16 dot products
(AVX512_BF16 or AMX), where it halves the cost of every MatMul; elsewhere OpenVINO would
emulate it. Payload: `model.xml` + `model.bin`.

int8 (weights and activations) keeps transformers accurate by three means: SmoothQuant (NNCF
moves activation outliers into the weights, per MatMul, by `int8_smooth_quant`: alpha 0.95 by
default), per-channel int8 weights (NNCF's transformer preset; activations per tensor, symmetric,
with the mixed preset's asymmetric ones where ranges are lopsided), and sensitive layers kept in
float: with `int8_keep_sensitive` NNCF's accuracy control ranks the quantized operations by the
error each adds and returns the worst to float, one by one, until the calibration texts'
outputs are within the guard's cosine of the fp32 model's (held-out texts then judge the
engine, as always). It is off by default: each step re-ranks every remaining operation, which
on all-MiniLM-L6-v2 (50 quantized operations) takes many minutes on 2 cores. On CPUs with AMX
or VNNI the int8 MatMuls run on them. Measured on all-MiniLM-L6-v2 (held-out sentences): the
transformer preset with SmoothQuant 0.95 reaches cosine 0.987.

Options (`CompileConfig.backend_options`):
- `hint` ("latency" default | "throughput"): OpenVINO's performance hint;
- `int8_smooth_quant` (0.95): SmoothQuant's alpha for MatMuls (-1 turns it off);
- `int8_keep_sensitive` (False): keep the layers int8 hurts most in float, as above (slow);
- `threads` (0 = OpenVINO's choice): inference threads;
- `device` ("CPU" default): the OpenVINO device.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.export import ExportedProgram

from optimize.backends import register_backend
from optimize.backends.base import Backend, BuildContext, cpu_has_native_bf16
from optimize.onnx import prepare_onnx
from optimize.onnx.export import save_model
from optimize.runtime.backends.openvino import HINTS, MODEL_FILE, OPTIONS, WEIGHTS_FILE, OpenVINOEngine
from optimize.precision import native_on_cpu
from optimize.runtime.config import CompileConfig
from optimize.runtime.engine import Engine
from optimize.runtime.errors import ConfigError
from optimize.runtime.precision import facts
from optimize.runtime.manifest import Manifest
from optimize.runtime.specs import Dim
from optimize.verify import compare_real_tokens

PASSES = ("onnx_fold_constants", "onnx_fuse_layer_norm", "onnx_fuse_gelu", "onnx_simplify_attention")


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
    # the runtime's options, and the build-only int8 ones
    options: ClassVar[dict[str, Any]] = {**OPTIONS, "int8_smooth_quant": 0.95, "int8_keep_sensitive": False}

    captures_precision: ClassVar[bool] = False

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
        cpu_bf16 = native_bf16()
        return frozenset(p for p in self.precisions if native_on_cpu(p, cpu_bf16))

    def resolve_options(self, config: CompileConfig) -> dict[str, Any]:
        options = super().resolve_options(config)
        if facts(config.precision).compute == torch.bfloat16 and options["device"] == "CPU" and not native_bf16():
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
        plan = ctx.plan or self.precision_plan(ctx.config)
        if plan.weight_only:
            # why: optional (kiln[cpu-engines])
            import nncf

            ov_model = nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
            ctx.record["quantization"] = {"mode": "weight_only", "tool": f"nncf {nncf.__version__}", "weights": "int8 asymmetric"}
        elif plan.calibrated:
            ov_model = self._quantize(ov_model, ctx)
        ov.save_model(ov_model, str(directory / MODEL_FILE), compress_to_fp16=False)
        ctx.record["openvino"] = {"version": ov.__version__, "hint": options["hint"], "device": options["device"]}
        return [MODEL_FILE, WEIGHTS_FILE]

    def _quantize(self, ov_model: Any, ctx: BuildContext) -> Any:
        """NNCF post-training quantization (transformer preset, SmoothQuant) on the calibration
        samples; with `int8_keep_sensitive`, NNCF's accuracy control against the fp32 model."""
        # why: optional (kiln[cpu-engines])
        import nncf

        options = self.resolve_options(ctx.config)
        batches = ctx.samples() if ctx.samples is not None else []
        if not batches:
            raise ConfigError("int8 calibration needs samples and none are available")
        names = [p.get_any_name() for p in ov_model.inputs]
        reporter = ctx.reporter
        stage = f"calibrate int8 (nncf, {len(batches)} batches)"
        if reporter is not None:
            reporter.start(stage)
        alpha = float(options["int8_smooth_quant"])
        advanced = nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=alpha))
        items = list(enumerate(batches))
        dataset = nncf.Dataset(items, lambda item: {n: item[1][n].numpy() for n in names})
        common = {"subset_size": len(batches), "model_type": nncf.ModelType.TRANSFORMER,
                  "preset": nncf.QuantizationPreset.MIXED, "advanced_parameters": advanced}
        t0 = time.perf_counter()
        record: dict[str, Any] = {"mode": "static", "tool": f"nncf {nncf.__version__}", "preset": "mixed",
                                  "model_type": "transformer", "batches": len(batches), "smooth_quant_alpha": alpha,
                                  "weights": "int8 per channel"}
        tol = ctx.config.tolerance
        if options["int8_keep_sensitive"] and ctx.reference is not None and tol is not None:
            with torch.inference_mode():
                references = [ctx.reference(**feeds) for feeds in batches]
            outputs = [s.name for s in ctx.outputs]

            def validate(compiled: Any, data: Any) -> tuple[float, list[float]]:
                worst = []
                for index, feeds in data:
                    result = compiled({n: feeds[n].numpy() for n in names})
                    got = {port.get_any_name(): torch.from_numpy(np.array(value)) for port, value in result.items()}
                    stats = compare_real_tokens(feeds, references[index], {n: got[n] for n in outputs})
                    worst.append(min(v["min_cosine"] for v in stats.values()))
                return min(worst), worst

            common.pop("advanced_parameters")
            quantized = nncf.quantize_with_accuracy_control(
                ov_model, dataset, dataset, validate, max_drop=max(1.0 - tol.min_cosine, 1e-5),
                drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced, **common)
            record["kept_in_float"] = ("NNCF accuracy control: worst layers in float until calibration "
                                       f"cosine >= {tol.min_cosine}")
        else:
            quantized = nncf.quantize(ov_model, dataset, **common)
        if reporter is not None:
            reporter.finish(stage, round(time.perf_counter() - t0, 3))
        ctx.record["quantization"] = record
        return quantized

    def load(self, directory: Path, manifest: Manifest) -> Engine:
        return OpenVINOEngine(directory, manifest)


__all__ = ["OpenVINOBackend", "native_bf16"]
