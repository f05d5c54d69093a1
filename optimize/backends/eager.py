"""Backend `eager`: the captured `torch.export` program, run as is by PyTorch.

It is the baseline every other backend is measured against, and the most portable engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch.export import ExportedProgram

from optimize.backends import register_backend
from optimize.backends.base import Backend, BuildContext
from optimize.runtime.backends.eager import EagerEngine
from optimize.runtime.engine import Engine
from optimize.runtime.manifest import Manifest
from optimize.runtime.program import save_program


@register_backend
class EagerBackend(Backend):
    name: ClassVar[str] = "eager"
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16", "bf16"})

    def build(self, program: ExportedProgram, ctx: BuildContext, directory: Path) -> list[str]:
        return save_program(program, directory)

    def load(self, directory: Path, manifest: Manifest) -> Engine:
        return EagerEngine(directory, manifest)
