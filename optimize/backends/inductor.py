"""Backend `inductor`: the captured program compiled ahead of time by TorchInductor (AOTInductor).

`torch.compile` is what a PyTorch user tries first; this backend gives the same code generator
(fused C++/OpenMP kernels, oneDNN for matmuls) without its cost at every start: the
`torch.export` program is compiled once into a shared library packaged as `model.pt2`
(`torch._inductor.aoti_compile_and_package`), and loading opens that package
(`torch._inductor.aoti_load_package`) without tracing or compiling anything again. The batch and
sequence dims stay dynamic within the engine's ranges (the program's symbolic dims become the
library's run-time sizes).

Freezing is on: weights are constants of the graph, so Inductor folds what depends only on
them and pre-packs the matmul weights for oneDNN. `bf16` is captured in bf16 (like `eager`);
on CPUs with AMX or AVX512_BF16 oneDNN runs its matmuls on those units, norms and softmax stay
in the fp32 the capture keeps them in. Offered only there (elsewhere bf16 would be emulated).

`int8` (weights and activations) writes PT2E's quantize / dequantize nodes around the linears
(`optimize.backends.inductor_int8`: SmoothQuant, per-channel weights, calibration on real text),
which Inductor lowers to oneDNN int8 GEMMs (AMX-INT8 or VNNI where the CPU has them). The build
measures which linears int8 hurts most and keeps them in float until the calibration texts meet
the guard's cosine (`optimize.backends.int8_search`); a guard no selection meets is refused by
name. What is not int8 computes in bf16 on CPUs with native bf16, else in fp32.

The compile runs with autograd off: Inductor freezes (and so folds and pre-packs) only then.

Building needs a C++ compiler (Inductor's, `CXX` or g++); running does not
(`optimize.runtime.backends.inductor`).

Options (`CompileConfig.backend_options`):
- `freezing` (default True): fold weights into the compiled graph;
- `max_autotune` (default False): let Inductor benchmark kernel choices while building (slow);
- `int8_smooth_quant` ("auto"): SmoothQuant's alpha for int8: "auto" keeps the best of
  `SMOOTH_QUANT_ALPHAS` on the calibration texts, a number fixes it (-1 turns SmoothQuant off);
- `int8_keep_sensitive` (True): keep the linears int8 hurts most in float until the guard is met.
"""

from __future__ import annotations

import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.export import ExportedProgram

from optimize.backends import int8_search, register_backend
from optimize.backends.base import Backend, BuildContext, cpu_has_native_bf16
from optimize.capture import export_module
from optimize.runtime.backends.inductor import PACKAGE_FILE, InductorEngine
from optimize.runtime.config import CompileConfig
from optimize.runtime.engine import Engine
from optimize.runtime.errors import AccuracyError, ConfigError
from optimize.runtime.manifest import Manifest
from optimize.verify import compare_real_tokens

