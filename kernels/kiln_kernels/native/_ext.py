"""Access to the compiled CUDA extension `kiln_kernels._C` (built from csrc/ by setup.py).

The extension is optional: without nvcc at install time it is absent, and without a GPU it
imports but reports no device. `extension()` returns the module or raises one clear error.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        from kiln_kernels import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"the CUDA extension kiln_kernels._C is not built ({exc}); reinstall with nvcc on PATH"
    return _C, ""


def extension() -> ModuleType:
    """The loaded `kiln_kernels._C` module; raises RuntimeError saying why when it is unavailable."""
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    return module


def is_built() -> bool:
    return _load()[0] is not None


def available() -> bool:
    """True when the extension is built and a CUDA device is visible to it."""
    module, _ = _load()
    return module is not None and module.device_count() > 0


def stream_handle(tensor: torch.Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


def check_cuda_tensor(name: str, tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...], align: int = 16) -> None:
    """Raise ValueError naming `name` unless `tensor` is a contiguous CUDA tensor of one of
    `dtypes` whose data pointer is `align`-byte aligned (16 for 128-bit vector loads)."""
    if not tensor.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor; got device {tensor.device}")
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype {allowed}; got {str(tensor.dtype).removeprefix('torch.')}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if tensor.data_ptr() % align:
        raise ValueError(f"{name} must be {align}-byte aligned (got a view at offset {tensor.data_ptr() % align})")
