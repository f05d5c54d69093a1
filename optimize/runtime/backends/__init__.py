"""How to open an engine of each backend: the runtime half of every backend.

A backend has two halves. Its build half (`optimize.backends.<name>`, a `Backend` subclass)
writes the payload into an engine directory; its runtime half, a module here, opens that
directory again: an `Engine` subclass and `load(directory, manifest) -> Engine`. Serving needs
only this half, so nothing here imports the build side. Adding a backend is one module in each
package and one line in `BUILTIN` (here) and in `optimize.backends`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from optimize.runtime.engine import Engine
from optimize.runtime.errors import EngineError
from optimize.runtime.manifest import Manifest

Loader = Callable[[Path, Manifest], Engine]

# name -> module defining `load`; imported when an engine of that backend is opened, so a
# missing optional runtime (TensorRT, OpenVINO, ...) only matters for its own engines.
BUILTIN: dict[str, str] = {
    "eager": "optimize.runtime.backends.eager",
    "onnxruntime": "optimize.runtime.backends.onnxruntime",
    "tensorrt": "optimize.runtime.backends.tensorrt",
    "triton": "optimize.runtime.backends.triton",
    "openvino": "optimize.runtime.backends.openvino",
    "ctranslate2": "optimize.runtime.backends.ctranslate2",
    "inductor": "optimize.runtime.backends.inductor",
}
_REGISTERED: dict[str, Loader] = {}


def register_loader(name: str, load: Loader) -> None:
    """Open engines whose manifest names backend `name` with `load` (a backend defined outside
    kiln; `optimize.backends.register_backend` calls this for its build half)."""
    _REGISTERED[name] = load


def known_backends() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTERED))


def loader(name: str) -> Loader:
    """The function that opens engines of backend `name`; raises `EngineError` naming the
    backends this kiln knows."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in BUILTIN:
        load: Loader = importlib.import_module(BUILTIN[name]).load
        return load
    raise EngineError(f"unknown backend {name!r}; available: {', '.join(known_backends())}")


__all__ = ["BUILTIN", "Loader", "known_backends", "loader", "register_loader"]
