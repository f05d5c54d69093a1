"""Backend `tensorrt`: a TensorRT engine (`engine.plan`) built from kiln's prepared ONNX.

Uses `tensorrt` when it is installed, else `tensorrt_rtx` (PyPI `tensorrt-rtx-cu13`), which
builds engines ahead of time on a machine without a GPU for SM75–SM121 (no SM90). Networks are
strongly typed (TensorRT 10+ dropped the precision flags; TensorRT-RTX never had them), so the
precision comes from the graph: the ONNX passes insert casts (fp16/bf16 with fp32 islands for
norms, softmax, reductions and overflowing tensors) and Q/DQ nodes (int8, or fp8 E4M3 for
SM89+: Ada, Hopper, Blackwell). One optimization profile spans the TensorSpec ranges: min/opt/max
of every `Dim`.

Caches, persisted in the engine directory:
- `timing.cache` (full TensorRT): kernel timings, seeded from the engine this build replaces,
  so a rebuild skips most autotuning. TensorRT-RTX's timing cache queries the GPU, so it is
  left off where there is none (building with it fails there).
- `runtime.cache` (TensorRT-RTX): kernels it compiles just in time on the first runs, loaded
  when the engine is opened and saved back when the directory is writable.

Options (`CompileConfig.backend_options`):
- `optimization_level` (0–5, default 3): builder optimization level;
- `compute_capabilities` ("auto" or a list such as ["sm89", "sm120"]; TensorRT-RTX only):
  "auto" is the GPU here, or every target the library supports when there is no GPU (for
  precision fp8, every one from SM89 on);
- `quantized_fallback` ("fp16" default | "bf16" | "fp32"): type of the ops int8 / fp8 leave;
- `workspace_mib` (0 = TensorRT's default): builder workspace limit;
- `int8_keep_sensitive` (default True): keep the worst-quantizing MatMuls in float until the
  calibration samples are within tolerance (int8 and fp8).

Running needs a CUDA GPU and torch with CUDA: inputs are torch tensors moved to the GPU, input
shapes are set per call, tensor addresses bound, and the engine is enqueued on the current
stream. Loading an engine built by another TensorRT version, or for another GPU, fails with a
message that says which.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch.export import ExportedProgram

from optimize.backends import register_backend
from optimize.backends.base import Backend, BuildContext
from optimize.onnx import ort_verifier
from optimize.onnx.base import OnnxPassContext
from optimize.passes.base import GENERIC_PASSES
from optimize.runtime.backends.tensorrt import PLAN_FILE, TensorRTEngine, collecting_logger, cuda_device, library
from optimize.runtime.config import CompileConfig
from optimize.runtime.engine import Engine
from optimize.runtime.errors import ConfigError, OptimizeError
from optimize.runtime.manifest import Manifest
from optimize.runtime.precision import FLOAT_NAMES, facts

TIMING_CACHE_FILE = "timing.cache"
# Oldest target per compute type in TensorRT-RTX: bf16 needs Ampere (SM80)+, fp8 Ada (SM89)+
# ("Cannot compile for target(s) sm80, because the model contains HW-specific datatypes:
# fp8_e4m3", tensorrt_rtx 1.7), and fp32 GEMMs are not compiled for Turing ("Cannot compile
# operation ... for Turing (SM75): FP32 GEMM is not supported", building all-MiniLM-L6-v2 at fp32).
MIN_SM = {"fp32": 80, "bf16": 80, "fp8": 89}


class TensorRTBuildError(OptimizeError):
    """TensorRT could not parse the model or build an engine from it."""


def require_library() -> tuple[ModuleType, str]:
    found = library()
    if found is None:
        raise ConfigError("backend 'tensorrt' needs TensorRT: pip install 'kiln[tensorrt]' (tensorrt-rtx-cu13), "
                          "or NVIDIA's tensorrt")
    return found


def _sm(text: str) -> int:
    digits = "".join(c for c in str(text) if c.isdigit())
    if not digits:
        raise ConfigError(f"compute capability {text!r} is not of the form sm89")
    return int(digits)


def resolve_targets(trt: ModuleType, flavour: str, option: Any, precision: str,
                    fallback: str | None = None) -> list[str]:
    """The compute capabilities to build for, as "SM89"-style names ([] for full TensorRT,
    which builds for the GPU it runs on). Every target must support both `precision` and
    `fallback` (the type a quantized precision leaves its other ops in). Raises `ConfigError`
    naming the oldest SM allowed when a target, or full TensorRT's GPU, is older."""
    needs = {p: MIN_SM.get(p, 0) for p in (precision, fallback) if p}
    limiting = max(needs, key=lambda p: needs[p])
    floor = needs[limiting]
    if flavour != "tensorrt_rtx" or not hasattr(trt, "ComputeCapability"):
        if option not in ("auto", None):
            raise ConfigError("backend option compute_capabilities needs tensorrt_rtx; full TensorRT builds for its own GPU")
        device = cuda_device()
        if device is not None and device[1] < floor:
            raise ConfigError(f"precision {limiting} needs SM{floor} or newer; this GPU ({device[0]}) is SM{device[1]}")
        return []
    supported = sorted((_sm(n) for n in trt.ComputeCapability.__members__ if n.startswith("SM")))
    if option in ("auto", None):
        device = cuda_device()
        wanted = [device[1]] if device else [sm for sm in supported if sm >= floor]
    else:
        wanted = [_sm(t) for t in (option if isinstance(option, (list, tuple)) else str(option).split(","))]
    unknown = [sm for sm in wanted if sm not in supported]
    if unknown:
        raise ConfigError(f"{flavour} cannot target SM{unknown[0]}; it supports "
                          f"{', '.join(f'SM{sm}' for sm in supported)}")
    too_old = [sm for sm in wanted if sm < floor]
    if too_old:
        raise ConfigError(f"precision {limiting} needs SM{floor} or newer; SM{too_old[0]} was asked for")
    return [f"SM{sm}" for sm in wanted]