# SmoothQuant alphas `int8_smooth_quant: "auto"` tries; measured on all-MiniLM-L6-v2 (calibration
# sentences, every linear int8, bf16 elsewhere): 0.5 -> worst cosine 0.966, 0.65 -> 0.976,
# 0.8 -> 0.980, 0.95 -> 0.955. The best differs per model, so the build measures instead of fixing one.
SMOOTH_QUANT_ALPHAS = (0.5, 0.65, 0.8, 0.95)
DEFAULT_SMOOTH_QUANT_ALPHA = 0.8  # without a reference model to measure against
# The int8 search aims the calibration texts at this share of the cosine loss the guard allows:
# they are few (64 built-in sentences), and a selection that just meets the guard on them missed
# it on the held-out ones (all-MiniLM-L6-v2, guard 0.999: calibration 0.9990, held-out 0.9972).
CALIBRATION_SHARE = 0.5


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor would build with, or None when there is none on this machine."""
    try:
        # why: a private torch module, so a torch without it only loses this backend
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
    except Exception:  # noqa: BLE001 - torch raises plain RuntimeError when it finds none
        return None
    return compiler if shutil.which(compiler) else None


@register_backend
class InductorBackend(Backend):
    name: ClassVar[str] = "inductor"
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "bf16", "int8"})
    options: ClassVar[dict[str, Any]] = {"freezing": True, "max_autotune": False,
                                         "int8_smooth_quant": "auto", "int8_keep_sensitive": True}

    def quantized_compute(self, options: dict[str, Any], calibrated: bool) -> torch.dtype:
        """What int8 leaves outside int8 (the linears kept in float, attention, norms): bf16 on
        a CPU with native bf16, where the program is captured in bf16 and the int8 GEMMs write
        bf16 (measured on all-MiniLM-L6-v2 8x128: 25 ms against 27 with fp32 around them);
        fp32 elsewhere."""
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32

    def resolve_options(self, config: CompileConfig) -> dict[str, Any]:
        options = super().resolve_options(config)
        int8_search.check_smooth_quant(options)
        return options

    def can_build_here(self) -> tuple[bool, str]:
        if cxx_compiler() is None:
            return False, "AOTInductor needs a C++ compiler (g++, or one named by CXX) to build"
        return True, ""

    def build(self, program: ExportedProgram, ctx: BuildContext, directory: Path) -> list[str]:
        options = self.resolve_options(ctx.config)
        buildable, why = self.can_build_here()
        if not buildable:
            raise ConfigError(f"backend 'inductor': {why}")
        configs = {"freezing": bool(options["freezing"]), "max_autotune": bool(options["max_autotune"])}
        plan = ctx.plan or self.precision_plan(ctx.config)
        if plan.calibrated:
            program = self._quantize(program, ctx, options, plan.compute)
        # why no_grad: Inductor freezes only with autograd off (torch 2.13, compile_fx); with it on
        # the weights stay graph inputs, unfolded and not pre-packed, and int8 is never lowered
        with warnings.catch_warnings(), torch.no_grad():
            # torch 2.13 warns about its own pytree use while packaging, and its int8 lowering
            # about a tensor it copies (mkldnn_lowerings, once per int8 GEMM)
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
            torch._inductor.aoti_compile_and_package(program, package_path=str(directory / PACKAGE_FILE),
                                                     inductor_configs=configs)
        ctx.record["inductor"] = {"torch": torch.__version__, "compiler": cxx_compiler(), **configs,
                                  "package": "AOTInductor (torch._inductor.aoti_compile_and_package)"}
        return [PACKAGE_FILE]

    def _quantize(self, program: ExportedProgram, ctx: BuildContext, options: dict[str, Any],
                  compute: torch.dtype) -> ExportedProgram:
        """The program with its linears in int8 (`inductor_int8`), calibrated on the samples; with
        a reference model SmoothQuant's alpha is the one whose all-int8 model scores best on the
        calibration texts, and with `int8_keep_sensitive` and a guard the linears int8 hurts most
        stay in float until the texts meet the guard's cosine."""
        from optimize.backends import inductor_int8  # why: loads torch's quantization ops, which only int8 needs

        gm = program.module()
        groups = inductor_int8.groups(gm)
        if not groups:
            raise ConfigError("backend 'inductor' quantizes linears (aten.linear by a constant weight) to int8 and "
                              "this model has none; build it in bf16 or fp32, or int8 on another backend")
        batches = ctx.samples() if ctx.samples is not None else []
        if not batches:
            raise ConfigError("int8 calibration needs samples and none are available")
        if ctx.source is None:
            raise ConfigError("backend 'inductor' builds int8 from the model source; build it with optimize.compile")
        reporter = ctx.reporter
        stage = f"calibrate int8 ({len(batches)} batches)"
        if reporter is not None:
            reporter.start(stage)
        t0 = time.perf_counter()
        names = [s.name for s in ctx.inputs]
        stats = inductor_int8.observe(gm, batches, names)
        score = _scorer(batches, ctx, names) if ctx.reference is not None else None

        def quantize(alpha: float, keep: list[str]) -> torch.fx.GraphModule:
            return inductor_int8.quantize(gm, stats, alpha, keep, compute=compute)

        fixed = options["int8_smooth_quant"]
        alphas = SMOOTH_QUANT_ALPHAS if fixed == "auto" else (float(fixed),)
        tried: dict[float, float] = {}
        if score is None or len(alphas) == 1:
            alpha = alphas[-1] if len(alphas) == 1 else DEFAULT_SMOOTH_QUANT_ALPHA
            quantized = quantize(alpha, [])
        else:  # one quantized copy alive at a time: each holds the model's weights
            alpha, quantized = alphas[0], None
            for a in alphas:
                candidate = quantize(a, [])
                tried[a] = score(candidate)
                if quantized is None or tried[a] > tried[alpha]:
                    alpha, quantized = a, candidate
                del candidate
        record: dict[str, Any] = {"mode": "static", "tool": f"kiln PT2E-form Q/DQ, Inductor {torch.__version__}",
                                  "batches": len(batches), "smooth_quant_alpha": alpha,
                                  "activations": "uint8 per tensor (asymmetric, clipped for least error)",
                                  "weights": "int8 per channel (symmetric)",
                                  "float_compute": str(compute).removeprefix("torch."),
                                  "linears": sum(len(g) for g in groups)}
        if tried:
            record["smooth_quant_alphas_tried"] = {str(a): round(c, 6) for a, c in tried.items()}
        tol = ctx.config.tolerance
        if options["int8_keep_sensitive"] and score is not None and tol is not None:
            target = 1.0 - (1.0 - tol.min_cosine) * CALIBRATION_SHARE
            base = tried[alpha] if alpha in tried else score(quantized)
            quantizers = [int8_search.Quantizer(group[0], group) for group in groups]
            quantized, cosine = int8_search.keep_sensitive(
                quantized, quantizers, lambda q: score(quantize(alpha, q.matmuls)), lambda keep: quantize(alpha, keep),
                score, base, target, record, kind="linears", name=_model_name, reporter=reporter)
            if cosine < target:
                raise AccuracyError(f"int8 cannot reach cosine {target:.6g} on the calibration texts even with every "
                                    f"ranked linear in float (best {cosine:.5f}); ask for a lower --min-cosine or bf16")
        if reporter is not None:
            reporter.finish(stage, round(time.perf_counter() - t0, 3))
        ctx.record["quantization"] = record
        return export_module(quantized, ctx.source)

    def load(self, directory: Path, manifest: Manifest) -> Engine:
        return InductorEngine(directory, manifest)


