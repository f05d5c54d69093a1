"""`Engine`: the only thing backends produce and the only thing the server sees.

An engine is a directory (manifest + weights + backend payload); `load(dir)` turns it back into
an object whose `run` takes a dict of named tensors and returns a dict of named tensors.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from optimize.errors import EngineError
from optimize.manifest import MANIFEST_FILE, Manifest
from optimize.specs import TensorSpec, dtype_name

if TYPE_CHECKING:
    from optimize.pipeline import Pipeline

Array = torch.Tensor | np.ndarray


class Engine(ABC):
    """A compiled model. Subclasses implement `_run` on torch tensors; this class validates
    inputs against the manifest's TensorSpecs and converts numpy in → numpy out."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._pipeline: Pipeline | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def backend(self) -> str:
        return self.manifest.backend

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.manifest.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.manifest.outputs

    @property
    def max_batch_size(self) -> int:
        """Largest batch the engine accepts; 0 when its inputs have no dynamic batch dim."""
        return self.manifest.config.max_batch if all(s.batched for s in self.inputs) else 0

    @property
    def pipeline(self) -> Pipeline | None:
        """The text pre/post-processing stored with the engine, if its source had a tokenizer."""
        if self._pipeline is None and self.manifest.pipeline is not None:
            from optimize.pipeline import Pipeline

            self._pipeline = Pipeline.from_manifest(self.path, self.manifest.pipeline)
        return self._pipeline

    def check_inputs(self, inputs: Mapping[str, Array]) -> str | None:
        """None when `inputs` match the specs (names, dtypes, shapes, value ranges, one batch
        size), else a one-line reason naming the offending input."""
        expected = {s.name for s in self.inputs}
        missing = sorted(expected - set(inputs))
        if missing:
            return f"missing input(s) {', '.join(missing)}; expected {', '.join(sorted(expected))}"
        unknown = sorted(set(inputs) - expected)
        if unknown:
            return f"unknown input(s) {', '.join(unknown)}; expected {', '.join(sorted(expected))}"
        batch: int | None = None
        for spec in self.inputs:
            value = inputs[spec.name]
            got = dtype_name(value.dtype)
            if got != spec.dtype:
                return f"input '{spec.name}' has dtype {got}, expected {spec.dtype}"
            shape = tuple(value.shape)
            reason = spec.check_shape(shape) or spec.check_values(value)
            if reason:
                return reason
            if spec.batched:
                if batch is not None and shape[0] != batch:
                    return f"input '{spec.name}' has batch size {shape[0]}, other inputs have {batch}"
                batch = shape[0]
        return None

    def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """Run the engine. Inputs are torch tensors or numpy arrays (not mixed); outputs come
        back as the same kind. Raises `EngineError` when the inputs do not match the specs."""
        reason = self.check_inputs(inputs)
        if reason:
            raise EngineError(reason)
        as_numpy = any(isinstance(v, np.ndarray) for v in inputs.values())
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = self._run(tensors)
        if as_numpy:
            return {k: v.detach().cpu().numpy() for k, v in outputs.items()}
        return outputs

    @abstractmethod
    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Backend-specific execution on validated torch tensors."""

    def save(self, directory: str | Path) -> Path:
        """Copy this engine's directory (manifest, weights, payload, pipeline) to `directory`."""
        target = Path(directory)
        if target.resolve() != self.path.resolve():
            shutil.copytree(self.path, target, dirs_exist_ok=True)
        return target

    def describe(self) -> dict[str, Any]:
        """A short summary for tables and logs."""
        return {
            "name": self.name,
            "backend": self.backend,
            "precision": self.manifest.config.precision,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }


def load(directory: str | Path) -> Engine:
    """Load the engine stored in `directory` (a directory holding `manifest.json`).

    Raises `EngineError` when the directory is not an engine, was written by an incompatible
    kiln, names an unknown backend, or misses payload files.
    """
    from optimize.backends import get_backend

    path = Path(directory)
    manifest = Manifest.read(path)
    for rel in manifest.payload:
        if not (path / rel).exists():
            raise EngineError(f"engine {path} is incomplete: payload file {rel} is missing")
    backend = get_backend(manifest.backend, error=EngineError)
    return backend.load(path, manifest)


__all__ = ["Engine", "load", "MANIFEST_FILE"]