class _Progress:
    """Forwards TensorRT's top-level build phases to kiln's progress display."""

    def __init__(self, trt: ModuleType, reporter: Any) -> None:
        class Monitor(trt.IProgressMonitor):  # type: ignore[misc,name-defined]
            def __init__(self) -> None:
                trt.IProgressMonitor.__init__(self)
                self.starts: dict[str, float] = {}

            def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
                if parent_phase is None and reporter is not None:
                    self.starts[phase_name] = time.perf_counter()
                    reporter.start(f"tensorrt: {phase_name}", num_steps or None)

            def step_complete(self, phase_name: str, step: int) -> bool:
                if phase_name in self.starts:
                    reporter.advance()
                return True

            def phase_finish(self, phase_name: str) -> None:
                if phase_name in self.starts:
                    reporter.finish(f"tensorrt: {phase_name}", round(time.perf_counter() - self.starts.pop(phase_name), 3))

        self.monitor = Monitor()


def build_plan(model_bytes: bytes, ctx: BuildContext, options: dict[str, Any], previous: Path | None,
               directory: Path) -> tuple[bytes, dict[str, Any], list[str]]:
    """Parse the ONNX model and build a serialized engine; return it, the build record, and the
    extra payload files written (the timing cache)."""
    trt, flavour = require_library()
    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if flavour == "tensorrt" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model_bytes):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        raise TensorRTBuildError(f"{flavour} cannot parse the model: {errors[0] if errors else logger.errors()}")

    config = builder.create_builder_config()
    level = int(options["optimization_level"])
    if not 0 <= level <= 5:
        raise ConfigError(f"backend option optimization_level must be 0..5; got {level}")
    config.builder_optimization_level = level
    if int(options["workspace_mib"]) > 0:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options["workspace_mib"]) << 20)
    targets = resolve_targets(trt, flavour, options["compute_capabilities"], ctx.config.precision,
                              options["quantized_fallback"] if facts(ctx.config.precision).quantized else None)
    if targets:
        config.num_compute_capabilities = len(targets)
        for i, target in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, target), i)

    profile = builder.create_optimization_profile()
    specs = {s.name: s for s in ctx.inputs}
    shapes: dict[str, dict[str, list[int]]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        spec = specs.get(tensor.name)
        if spec is None:
            raise TensorRTBuildError(f"network input {tensor.name!r} has no TensorSpec")
        lo, opt, hi = (spec.concrete({d.name: getattr(d, k) for d in spec.dims}) for k in ("min", "opt", "max"))
        profile.set_shape(tensor.name, lo, opt, hi)
        shapes[tensor.name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
    config.add_optimization_profile(profile)

    # The timing cache: full TensorRT always; TensorRT-RTX only with a GPU (it queries one).
    extra_files: list[str] = []
    cache = None
    timing = "off"
    if flavour == "tensorrt" or cuda_device() is not None:
        seed = previous / TIMING_CACHE_FILE if previous is not None else None
        cache = config.create_timing_cache(seed.read_bytes() if seed is not None and seed.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        timing = "reused from the previous engine" if seed is not None and seed.is_file() else "new"
    else:
        timing = f"off ({flavour} queries a GPU for it; none here)"
    if hasattr(config, "progress_monitor") and ctx.reporter is not None:
        config.progress_monitor = _Progress(trt, ctx.reporter).monitor

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise TensorRTBuildError(f"{flavour} failed to build the engine: {logger.errors()}")
    plan = bytes(memoryview(plan))
    if cache is not None:
        (directory / TIMING_CACHE_FILE).write_bytes(bytes(cache.serialize()))
        extra_files.append(TIMING_CACHE_FILE)
    device = cuda_device()
    record = {
        "library": flavour,
        "version": trt.__version__,
        "compute_capabilities": targets,
        "build_device": {"name": device[0], "sm": device[1]} if device else None,
        "optimization_level": level,
        "profile": shapes,
        "timing_cache": timing,
        "plan_bytes": len(plan),
        "build_seconds": round(seconds, 3),
    }
    return plan, record, extra_files


@register_backend
class TensorRTBackend(Backend):
    name: ClassVar[str] = "tensorrt"
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16", "bf16", "int8", "int8-weight", "fp8"})
    options: ClassVar[dict[str, Any]] = {
        "optimization_level": 3,
        "compute_capabilities": "auto",
        "quantized_fallback": "fp16",
        "workspace_mib": 0,
        "int8_keep_sensitive": True,
    }
    # contrib ops are ONNX Runtime's only, so no onnx_ort_fusions
    passes: ClassVar[frozenset[str]] = GENERIC_PASSES | {
        "onnx_fold_constants", "onnx_fuse_layer_norm", "onnx_fuse_gelu", "onnx_simplify_attention", "onnx_quantize",
        "onnx_mixed_precision"}
    consumes_onnx: ClassVar[bool] = True
    captures_precision: ClassVar[bool] = False

    def quantized_compute(self, options: dict[str, Any], calibrated: bool) -> torch.dtype:
        return FLOAT_NAMES[options["quantized_fallback"]]

    def can_run_here(self) -> tuple[bool, str]:
        found = library()
        if found is None:
            return False, "neither tensorrt nor tensorrt_rtx is installed"
        if cuda_device() is None:
            return False, f"no CUDA GPU on this machine ({found[1]} built the engine ahead of time)"
        return True, ""

    def can_build_here(self) -> tuple[bool, str]:
        if library() is None:
            return False, "needs TensorRT: pip install 'kiln[tensorrt]' (tensorrt-rtx-cu13), or NVIDIA's tensorrt"
        return True, ""

    def resolve_options(self, config: CompileConfig) -> dict[str, Any]:
        """The options over their defaults; raises `ConfigError` for a bad value, and for
        targets too old for the precision (fp8 needs SM89+) before anything is built."""
        options = super().resolve_options(config)
        if options["quantized_fallback"] not in FLOAT_NAMES:
            raise ConfigError(f"backend option quantized_fallback must be fp16, bf16 or fp32; got {options['quantized_fallback']!r}")
        found = library()
        if found is not None:
            resolve_targets(*found, options["compute_capabilities"], config.precision,
                            options["quantized_fallback"] if facts(config.precision).quantized else None)
        return options

    def onnx_options(self, config: CompileConfig) -> dict[str, Any]:
        # TensorRT runs symmetric int8 activations only, and int8-weight as weight-only Q/DQ
        return {**self.resolve_options(config), "int8_activations": "int8", "int8_weight_mode": "weight_only"}

    def build(self, program: ExportedProgram, ctx: BuildContext, directory: Path) -> list[str]:
        require_library()
        options = self.resolve_options(ctx.config)
        model = self.prepared_onnx(ctx)
        with tempfile.TemporaryDirectory(prefix="kiln-tensorrt-") as workdir:
            model_bytes = model.SerializeToString()
            plan, record, files = build_plan(model_bytes, ctx, options, ctx.previous, directory)
            if not self.can_run_here()[0]:
                # The plan cannot run here; the graph it was built from can, on ONNX Runtime:
                # a check of the passes' numerics (not of TensorRT's kernels), labelled as such.
                check = ort_verifier(OnnxPassContext(ctx.config, ctx.inputs, ctx.outputs, self.name, Path(workdir),
                                                     samples=ctx.samples, reference=ctx.reference))
                if check is not None:
                    record["prepared_onnx_check"] = {
                        "runner": "onnxruntime CPU (checks the graph rewrites; fp16 ops may run in fp32 there)",
                        "reference": "fp32 eager", **check(model)}
        (directory / PLAN_FILE).write_bytes(plan)
        ctx.record["tensorrt"] = record
        return [PLAN_FILE, *files]

    def load(self, directory: Path, manifest: Manifest) -> Engine:
        return TensorRTEngine(directory, manifest)


__all__ = ["TensorRTBackend", "TensorRTBuildError", "resolve_targets"]
