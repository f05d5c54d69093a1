"""Build support for the optional CUDA extension `kiln_kernels._C` (used by setup.py).

The .cu files are compiled by nvcc into objects and linked with the pybind11 bindings and the
*static* CUDA runtime, so the module has no libcudart dependency: it imports on machines with
no GPU or driver and reports "no CUDA device" when called there. Without nvcc the extension is
skipped with one clear message and the rest of kiln installs as usual.

Environment:
- `KILN_CUDA_ARCHS`: semicolon-separated SM versions to compile for (default "80;90": Ampere and
  Hopper SASS, plus PTX of the newest for forward compatibility); e.g. "90" on an H100.
- `KILN_SKIP_CUDA=1`: never build the extension.
- `CUDA_HOME` / `CUDA_PATH`: the toolkit, when nvcc's location does not reveal it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension
from setuptools.command.build_ext import build_ext

CSRC = Path(__file__).resolve().parent
KERNEL_SOURCES = ("layer_norm.cu", "softmax.cu", "packing.cu")
DEFAULT_ARCHS = "80;90"


def find_nvcc() -> str | None:
    if os.environ.get("KILN_SKIP_CUDA") == "1":
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_home(nvcc: str) -> Path:
    """The toolkit root (holding include/cuda_runtime.h), even when `nvcc` is a wrapper script."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        top = re.search(r"^#\$ TOP=(.+)$", dry.stderr + dry.stdout, re.MULTILINE)
        if top:
            candidates.append(top.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    candidates += [str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").exists():
            return Path(candidate).resolve()
    raise RuntimeError(f"cannot find the CUDA toolkit of {nvcc}; set CUDA_HOME")


def gencode_flags(archs: str) -> list[str]:
    sms = [a.strip().replace(".", "") for a in archs.split(";") if a.strip()]
    if not sms or not all(s.isdigit() for s in sms):
        raise RuntimeError(f"KILN_CUDA_ARCHS must look like '80;90'; got {archs!r}")
    flags = [f"-gencode=arch=compute_{s},code=sm_{s}" for s in sms]
    flags.append(f"-gencode=arch=compute_{sms[-1]},code=compute_{sms[-1]}")  # PTX for newer GPUs
    return flags


def cuda_extension() -> Extension | None:
    """The `kiln_kernels._C` extension when nvcc is available, else None (after saying so once)."""
    nvcc = find_nvcc()
    if nvcc is None:
        print("kiln: nvcc not found (or KILN_SKIP_CUDA=1): skipping the CUDA extension kiln_kernels._C; "
              "the Triton kernels and CPU references still work", file=sys.stderr)
        return None
    import pybind11

    home = cuda_home(nvcc)
    lib = next((p for p in (home / "lib64", home / "lib", home / "targets" / "x86_64-linux" / "lib")
                if (p / "libcudart_static.a").exists()), home / "lib64")
    archs = os.environ.get("KILN_CUDA_ARCHS", DEFAULT_ARCHS)
    return Extension(
        "kiln_kernels._C",
        sources=[str((CSRC / "bindings.cpp").relative_to(CSRC.parent))],
        include_dirs=[pybind11.get_include(), str(home / "include"), str(CSRC)],
        library_dirs=[str(lib)],
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-O2", "-std=c++17", f'-DKILN_CUDA_ARCHS="{archs}"'],
        language="c++",
    )


class BuildExtWithCuda(build_ext):
    """build_ext that first compiles the .cu kernels with nvcc and links their objects in."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name == "kiln_kernels._C":
            nvcc = find_nvcc()
            assert nvcc is not None
            archs = os.environ.get("KILN_CUDA_ARCHS", DEFAULT_ARCHS)
            out_dir = Path(self.build_temp) / "csrc"
            out_dir.mkdir(parents=True, exist_ok=True)
            objects = []
            for name in KERNEL_SOURCES:
                obj = out_dir / (name + ".o")
                cmd = [nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
                       *gencode_flags(archs), "-I", str(CSRC), "-c", str(CSRC / name), "-o", str(obj)]
                print(f"kiln: nvcc {name} (sm {archs})", file=sys.stderr)
                subprocess.run(cmd, check=True)
                objects.append(str(obj))
            ext.extra_objects = objects
        super().build_extension(ext)
