"""Engines of backend `eager`: the captured program (`program.pt2` + `weights.safetensors`) run
by PyTorch as it was captured."""

from __future__ import annotations

from pathlib import Path

import torch

from optimize.runtime.engine import Engine
from optimize.runtime.manifest import Manifest
from optimize.runtime.program import load_program


class EagerEngine(Engine):
    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)
        self._module = load_program(path).module()

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._module(**inputs)


def load(directory: Path, manifest: Manifest) -> Engine:
    return EagerEngine(directory, manifest)


__all__ = ["EagerEngine", "load"]
