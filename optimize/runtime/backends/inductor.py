"""Engines of backend `inductor`: an AOTInductor package (`model.pt2`, a shared library and its
weights) opened with `torch._inductor.aoti_load_package`, which traces and compiles nothing.
The package is native code: like every engine, load only engines you built or trust."""

from __future__ import annotations

from pathlib import Path

import torch

from optimize.runtime.engine import Engine
from optimize.runtime.errors import EngineError
from optimize.runtime.manifest import Manifest, engine_file

PACKAGE_FILE = "model.pt2"


class InductorEngine(Engine):
    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)
        package = engine_file(path, PACKAGE_FILE, "payload")
        try:
            self._model = torch._inductor.aoti_load_package(str(package))
        except Exception as exc:  # a package from another torch or CPU raises RuntimeError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineError(f"cannot open the AOTInductor package {package}: {first} "
                              "(recompile the engine with this torch)") from exc
        self._outputs = [s.name for s in manifest.outputs]

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = self._model(**{k: v.contiguous() for k, v in inputs.items()})
        if isinstance(out, dict):
            return {name: out[name] for name in self._outputs}
        return dict(zip(self._outputs, out))


def load(directory: Path, manifest: Manifest) -> Engine:
    return InductorEngine(directory, manifest)


__all__ = ["InductorEngine", "PACKAGE_FILE", "load"]
