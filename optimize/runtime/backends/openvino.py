"""Engines of backend `openvino`: `model.xml` + `model.bin` compiled by OpenVINO for a device,
with the inference precision pinned to the one the manifest names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from optimize.runtime.engine import Engine
from optimize.runtime.errors import EngineError
from optimize.runtime.manifest import Manifest
from optimize.runtime.precision import facts
from optimize.runtime.specs import numpy_dtype

MODEL_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
# The backend's options (`CompileConfig.backend_options`) and their defaults; engines read
# theirs from the manifest over these.
OPTIONS: dict[str, Any] = {"hint": "latency", "threads": 0, "device": "CPU"}


# Ops whose graphs OpenVINO 2026.4's CPU shape cache gets wrong: a model with
# nn.MultiheadAttention (tests.optimize.factories:tiny_tokens, whose graph holds one
# ScaledDotProductAttention) called first at [1, 1] and then at [4, 16] is off by 2 to 3 at the
# second shape, on the same or a fresh infer request, with or without bounded dims, at every cache
# capacity but 0 (which turns the cache off). BERT-like graphs (MatMul, Softmax, MatMul) keep it:
# all-MiniLM-L6-v2 gives bit-identical results with it on and off over such shape sequences,
# and with it off pays about 1.5x the CPU time per 1 x 32 call when shapes alternate.
SHAPE_CACHE_UNSAFE_OPS = frozenset({"ScaledDotProductAttention"})


def shape_cache_is_exact(model: Any) -> bool:
    """Whether OpenVINO's CPU shape cache may stay on for `model` (an `openvino.Model`): its graph
    holds none of `SHAPE_CACHE_UNSAFE_OPS`. With the cache on, an engine that sees alternating
    shapes prepares each once instead of on every call."""
    return not any(op.get_type_name() in SHAPE_CACHE_UNSAFE_OPS for op in model.get_ordered_ops())


def engine_config(options: dict[str, Any], precision: str, float_compute: str = "f32", *,
                  shape_cache: bool = False) -> dict[str, Any]:
    """OpenVINO's compile properties for an engine of `precision`; `float_compute` is what an
    int8 engine computes in outside its int8 MatMuls (the manifest's quantization record says);
    `shape_cache`: keep the CPU shape cache (only where `shape_cache_is_exact` says so)."""
    # OpenVINO 2026.4 picks bf16 inference precision on its own on CPUs with AVX512_BF16:
    # all-MiniLM-L6-v2 then differs from fp32 by 0.03 (max abs). The precision is pinned, so an
    # engine computes in the precision its manifest says.
    f = facts(precision)
    bf16 = f.compute == torch.bfloat16 or (f.calibrated and float_compute == "bf16")
    config: dict[str, Any] = {"PERFORMANCE_HINT": HINTS[options["hint"]],
                              "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
    if int(options["threads"]) > 0:
        config["INFERENCE_NUM_THREADS"] = int(options["threads"])
    if options["device"] == "CPU" and not shape_cache:
        config["CPU_RUNTIME_CACHE_CAPACITY"] = 0  # see SHAPE_CACHE_UNSAFE_OPS
    return config


class OpenVINOEngine(Engine):
    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)
        try:
            # why: optional (kiln[cpu-engines])
            import openvino as ov
        except ImportError:
            raise EngineError(f"engine {path} needs OpenVINO: pip install 'kiln[cpu-engines]'") from None
        options = {**OPTIONS, **manifest.config.backend_options}
        float_compute = manifest.build.get("quantization", {}).get("float_compute", "f32")
        core = ov.Core()
        if options["device"] not in core.available_devices:
            raise EngineError(f"OpenVINO device {options['device']} is not available here; "
                              f"available: {', '.join(core.available_devices)}")
        try:
            model = core.read_model(str(path / MODEL_FILE))
            # whether shapes prepared once are reused (OpenVINO cannot be asked afterwards)
            self.shape_cache = options["device"] == "CPU" and shape_cache_is_exact(model)
            self._compiled = core.compile_model(model, options["device"],
                                                engine_config(options, manifest.config.precision, float_compute,
                                                              shape_cache=self.shape_cache))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long messages
            raise EngineError(f"OpenVINO cannot open {path / MODEL_FILE}: {str(exc).splitlines()[0]}") from exc
        self._request = self._compiled.create_infer_request()
        self._input_dtypes = {s.name: numpy_dtype(s.dtype) for s in manifest.inputs}
        self._outputs = [s.name for s in manifest.outputs]

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=self._input_dtypes[k]) for k, v in inputs.items()}
        # share_inputs: OpenVINO reads the arrays in place (the call is synchronous);
        # share_outputs=False: it hands back arrays of their own, which the request's next call
        # does not overwrite, so no second copy is needed here.
        results = self._request.infer(feeds, share_inputs=True, share_outputs=False)
        by_name = {port.get_any_name(): value for port, value in results.items()}
        return {name: torch.from_numpy(by_name[name]) for name in self._outputs}


def load(directory: Path, manifest: Manifest) -> Engine:
    return OpenVINOEngine(directory, manifest)


__all__ = ["OpenVINOEngine", "OPTIONS", "MODEL_FILE", "WEIGHTS_FILE", "SHAPE_CACHE_UNSAFE_OPS", "engine_config",
           "shape_cache_is_exact", "load"]
