"""The interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch.export import ExportedProgram

from optimize.config import CompileConfig
from optimize.engine import Engine
from optimize.manifest import Manifest
from optimize.passes import GENERIC_PASSES
from optimize.specs import TensorSpec


@dataclass
class BuildContext:
    """What a backend needs besides the program: the config and the tensor contract."""

    config: CompileConfig
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class Backend(ABC):
    """Builds an engine payload from a captured program and loads engines of its kind."""

    name: ClassVar[str]
    precisions: ClassVar[frozenset[str]]
    # Graph passes this backend can execute the result of (see optimize.passes).
    passes: ClassVar[frozenset[str]] = GENERIC_PASSES

    @abstractmethod
    def build(self, program: ExportedProgram, ctx: BuildContext, directory: Path) -> list[str]:
        """Write the payload into `directory`; return the payload's relative file names."""

    @abstractmethod
    def load(self, directory: Path, manifest: Manifest) -> Engine:
        """Open the engine stored in `directory`."""
