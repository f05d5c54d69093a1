"""`Engine`: the only thing backends produce and the only thing the server sees.

An engine is a directory (manifest + weights + backend payload); `optimize.runtime.load(dir)`
turns it back into an object whose `run` takes a dict of named tensors and returns a dict of
named tensors. Each backend's subclass lives in `optimize.runtime.backends`.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optimize.runtime.errors import EngineError
from optimize.runtime.manifest import MANIFEST_FILE, Manifest
from optimize.runtime.pipeline import Pipeline
from optimize.runtime.specs import TensorSpec, dtype_name

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
    def packed_mask_input(self) -> str | None:
        """The [batch, seq] input whose zeros mark padding that this engine does not compute
        (it packs the real tokens inside, from the first layer to the last), or None when
        padding costs as much as real tokens. Written by the backend into the manifest
        (`build["packed_batches"]["mask_input"]`)."""
        packed = self.manifest.build.get("packed_batches")
        return packed.get("mask_input") if isinstance(packed, dict) else None

    @property
    def accepts_packed(self) -> bool:
        """True when the engine computes only real tokens, so one batch may mix sequence
        lengths at no cost for padding: either send it packed (`run_packed`: rows back to
        back, delimited by `cu_seqlens`), or padded to the longest row through `run` with
        padding marked 0 in `packed_mask_input`. Token outputs are zero at padding positions.
        A batcher can then drop sequence-length buckets."""
        return self.packed_mask_input is not None

    @property
    def has_packed_entry(self) -> bool:
        """True when the engine runs a packed batch as it comes (`run_packed` hands tokens and
        `cu_seqlens` to the kernels, token outputs come back packed); False when `run_packed`
        lays the rows out padded once and runs `run`."""
        return False

    def run_packed(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """Run a packed variable-length batch (the server's `Packed` layout).

        Inputs of token layout ([batch, seq, ...] specs) arrive as their rows concatenated,
        [total_tokens, ...]; `cu_seqlens` (int [rows + 1], starting at 0) delimits the rows;
        other inputs are per row, [rows, ...]. Outputs of token layout come back as
        [total_tokens, ...], others as [rows, ...]; numpy in, numpy out as with `run`.

        An engine with a packed entry (`has_packed_entry`) runs the batch as it is, when every
        row has a token and no token is masked out (`packed_mask_input` all nonzero). Otherwise
        (the reference path: engines without one, or rows that carry their own padding) the
        rows are laid out padded to the longest one, once (an index copy), and run through
        `run`, which on an engine that `accepts_packed` computes the real tokens only. Raises
        `EngineError` on a missing or inconsistent `cu_seqlens` and on inputs the specs refuse.
        """
        if "cu_seqlens" not in inputs:
            raise EngineError("run_packed needs a 'cu_seqlens' input (int [rows + 1], starting at 0)")
        as_numpy = any(isinstance(v, np.ndarray) for v in inputs.values())
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                   for k, v in inputs.items()}
        cu = tensors.pop("cu_seqlens").detach().cpu().long().reshape(-1)
        lengths = cu[1:] - cu[:-1]
        if cu.numel() < 2 or int(cu[0]) != 0 or bool((lengths < 0).any()):
            raise EngineError(f"cu_seqlens must start at 0 and never decrease; got {cu.tolist()}")
        rows, total = int(lengths.numel()), int(cu[-1])
        longest = int(lengths.max())
        for spec in self.inputs:
            value = tensors.get(spec.name)
            if value is not None and spec.token_layout and value.shape[0] != total:
                raise EngineError(f"packed input '{spec.name}' has {value.shape[0]} tokens; cu_seqlens says {total}")
        if self.has_packed_entry and self._packs_as_is(tensors, lengths):
            reason = self._check_packed(tensors, rows, longest)
            if reason:
                raise EngineError(reason)
            with torch.inference_mode():
                outputs = self._run_packed(tensors, cu.to(torch.int32), longest)
        else:
            outputs = self._run_padded(tensors, cu, lengths)
        if as_numpy:
            return {k: v.detach().cpu().numpy() for k, v in outputs.items()}
        return outputs

    def _packs_as_is(self, tensors: Mapping[str, torch.Tensor], lengths: torch.Tensor) -> bool:
        """True when a packed batch holds real tokens only: no empty row, no masked token."""
        mask = tensors.get(self.packed_mask_input or "")
        return bool((lengths > 0).all()) and (mask is None or bool((mask != 0).all()))

    def _check_packed(self, tensors: Mapping[str, torch.Tensor], rows: int, longest: int) -> str | None:
        """`check_inputs` for a packed batch: each input judged as the padded [rows, longest, ...]
        batch it stands for."""
        expected = {s.name for s in self.inputs}
        missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unknown:
            what = f"missing input(s) {', '.join(missing)}" if missing else f"unknown input(s) {', '.join(unknown)}"
            return f"{what}; expected {', '.join(sorted(expected))} and cu_seqlens"
        for spec in self.inputs:
            value = tensors[spec.name]
            got = dtype_name(value.dtype)
            if got != spec.dtype:
                return f"input '{spec.name}' has dtype {got}, expected {spec.dtype}"
            token = spec.token_layout
            if not token and value.shape[:1] != (rows,):
                return f"packed input '{spec.name}' has {value.shape[0] if value.dim() else 0} rows; cu_seqlens says {rows}"
            shape = (rows, longest, *value.shape[1:]) if token else tuple(value.shape)
            reason = spec.check_shape(shape) or spec.check_values(value)
            if reason:
                return reason
        return None

    def _run_packed(self, inputs: dict[str, torch.Tensor], cu_seqlens: torch.Tensor,
                    max_seqlen: int) -> dict[str, torch.Tensor]:
        """Backend-specific execution of a checked packed batch (engines with a packed entry):
        `cu_seqlens` int32 [rows + 1] on the CPU, `max_seqlen` its longest row."""
        raise NotImplementedError(f"{type(self).__name__} has no packed entry")

    def _run_padded(self, tensors: dict[str, torch.Tensor], cu: torch.Tensor,
                    lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reference path of `run_packed`: rows padded to the longest once, `run`, and the
        token outputs' real rows taken back out."""
        rows, total, longest = int(lengths.numel()), int(cu[-1]), int(lengths.max())
        row = torch.repeat_interleave(torch.arange(rows), lengths)
        slot = row * longest + (torch.arange(total) - cu[row])  # each token's place in [rows, longest]
        padded: dict[str, torch.Tensor] = {}
        for spec in self.inputs:
            value = tensors.get(spec.name)
            if value is None or not spec.token_layout:
                if value is not None:
                    padded[spec.name] = value
                continue
            out = value.new_zeros((rows * longest, *value.shape[1:]))
            out[slot.to(value.device)] = value
            padded[spec.name] = out.reshape(rows, longest, *value.shape[1:])
        padded.update({k: v for k, v in tensors.items() if k not in padded})  # unknown names: `run` says so
        outputs = self.run(padded)
        result: dict[str, torch.Tensor] = {}
        for spec in self.outputs:
            value = outputs[spec.name]
            if spec.token_layout:
                value = value.reshape(rows * longest, *value.shape[2:])[slot.to(value.device)]
            result[spec.name] = value
        return result

    @property
    def pipeline(self) -> Pipeline | None:
        """The text pre/post-processing stored with the engine, if its source had a tokenizer."""
        if self._pipeline is None and self.manifest.pipeline is not None:
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

    def warm(self, inputs: Mapping[str, Array]) -> None:
        """Get ready for calls shaped like `inputs` before the first real one (a server's
        warm-up, like Triton's `model_warmup`), so that no request pays for what a backend does
        on a shape's first call: planning, picking kernels, allocating. The values do not
        matter. By default one call; a backend that prepares more per shape (OpenVINO's static
        copies) overrides it. Raises `EngineError` as `run` does."""
        self.run(inputs)

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


class AheadOfTimeEngine(Engine):
    """An engine built for another machine (e.g. a TensorRT plan built without a GPU): its
    manifest and specs are readable here; running it raises `EngineError` with the reason."""

    def __init__(self, path: Path, manifest: Manifest, reason: str) -> None:
        super().__init__(path, manifest)
        self.reason = reason

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise EngineError(f"engine {self.path} cannot run on this machine: {self.reason}")


__all__ = ["Engine", "AheadOfTimeEngine", "MANIFEST_FILE"]
