"""Engines of backend `onnxruntime`: `model.onnx` run by an ONNX Runtime session whose execution
providers are chosen here, at load time, from what this machine's ONNX Runtime build has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import onnxruntime as ort

from optimize.runtime.engine import Engine
from optimize.runtime.errors import EngineError
from optimize.runtime.manifest import Manifest
from optimize.runtime.specs import numpy_dtype

MODEL_FILE = "model.onnx"
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# The backend's options (`CompileConfig.backend_options`) and their defaults; engines read
# theirs from the manifest over these.
OPTIONS: dict[str, Any] = {
    "providers": "auto",
    "ort_fusions": True,
    "threads": 0,
    # ORT's worker threads busy-wait between ops by default. On a small machine that also
    # runs a server's event loop they starve it: measured on the 2-core CI machine, turning
    # spinning off doubled served MiniLM throughput at concurrency 3 (~100 -> ~220 infer/s).
    "spinning": False,
    "int8_activations": "uint8",
    "int8_reduce_range": False,
    "int8_keep_sensitive": True,
}


def session_providers(preference: str | list[str] = "auto") -> list[str]:
    """Execution providers in order of preference, restricted to those this ORT build has;
    CPU is always last. Raises `EngineError` when a named provider is not available."""
    available = set(ort.get_available_providers())
    if preference == "auto":
        return [p for p in PROVIDER_PREFERENCE if p in available] or ["CPUExecutionProvider"]
    wanted = [preference] if isinstance(preference, str) else list(preference)
    missing = [p for p in wanted if p not in available]
    if missing:
        raise EngineError(f"ONNX Runtime here has no {', '.join(missing)}; available: {', '.join(sorted(available))}")
    return wanted + (["CPUExecutionProvider"] if "CPUExecutionProvider" not in wanted else [])


class OnnxRuntimeEngine(Engine):
    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)

        options = {**OPTIONS, **manifest.config.backend_options}
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if int(options.get("threads", 0)) > 0:
            session_options.intra_op_num_threads = int(options["threads"])
        spin = "1" if options.get("spinning") else "0"
        session_options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        session_options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        providers = session_providers(options.get("providers", "auto"))
        try:
            self._session = ort.InferenceSession(str(path / MODEL_FILE), session_options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types
            raise EngineError(f"ONNX Runtime cannot open {path / MODEL_FILE}: {exc}") from exc
        self._output_names = [s.name for s in manifest.outputs]
        self._input_dtypes = {s.name: numpy_dtype(s.dtype) for s in manifest.inputs}

    @property
    def providers(self) -> list[str]:
        return self._session.get_providers()

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=self._input_dtypes[k]) for k, v in inputs.items()}
        results = self._session.run(self._output_names, feeds)
        return {k: torch.from_numpy(v) for k, v in zip(self._output_names, results)}


def load(directory: Path, manifest: Manifest) -> Engine:
    return OnnxRuntimeEngine(directory, manifest)


__all__ = ["OnnxRuntimeEngine", "OPTIONS", "MODEL_FILE", "session_providers", "load"]
