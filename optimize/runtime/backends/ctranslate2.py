"""Engines of backend `ctranslate2`: a CTranslate2 encoder directory run on the CPU, with the
sentence-transformers pooling applied in torch after it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optimize.runtime.engine import Array, Engine
from optimize.runtime.errors import EngineError
from optimize.runtime.manifest import Manifest
from optimize.runtime.pooling import pool
from optimize.runtime.precision import facts

MODEL_DIR = "ctranslate2"
# The backend's options (`CompileConfig.backend_options`) and their defaults; engines read
# theirs from the manifest over these.
OPTIONS: dict[str, Any] = {"threads": 0}


class CTranslate2Engine(Engine):
    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)
        try:
            # why: optional (kiln[cpu-engines])
            import ctranslate2
        except ImportError:
            raise EngineError(f"engine {path} needs CTranslate2: pip install 'kiln[cpu-engines]'") from None
        options = {**OPTIONS, **manifest.config.backend_options}
        try:
            self._encoder = ctranslate2.Encoder(str(path / MODEL_DIR), device="cpu",
                                                compute_type=compute_type(manifest.config.precision),
                                                intra_threads=int(options["threads"]))
        except Exception as exc:  # CTranslate2 raises RuntimeError/ValueError with long messages
            raise EngineError(f"CTranslate2 cannot open {path / MODEL_DIR}: {str(exc).splitlines()[0]}") from exc
        self._pooling = manifest.source.get("pooling")
        self._normalize = bool(manifest.source.get("normalize"))
        self._outputs = [s.name for s in manifest.outputs]

    def check_inputs(self, inputs: Mapping[str, Array]) -> str | None:
        """The specs' checks, and right padding: CTranslate2 takes lengths, not a mask, so tokens
        after a row's first padding position (left padding, holes) would be read as padding, a
        silently different answer. The server checks each request with this before batching."""
        reason = super().check_inputs(inputs)
        if reason or "attention_mask" not in inputs:
            return reason
        tokens = np.asarray(inputs["attention_mask"]) != 0
        if tokens.ndim != 2:
            return None
        right_padded = np.arange(tokens.shape[1])[None, :] < tokens.sum(axis=1, keepdims=True)
        misplaced = np.flatnonzero((tokens != right_padded).any(axis=1))
        if misplaced.size:
            return (f"input 'attention_mask' row {int(misplaced[0])} has a token after padding (left padding or a "
                    "hole); CTranslate2 engines take right-padded batches")
        return None

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # why: optional (kiln[cpu-engines])
        import ctranslate2

        ids = inputs["input_ids"].detach().cpu()
        mask = inputs["attention_mask"].detach().cpu()
        lengths = mask.sum(dim=1).to(torch.int32).clamp(min=1)  # right padding: `check_inputs`
        out = self._encoder.forward_batch(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(ids.numpy().astype(np.int32))),
            ctranslate2.StorageView.from_array(lengths.numpy()),
        )
        hidden = torch.from_numpy(np.array(out.last_hidden_state, dtype=np.float32, copy=True))
        if hidden.shape[1] < ids.shape[1]:  # the encoder returns the longest length, not the padded one
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, ids.shape[1] - hidden.shape[1]))
        results = {"last_hidden_state": hidden}
        if "sentence_embedding" in self._outputs:
            results["sentence_embedding"] = pool(hidden, mask, self._pooling or "cls", self._normalize)
        return {name: results[name] for name in self._outputs}


def compute_type(precision: str) -> str:
    """CTranslate2's compute type for a precision: int8 weights (activations quantized on the
    fly, CTranslate2's int8_float32) for int8, else float32."""
    return "int8_float32" if facts(precision).weights == torch.int8 else "float32"


def load(directory: Path, manifest: Manifest) -> Engine:
    return CTranslate2Engine(directory, manifest)


__all__ = ["CTranslate2Engine", "OPTIONS", "MODEL_DIR", "compute_type", "load"]
