"""The interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.export import ExportedProgram

from optimize.passes.base import GENERIC_PASSES
from optimize.precision import PrecisionPlan, native_on_cpu
from optimize.runtime.config import CompileConfig
from optimize.runtime.engine import Engine
from optimize.runtime.errors import ConfigError, OptimizeError
from optimize.runtime.manifest import Manifest
from optimize.runtime.precision import facts
from optimize.runtime.specs import TensorSpec

if TYPE_CHECKING:
    import onnx

    from optimize.reporter import Reporter
    from optimize.sources.base import Source


@dataclass
class BuildContext:
    """What a backend needs besides the program: the config and the tensor contract.

    Optional, for backends that run graph passes or calibrate: `samples()` returns calibration
    batches (real sentences for text models, see `optimize.samples`), `reference` is the fp32
    eager model, `plan` is the precision plan (`Backend.precision_plan`), `reporter` shows
    progress, `previous` is the engine directory this build replaces (caches in it can seed the
    new build), `source` is the loaded model source (for backends that convert from the
    original weights rather than the captured program). For a backend that consumes ONNX,
    `onnx_model` is the exported program after the ONNX stage of the pass order. A backend
    reports back through `record` (build details: library versions, targets, profiles), which
    is written into the manifest.
    """

    config: CompileConfig
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    samples: Callable[[], list[dict[str, torch.Tensor]]] | None = None
    reference: Callable[..., dict[str, torch.Tensor]] | None = None
    reporter: Reporter | None = None
    previous: Path | None = None
    source: Source | None = None
    plan: PrecisionPlan | None = None
    onnx_model: onnx.ModelProto | None = None
    record: dict[str, Any] = field(default_factory=dict)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512_BF16 or AMX-BF16), read from
    /proc/cpuinfo; False where that file does not exist."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


class Backend(ABC):
    """The build half of a backend: builds an engine payload from a captured program. Its
    engines are run by the runtime half, `optimize.runtime.backends.<name>`."""

    name: ClassVar[str]
    precisions: ClassVar[frozenset[str]]
    # The passes of the pass order (`optimize.passes.order`) this backend takes: the FX passes
    # whose result it can execute and, for a backend that consumes ONNX, the ONNX passes.
    passes: ClassVar[frozenset[str]] = GENERIC_PASSES
    # True for a backend built from kiln's ONNX export: the build exports the program and runs
    # the ONNX stage (with `onnx_options`) before `build`, which finds the model in `ctx.onnx_model`.
    consumes_onnx: ClassVar[bool] = False

    # Settings only this backend understands (`CompileConfig.backend_options`), with defaults.
    options: ClassVar[dict[str, Any]] = {}

    # The tasks (`optimize.sources.tasks`) whose engines this backend can build; None: every
    # task its graph can express. `auto` skips a backend that cannot build the model's task
    # rather than capturing the model for it first.
    tasks: ClassVar[frozenset[str] | None] = None

    def refuses_task(self, task: str | None) -> str | None:
        """Why this backend cannot build an engine for `task`, or None if it can (or the task
        is unknown)."""
        if task is None or self.tasks is None or task in self.tasks:
            return None
        return f"{self.name} builds {', '.join(sorted(self.tasks))} engines only; task {task} needs another backend"

    # False for backends that apply precision as graph passes (casts, Q/DQ nodes) over an
    # fp32 capture; True for those that capture the program in the precision.
    captures_precision: ClassVar[bool] = True

    def quantized_compute(self, options: dict[str, Any], calibrated: bool) -> torch.dtype:
        """The float type a quantized precision leaves its other ops in, given the resolved
        options and whether activations are quantized too; fp32 unless the backend says
        otherwise."""
        return torch.float32

    def precision_plan(self, config: CompileConfig) -> PrecisionPlan:
        """`config.precision` resolved for this backend (see `optimize.precision`): what
        every pass and this backend's build read."""
        options = self.resolve_options(config)
        calibrated = facts(config.precision).calibrated
        return PrecisionPlan.resolve(config, captures_precision=self.captures_precision,
                                     quantized_compute=self.quantized_compute(options, calibrated))

    def onnx_options(self, config: CompileConfig) -> dict[str, Any]:
        """The options the ONNX passes read (`OnnxPassContext.options`): this backend's
        resolved options, with the pass settings the backend fixes."""
        return self.resolve_options(config)

    def can_run_here(self) -> tuple[bool, str]:
        """(True, "") when engines of this backend can run on this machine, else (False, the
        reason). A backend that cannot still builds (ahead of time), unverified, and says why."""
        return True, ""

    def can_build_here(self) -> tuple[bool, str]:
        """(True, "") when this machine has what building needs (a compiler, ...), else (False,
        the reason); `--backend auto` lists a backend that cannot build as skipped, with it."""
        return True, ""

    def native_precisions(self) -> frozenset[str]:
        """The precisions this backend computes natively on this machine; `--backend auto`
        tries only these, since an emulated fp16 or bf16 is slower than fp32, not faster. Every
        precision with a CUDA GPU; without one, bf16 only on CPUs with bf16 dot products."""
        if torch.cuda.is_available():
            return self.precisions
        cpu_bf16 = cpu_has_native_bf16()
        return frozenset(p for p in self.precisions if native_on_cpu(p, cpu_bf16))

    def resolve_options(self, config: CompileConfig) -> dict[str, Any]:
        """`config.backend_options` over this backend's defaults; raises `ConfigError` naming
        an option this backend does not know."""
        unknown = sorted(set(config.backend_options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(f"backend {self.name!r} has no option(s) {', '.join(unknown)}; its options: {known}")
        return {**self.options, **config.backend_options}

    def prepared_onnx(self, ctx: BuildContext) -> onnx.ModelProto:
        """The model the build's ONNX stage prepared for this backend; raises `OptimizeError`
        when there is none (`build` called without the stage, which `optimize.build` runs)."""
        if ctx.onnx_model is None:
            raise OptimizeError(f"backend {self.name!r} builds from the ONNX stage's model; "
                                "build it with optimize.compile, which runs that stage first")
        return ctx.onnx_model

    @abstractmethod
    def build(self, program: ExportedProgram, ctx: BuildContext, directory: Path) -> list[str]:
        """Write the payload into `directory`; return the payload's relative file names."""

    @abstractmethod
    def load(self, directory: Path, manifest: Manifest) -> Engine:
        """Open the engine stored in `directory`: the `Engine` class of this backend's runtime
        half (`optimize.runtime.backends.<name>`)."""