def _model_name(weight: str) -> str:
    """A linear's weight as the model names it, without the prefixes of kiln's capture wrappers
    ("module.gm.module.module.model.encoder..." -> "encoder...")."""
    return re.sub(r"^((module|gm|model)\.)+", "", weight)


def _scorer(batches: list[dict[str, torch.Tensor]], ctx: BuildContext,
            names: list[str]) -> Callable[[torch.fx.GraphModule], float]:
    """A function that runs a quantized graph eagerly (its Q/DQ nodes round as the int8 kernels
    do) and returns its worst cosine to the fp32 reference over the calibration batches."""
    assert ctx.reference is not None
    with torch.inference_mode():
        references = [ctx.reference(**feeds) for feeds in batches]
    outputs = [s.name for s in ctx.outputs]

    def score(model: torch.fx.GraphModule) -> float:
        worst = 1.0
        with torch.inference_mode():
            for feeds, expected in zip(batches, references):
                got = model(*[feeds[n] for n in names])
                if not isinstance(got, dict):
                    got = dict(zip(outputs, got if isinstance(got, tuple | list) else [got]))
                stats = compare_real_tokens(feeds, expected, {n: got[n].float() for n in outputs})
                worst = min(worst, *(v["min_cosine"] for v in stats.values()))
        return worst

    return score


__all__ = ["InductorBackend", "InductorEngine", "SMOOTH_QUANT_ALPHAS", "cxx_compiler"]
