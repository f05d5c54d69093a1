"""Backend `openvino`: kiln's prepared ONNX (the build's ONNX stage) converted to an OpenVINO
model, run by OpenVINO.

The shape ranges of the TensorSpecs become the model's bounded dynamic dims. Quantization goes
through NNCF: `int8-weight` compresses the weights to int8 (activations stay float), `int8` is
NNCF's post-training quantization with the transformer preset, calibrated on the same real
samples as every other backend (`optimize.samples`). Inference precision is pinned to what the
manifest says: f32 for fp32 and the int8 modes (OpenVINO would otherwise choose bf16 by itself
on CPUs that have it), bf16 for `bf16` — offered only on CPUs with native bf16 dot products
(AVX512_BF16 or AMX), where it halves the cost of every MatMul; elsewhere OpenVINO would
emulate it. Payload: `model.xml` + `model.bin`.

int8 (weights and activations) keeps transformers accurate by three means: SmoothQuant (NNCF
moves activation outliers into the weights, per MatMul, by `int8_smooth_quant`), per-channel int8
weights (NNCF's transformer preset; activations per tensor, symmetric, with the mixed preset's
asymmetric ones where ranges are lopsided), and sensitive MatMuls kept in float
(`int8_keep_sensitive`, on by default): the build measures what each activation quantizer costs
on the calibration texts and keeps the costliest MatMuls out of int8 until the calibration texts
meet the guard's cosine (`optimize.backends.int8_search`); a guard no selection meets is
refused by name. The manifest's `quantization` record lists the MatMuls kept, the int8 count and
the calibration cosine of each step; held-out texts then judge the engine, as always. On CPUs
with native bf16 everything outside int8 (kept MatMuls, attention, normalization) computes in
bf16 on AMX, elsewhere in fp32; on CPUs with AMX or VNNI the int8 MatMuls run on them.

Options (`CompileConfig.backend_options`):
- `hint` ("latency" default | "throughput"): OpenVINO's performance hint;
- `int8_smooth_quant` ("auto"): SmoothQuant's alpha for MatMuls: "auto" keeps the best of
  `SMOOTH_QUANT_ALPHAS` on the calibration texts, a number fixes it (-1 turns SmoothQuant off);
- `int8_keep_sensitive` (True): keep the MatMuls int8 hurts most in float until the guard is met;
- `threads` (0 = OpenVINO's choice): inference threads;
- `device` ("CPU" default): the OpenVINO device;
- `batch_streams` (2; 1 turns it off): with the latency hint, a batch of several rows is split
  into this many parts run at once, each on its own CPU stream with its share of the threads
  (`split_config` has the measurement). Rows are independent, as the server's batching already
  assumes; the split model is one more copy of the weights. With the throughput hint a batch
  is split across the streams OpenVINO gives the model (no extra copy), so that one caller
  uses every core;
- `max_static_shapes` (4; 0 turns it off): input shapes the engine keeps a static copy of the
  model for, compiled in the background once a shape repeats (`optimize.runtime.backends.
  openvino_shapes`): 10-20% faster than the dynamic model at those shapes, at the cost of one
  more copy of the weights each;
- `static_shapes_memory_mb` (1024): the most those copies may take together, each estimated
  from the model's weights in the inference precision (`copy_bytes`): MiniLM in bf16 (45 MB)
  keeps all 4, a 335M-parameter model in bf16 (670 MB) one; 0 turns them off.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch.export import ExportedProgram

from optimize.backends import register_backend
from optimize.backends.base import Backend, BuildContext, cpu_has_native_bf16
from optimize.onnx.export import save_model
from optimize.backends import int8_search, openvino_int8
from optimize.passes.base import GENERIC_PASSES
from optimize.precision import PrecisionPlan, native_on_cpu
from optimize.runtime.backends.openvino import (HINTS, MODEL_FILE, OPTIONS, WEIGHTS_FILE, OpenVINOEngine,
                                                engine_config, shape_cache_is_exact)
from optimize.runtime.config import CompileConfig
from optimize.runtime.engine import Engine
from optimize.runtime.errors import AccuracyError, ConfigError
from optimize.runtime.precision import facts
from optimize.runtime.manifest import Manifest
from optimize.runtime.specs import Dim
from optimize.verify import compare_real_tokens

# SmoothQuant alphas `int8_smooth_quant: "auto"` tries. Measured on all-MiniLM-L6-v2 (held-out
# sentences, all MatMuls int8): 0.5 -> cosine 0.987, 0.8 -> 0.994, 0.95 -> 0.986; the best
# differs per model, so the build measures instead of fixing one.
SMOOTH_QUANT_ALPHAS = (0.5, 0.65, 0.8, 0.95)
DEFAULT_SMOOTH_QUANT_ALPHA = 0.8  # without a reference model to measure against


def _openvino() -> Any:
    try:
        # why: optional (kiln[cpu-engines])
        import openvino
    except ImportError:
        raise ConfigError("backend 'openvino' needs OpenVINO: pip install 'kiln[cpu-engines]' (openvino, nncf)") from None
    return openvino


def _float_compute(plan: PrecisionPlan) -> str:
    """OpenVINO's name for the type the plan computes in outside int8 (see
    `OpenVINOBackend.quantized_compute`), as the manifest records it for the runtime."""
    return "bf16" if plan.compute == torch.bfloat16 else "f32"


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
    options: ClassVar[dict[str, Any]] = {**OPTIONS, "int8_smooth_quant": "auto", "int8_keep_sensitive": True}
    # precision is NNCF's and OpenVINO's business here, so no quantize / mixed precision pass
    passes: ClassVar[frozenset[str]] = GENERIC_PASSES | {
        "onnx_fold_constants", "onnx_fuse_layer_norm", "onnx_fuse_gelu", "onnx_simplify_attention"}
    consumes_onnx: ClassVar[bool] = True
    captures_precision: ClassVar[bool] = False

    def quantized_compute(self, options: dict[str, Any], calibrated: bool) -> torch.dtype:
        """What an int8 engine computes in outside int8: bf16 on a CPU with native bf16 (the
        MatMuls kept out of int8, attention and the rest run on AMX-BF16 instead of fp32:
        measured on all-MiniLM-L6-v2, calibration cosine 0.99996 for the whole model in bf16);
        fp32 otherwise, and always for weight-only int8, whose point is accuracy."""
        return torch.bfloat16 if calibrated and native_bf16(options["device"]) else torch.float32

    def can_run_here(self) -> tuple[bool, str]:
        try:
            # why: optional (kiln[cpu-engines])
            import openvino as ov
        except ImportError:
            return False, "openvino is not installed"
        if "CPU" not in ov.Core().available_devices:
            return False, "OpenVINO has no CPU device here"
        return True, ""

    def can_build_here(self) -> tuple[bool, str]:
        try:
            # why: optional (kiln[cpu-engines])
            import openvino  # noqa: F401
        except ImportError:
            return False, "needs OpenVINO: pip install 'kiln[cpu-engines]' (openvino, nncf)"
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
        for name, least in (("max_static_shapes", 0), ("batch_streams", 1), ("static_shapes_memory_mb", 0)):
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"backend option {name} must be an integer >= {least}; got {value!r}")
        int8_search.check_smooth_quant(options)
        return options

    def build(self, program: ExportedProgram, ctx: BuildContext, directory: Path) -> list[str]:
        ov = _openvino()
        options = self.resolve_options(ctx.config)
        with tempfile.TemporaryDirectory(prefix="kiln-openvino-") as workdir:
            onnx_path = save_model(self.prepared_onnx(ctx), Path(workdir) / "model.onnx")
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
        samples. With a reference model, SmoothQuant's alpha is the one of `SMOOTH_QUANT_ALPHAS`
        whose all-int8 model scores best on the calibration texts (unless the option fixes it),
        and with `int8_keep_sensitive` and a guard the MatMuls int8 hurts most are kept in float
        until the calibration texts meet the guard's cosine (`int8_search`)."""
        # why: optional (kiln[cpu-engines])
        import nncf

        options = self.resolve_options(ctx.config)
        plan = ctx.plan or self.precision_plan(ctx.config)
        batches = ctx.samples() if ctx.samples is not None else []
        if not batches:
            raise ConfigError("int8 calibration needs samples and none are available")
        names = [p.get_any_name() for p in ov_model.inputs]
        reporter = ctx.reporter
        stage = f"calibrate int8 (nncf, {len(batches)} batches)"
        if reporter is not None:
            reporter.start(stage)
        dataset = nncf.Dataset(batches, lambda feeds: {n: feeds[n].numpy() for n in names})

        def quantize(alpha: float, keep: list[str]) -> Any:
            advanced = nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=alpha))
            return nncf.quantize(ov_model.clone(), dataset, subset_size=len(batches),
                                 model_type=nncf.ModelType.TRANSFORMER,
                                 preset=nncf.QuantizationPreset.MIXED, advanced_parameters=advanced,
                                 ignored_scope=nncf.IgnoredScope(names=keep, validate=False))

        t0 = time.perf_counter()
        score = self._scorer(batches, ctx, options, plan) if ctx.reference is not None else None
        fixed = options["int8_smooth_quant"]
        alphas = SMOOTH_QUANT_ALPHAS if fixed == "auto" else (float(fixed),)
        if score is None or len(alphas) == 1:
            alpha = alphas[-1] if len(alphas) == 1 else DEFAULT_SMOOTH_QUANT_ALPHA
            quantized, base, tried = quantize(alpha, []), None, {}
        else:
            models = {a: quantize(a, []) for a in alphas}
            tried = {a: score(m) for a, m in models.items()}
            alpha = max(tried, key=lambda a: tried[a])
            quantized, base = models[alpha], tried[alpha]
        record: dict[str, Any] = {"mode": "static", "tool": f"nncf {nncf.__version__}", "preset": "mixed",
                                  "model_type": "transformer", "batches": len(batches), "smooth_quant_alpha": alpha,
                                  "weights": "int8 per channel", "float_compute": _float_compute(plan)}
        if tried:
            record["smooth_quant_alphas_tried"] = {str(a): round(c, 6) for a, c in tried.items()}
        tol = ctx.config.tolerance
        if options["int8_keep_sensitive"] and score is not None and tol is not None:
            base = score(quantized) if base is None else base
            quantized = self._keep_sensitive(quantized, lambda keep: quantize(alpha, keep), score, base,
                                             tol.min_cosine, reporter, record)
        if reporter is not None:
            reporter.finish(stage, round(time.perf_counter() - t0, 3))
        ctx.record["quantization"] = record
        return quantized

    def _scorer(self, batches: list[dict[str, torch.Tensor]], ctx: BuildContext,
                options: dict[str, Any], plan: PrecisionPlan) -> Callable[[Any], float]:
        """A function that compiles an OpenVINO model as the engine would run it and returns its
        worst cosine to the fp32 reference over the calibration batches."""
        ov = _openvino()
        assert ctx.reference is not None
        core = ov.Core()
        with torch.inference_mode():
            references = [ctx.reference(**feeds) for feeds in batches]
        outputs = [s.name for s in ctx.outputs]

        def score(model: Any) -> float:
            properties = engine_config(options, plan.precision, _float_compute(plan),
                                       shape_cache=shape_cache_is_exact(model))
            compiled = core.compile_model(model, options["device"], properties)
            inputs = [p.get_any_name() for p in model.inputs]
            worst = 1.0
            for feeds, expected in zip(batches, references):
                result = compiled({n: feeds[n].numpy() for n in inputs})
                got = {port.get_any_name(): torch.from_numpy(np.array(value)) for port, value in result.items()}
                stats = compare_real_tokens(feeds, expected, {n: got[n] for n in outputs})
                worst = min(worst, *(v["min_cosine"] for v in stats.values()))
            return worst

        return score

    def _keep_sensitive(self, quantized: Any, quantize: Callable[[list[str]], Any], score: Callable[[Any], float],
                        base: float, target: float, reporter: Any, record: dict[str, Any]) -> Any:
        """Rank the activation quantizers by the calibration cosine each costs and keep the worst
        MatMuls in float until the calibration texts meet `target`; the choice goes to `record`."""
        model, cosine = int8_search.keep_sensitive(
            quantized, openvino_int8.activation_quantizers(quantized),
            lambda q: score(openvino_int8.bypass(quantized, [q.name])), quantize, score, base, target, record,
            reporter=reporter)
        if cosine < target:
            raise AccuracyError(f"int8 cannot reach cosine {target} on the calibration texts even with every ranked "
                                f"MatMul in float (best {cosine:.5f}); ask for a lower --min-cosine or bf16")
        return model

    def load(self, directory: Path, manifest: Manifest) -> Engine:
        return OpenVINOEngine(directory, manifest)


__all__ = ["OpenVINOBackend", "native_bf16"]
