"""kiln's compiler: model source → captured program → backend → verified engine directory.

Entry points: `optimize.compile`, `optimize.load`, `optimize.profile`, and `python -m optimize`.
The engine runtime (`optimize.runtime`: `load`, `Engine`, specs, errors) is imported here; the
build side (`compile`, `profile`) on first use, so `import optimize` for serving costs only what
running an engine needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from optimize.runtime import CompileConfig, Dim, Engine, OptimizeError, TensorSpec, Tolerance, load

if TYPE_CHECKING:  # what __getattr__ returns, for readers and type checkers
    from optimize import profile
    from optimize.compiler import compile

__all__ = ["compile", "load", "profile", "Engine", "CompileConfig", "Tolerance", "TensorSpec", "Dim", "OptimizeError"]


def __getattr__(name: str) -> Any:
    """`optimize.compile` and `optimize.profile` (a callable package), imported when first used."""
    if name == "compile":
        value = importlib.import_module("optimize.compiler").compile
    elif name == "profile":
        value = importlib.import_module("optimize.profile")
    else:
        raise AttributeError(f"module 'optimize' has no attribute {name!r}")
    globals()[name] = value
    return value
