"""FLOP and byte accounting shared by every op.

The profiler, the roofline plot and the benchmarks' GB/s and TFLOP/s all divide a measured
time into a :class:`Cost`, so every number that says "how fast" agrees on "how much work".

Conventions, used by every op's cost model:

* ``flops`` counts floating-point additions, multiplications, divisions, comparisons and
  transcendental calls (exp, erf, tanh, rsqrt) as one each, per element, on the values the op
  promises to compute. Index arithmetic and per-row scalars that are negligible next to the
  per-element work (one ``rsqrt`` per row) are left out, and each cost function says so.
* ``bytes`` is the *minimum* traffic to and from device memory: every input read once, every
  output written once, in the dtypes given. A kernel that re-reads (a looped layer norm on
  very wide rows) moves more; the ratio measured/minimum is what the roofline shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = [
    "Cost",
    "CostFn",
    "COST_MODELS",
    "ARGS_COST_MODELS",
    "itemsize",
    "register_cost",
    "op_cost",
]


@dataclass(frozen=True)
class Cost:
    """Work done by one op call.

    Attributes:
        flops: floating-point operations (see the module docstring for what counts as one).
        bytes: minimum bytes read from plus written to device memory.
    """

    flops: int
    bytes: int

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOP per byte; where it sits against the device's
        ``peak_flops / peak_bytes_per_s`` says whether the op is compute- or memory-bound."""
        return self.flops / self.bytes if self.bytes else float("inf")

    def roofline_s(self, peak_flops: float, peak_bytes_per_s: float) -> float:
        """Lower bound on run time in seconds on a device with the given ceilings
        (FLOP/s and bytes/s): the op can go no faster than its slower resource allows."""
        return max(self.flops / peak_flops, self.bytes / peak_bytes_per_s)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


CostFn = Callable[..., Cost]

#: op name (as in ``torch.ops.kiln.<name>``) -> cost formula over shapes and dtypes.
#: Each formula's own docstring lists its arguments.
COST_MODELS: dict[str, CostFn] = {}

#: op name -> cost computed from the very arguments the op is called with (real, fake or
#: meta tensors), so a profiler walking an FX graph can cost a node without knowing the op.
ARGS_COST_MODELS: dict[str, CostFn] = {}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def register_cost(name: str, shapes: CostFn, from_args: CostFn) -> None:
    """Register the cost formulas of op ``name``.

    Args:
        name: the op name without namespace, e.g. ``"layer_norm"``.
        shapes: formula over shapes and dtypes (goes to :data:`COST_MODELS`).
        from_args: formula over the op's own call arguments (goes to :data:`ARGS_COST_MODELS`).

    Raises:
        ValueError: if ``name`` is already registered (two ops would claim one profile row).
    """
    if name in COST_MODELS:
        raise ValueError(f"cost model for {name!r} registered twice")
    COST_MODELS[name] = shapes
    ARGS_COST_MODELS[name] = from_args


def op_cost(name: str, *args: Any, **kwargs: Any) -> Cost:
    """Cost of calling ``torch.ops.kiln.<name>(*args, **kwargs)``.

    Raises:
        KeyError: if no op of that name registered a cost model.
    """
    try:
        fn = ARGS_COST_MODELS[name]
    except KeyError:
        raise KeyError(f"no cost model for op {name!r}; known: {sorted(ARGS_COST_MODELS)}") from None
    return fn(*args, **kwargs)
