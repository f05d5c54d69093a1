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

Building needs a C++ compiler (Inductor's, `CXX` or g++); running does not
(`optimize.runtime.backends.inductor`).

Options (`CompileConfig.backend_options`):
- `freezing` (default True): fold weights into the compiled graph;
- `max_autotune` (default False): let Inductor benchmark kernel choices while building (slow).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.export import ExportedProgram

from optimize.backends import register_backend
from optimize.backends.base import Backend, BuildContext
from optimize.runtime.backends.inductor import PACKAGE_FILE, InductorEngine
from optimize.runtime.engine import Engine
from optimize.runtime.errors import ConfigError
from optimize.runtime.manifest import Manifest


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
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "bf16"})
    options: ClassVar[dict[str, Any]] = {"freezing": True, "max_autotune": False}

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
        with warnings.catch_warnings():  # torch 2.13 warns about its own pytree use while packaging
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            torch._inductor.aoti_compile_and_package(program, package_path=str(directory / PACKAGE_FILE),
                                                     inductor_configs=configs)
        ctx.record["inductor"] = {"torch": torch.__version__, "compiler": cxx_compiler(), **configs,
                                  "package": "AOTInductor (torch._inductor.aoti_compile_and_package)"}
        return [PACKAGE_FILE]

    def load(self, directory: Path, manifest: Manifest) -> Engine:
        return InductorEngine(directory, manifest)


__all__ = ["InductorBackend", "InductorEngine", "cxx_compiler"]
