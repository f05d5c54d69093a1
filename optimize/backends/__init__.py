"""Backend registry: a backend turns a captured program into an engine directory and loads it back.

Backends register themselves by name; `optimize.compile` and `optimize.load` look them up here,
so adding a backend is one new module and one line in `_BUILTIN`.
"""

from __future__ import annotations

import importlib

from optimize.backends.base import Backend, BuildContext
from optimize.errors import ConfigError, OptimizeError

# name -> module that defines it; imported lazily so a missing optional runtime (TensorRT, ...)
# only matters when that backend is asked for.
_BUILTIN: dict[str, str] = {
    "eager": "optimize.backends.eager",
    "onnxruntime": "optimize.backends.onnxruntime",
    "tensorrt": "optimize.backends.tensorrt",
    "triton": "optimize.backends.triton",
    "openvino": "optimize.backends.openvino",
    "ctranslate2": "optimize.backends.ctranslate2",
    "inductor": "optimize.backends.inductor",
}
_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make `cls` available under `cls.name`."""
    _REGISTRY[cls.name] = cls
    return cls


def available_backends() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get_backend(name: str, error: type[OptimizeError] = ConfigError) -> Backend:
    """An instance of the backend called `name`; raises `error` naming the known backends."""
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise error(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    return _REGISTRY[name]()


__all__ = ["Backend", "BuildContext", "register_backend", "get_backend", "available_backends"]
