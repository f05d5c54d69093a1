"""Build steps pyproject.toml cannot declare; all metadata lives in pyproject.toml.

1. gRPC stubs: `build_py` generates the KServe v2 Python stubs from `protos/*.proto` into
   `server/proto/` (git-ignored) with grpcio-tools, before the package files are collected.
2. CUDA extension: `kiln_kernels._C` from csrc/, when nvcc is present (see the section below).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_codegen():  # type: ignore[no-untyped-def]
    """server/proto/codegen.py, loaded by path: importing the `server` package would import
    its runtime dependencies, which a build environment does not have."""
    spec = importlib.util.spec_from_file_location("_kiln_codegen", ROOT / "server" / "proto" / "codegen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithStubs(build_py):
    """`build_py` that first generates the gRPC stubs, so wheels and editable installs ship them."""

    def run(self) -> None:
        codegen = _load_codegen()
        for path in codegen.generate(ROOT / "protos", ROOT):
            self.announce(f"generated {path.relative_to(ROOT)}", level=2)
        super().run()


# ---------------------------------------------------------------------------------------------
# CUDA extension `kiln_kernels._C` from csrc/ (see csrc/build.py): built when nvcc is present,
# skipped with one message otherwise, so CPU-only installs are unaffected.
def _load_cuda_build():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("_kiln_cuda_build", ROOT / "csrc" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_cuda = _load_cuda_build()
_extension = _cuda.cuda_extension()
# ---------------------------------------------------------------------------------------------


setup(
    cmdclass={"build_py": BuildPyWithStubs, "build_ext": _cuda.BuildExtWithCuda},
    ext_modules=[_extension] if _extension is not None else [],
)
