"""`load(directory)`: an engine directory back into a runnable `Engine`, by its manifest's backend."""

from __future__ import annotations

from pathlib import Path

from optimize.runtime.backends import loader
from optimize.runtime.engine import Engine
from optimize.runtime.errors import EngineError
from optimize.runtime.manifest import Manifest, check_links, engine_file


def load(directory: str | Path) -> Engine:
    """Load the engine stored in `directory` (a directory holding `manifest.json`).

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
    return loader(manifest.backend)(path, manifest)


__all__ = ["load"]
