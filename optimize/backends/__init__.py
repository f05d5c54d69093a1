"""Backend registry, build half: a backend turns a captured program into an engine directory.

Backends register themselves by name; `optimize.compile` and `auto` look them up here. Opening
the directory again is the backend's runtime half, `optimize.runtime.backends.<name>`, which
`optimize.load` finds without importing this package. Adding a backend is one module here and
one in `optimize.runtime.backends`, each with a line in its `_BUILTIN` / `BUILTIN`.
"""

from __future__ import annotations

import importlib

from optimize.backends.base import Backend, BuildContext
from optimize.runtime.backends import BUILTIN as RUNTIME_BUILTIN
from optimize.runtime.backends import register_loader
from optimize.runtime.errors import ConfigError, OptimizeError

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
    """Class decorator: make `cls` available under `cls.name`, and its engines loadable by
    `optimize.load` when the runtime has no half of its own for that name (a backend defined
    outside kiln)."""
    _REGISTRY[cls.name] = cls
    if cls.name not in RUNTIME_BUILTIN:
        register_loader(cls.name, lambda directory, manifest: cls().load(directory, manifest))
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
