"""Tensor specifications: one definition of names, dtypes and dynamic shape ranges.

The same `Dim` ranges drive `torch.export` dynamic dims, ONNX dynamic axes, TensorRT
optimization profiles and the server's shape validation, so they are defined once here and
serialized into every engine's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Canonical dtype names are numpy's; these tables are the only place that maps them.
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _TORCH_DTYPES.items()}


def dtype_name(dtype: torch.dtype | np.dtype | str) -> str:
    """Canonical name of a torch or numpy dtype ("float32", "int64", ...)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported tensor dtype {dtype}")
        return _DTYPE_NAMES[dtype]
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _TORCH_DTYPES:
        raise ValueError(f"unsupported tensor dtype {name!r}; expected one of {sorted(_TORCH_DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype for a canonical dtype name."""
    return _TORCH_DTYPES[dtype_name(name)]


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a canonical dtype name; bfloat16 has no numpy dtype and raises."""
    if name == "bfloat16":
        raise ValueError("bfloat16 has no numpy dtype; use torch tensors")
    return np.dtype(dtype_name(name))


@dataclass(frozen=True)
class Dim:
    """A symbolic dimension with the range an engine must accept (inclusive) and the size
    it is tuned for (`opt`)."""

    name: str
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"Dim.name must be an identifier, got {self.name!r}")
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(
                f"Dim {self.name!r}: need 1 <= min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}"
            )

    def contains(self, size: int) -> bool:
        return self.min <= size <= self.max

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Dim:
        return cls(data["name"], int(data["min"]), int(data["opt"]), int(data["max"]))


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one engine input or output.

    `shape` holds ints for static dims and `Dim`s for dynamic ones. `value_range` (inclusive)
    bounds the values of integer inputs such as token ids, so callers can reject an
    out-of-vocabulary id before it reaches an embedding lookup.
    """

    name: str
    dtype: str
    shape: tuple[int | Dim, ...]
    value_range: tuple[int, int] | None = None
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "shape", tuple(self.shape))
        for d in self.shape:
            if not isinstance(d, (int, Dim)) or (isinstance(d, int) and d < 0):
                raise ValueError(f"TensorSpec {self.name!r}: dims must be ints >= 0 or Dim, got {d!r}")

    @property
    def dims(self) -> list[Dim]:
        """The dynamic dims, in order."""
        return [d for d in self.shape if isinstance(d, Dim)]

    @property
    def token_layout(self) -> bool:
        """[batch, seq, ...]: a dynamic batch dim, then a dynamic (sequence) dim. Packed, such a
        tensor is [tokens, ...] (`Engine.run_packed`)."""
        return self.batched and len(self.shape) >= 2 and isinstance(self.shape[1], Dim)

    @property
    def batched(self) -> bool:
        """True when dim 0 is the dynamic `batch` dim, so requests can be concatenated."""
        return bool(self.shape) and isinstance(self.shape[0], Dim) and self.shape[0].name == "batch"

    def concrete(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """The shape with every dynamic dim replaced by `sizes[name]` (or its `opt`)."""
        return tuple(d if isinstance(d, int) else sizes.get(d.name, d.opt) for d in self.shape)

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        """None when `shape` is acceptable, else a one-line reason."""
        if len(shape) != len(self.shape):
            return f"input '{self.name}' has rank {len(shape)}, expected rank {len(self.shape)} {self.shape_str()}"
        for i, (got, want) in enumerate(zip(shape, self.shape)):
            if isinstance(want, int) and got != want:
                return f"input '{self.name}' dim {i} is {got}, expected {want} {self.shape_str()}"
            if isinstance(want, Dim) and not want.contains(got):
                return f"input '{self.name}' dim {i} ({want.name}) is {got}, allowed range is [{want.min}, {want.max}]"
        return None

    def check_values(self, values: np.ndarray | torch.Tensor) -> str | None:
        """None when every value lies in `value_range` (or there is none), else a one-line reason."""
        count = values.size if isinstance(values, np.ndarray) else values.numel()
        if self.value_range is None or count == 0:
            return None
        lo, hi = self.value_range
        vmin, vmax = (int(values.min()), int(values.max()))
        if vmin < lo or vmax > hi:
            bad = vmin if vmin < lo else vmax
            return f"input '{self.name}' holds value {bad}, outside the allowed range [{lo}, {hi}]"
        return None

    def shape_str(self) -> str:
        return "[" + ", ".join(str(d) if isinstance(d, int) else d.name for d in self.shape) + "]"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": [d if isinstance(d, int) else d.to_json() for d in self.shape],
        }
        if self.value_range is not None:
            out["value_range"] = list(self.value_range)
        if self.description:
            out["description"] = self.description
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else Dim.from_json(d) for d in data["shape"])
        vr = data.get("value_range")
        return cls(
            name=data["name"],
            dtype=data["dtype"],
            shape=shape,
            value_range=(int(vr[0]), int(vr[1])) if vr is not None else None,
            description=data.get("description", ""),
        )
