"""`load(directory)`: an engine directory back into a runnable `Engine`, by its manifest's backend."""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path

import torch

from optimize.runtime.backends import BUILTIN, loader
from optimize.runtime.engine import Engine
from optimize.runtime.errors import EngineError
from optimize.runtime.manifest import Manifest, check_links, engine_file


def load(directory: str | Path, *, threads: int | None = None) -> Engine:
    """Load the engine stored in `directory` (a directory holding `manifest.json`).

    `threads`: the CPU threads the engine computes with, for a process that shares the machine
    with other engines (a Ray actor holding its share of the cores): the `threads` option of the
    backends that have one (ONNX Runtime, OpenVINO, CTranslate2), else torch's intra-op threads
    (eager, inductor, triton: a setting of the whole process). None: the engine's own choice,
    which for most backends is every core.

    Raises `EngineError` when the directory is not an engine, was written by an incompatible
    kiln, names an unknown backend, misses payload files, or names a file (or holds a
    symlink) outside itself.
    """
    path = Path(directory)
    if path.is_dir():
        check_links(path)
    manifest = Manifest.read(path)
    for what, rel in manifest.files():
        if not engine_file(path, rel, what).exists():
            raise EngineError(f"engine {path} is incomplete: {what} {rel} is missing")
    if threads is not None:
        manifest = _with_threads(manifest, threads)
    return loader(manifest.backend)(path, manifest)


def _with_threads(manifest: Manifest, threads: int) -> Manifest:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise EngineError(f"threads must be a whole number of at least 1, got {threads!r}")
    module = BUILTIN.get(manifest.backend)
    options = getattr(importlib.import_module(module), "OPTIONS", {}) if module else {}
    if "threads" not in options:
        torch.set_num_threads(threads)
        return manifest
    config = replace(manifest.config, backend_options={**manifest.config.backend_options, "threads": threads})
    return replace(manifest, config=config)


__all__ = ["load"]
