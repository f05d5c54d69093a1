"""Engines of backend `tensorrt`: `engine.plan` deserialized by the TensorRT (or TensorRT-RTX)
version that built it, run on torch CUDA tensors; TensorRT-RTX's just-in-time kernels are cached
in `runtime.cache` beside the plan."""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from optimize.runtime.engine import Engine
from optimize.runtime.errors import EngineError
from optimize.runtime.manifest import Manifest
from optimize.runtime.specs import torch_dtype

PLAN_FILE = "engine.plan"
RUNTIME_CACHE_FILE = "runtime.cache"
LIBRARIES = ("tensorrt", "tensorrt_rtx")


def library() -> tuple[ModuleType, str] | None:
    """The TensorRT module to use and its name: `tensorrt` when importable, else `tensorrt_rtx`."""
    for name in LIBRARIES:
        try:
            return importlib.import_module(name), name
        except ImportError:
            continue
    return None


def collecting_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that keeps warnings and errors, so failures can quote them."""

    class Collecting(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append(msg)

        def errors(self) -> str:
            return "; ".join(m.splitlines()[0] for m in self.messages[-3:]) or "no message from TensorRT"

    return Collecting()


def cuda_device() -> tuple[str, int] | None:
    """(name, SM number) of the current CUDA GPU, or None."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), major * 10 + minor


class TensorRTEngine(Engine):
    """Runs `engine.plan` on torch CUDA tensors. Outputs come back on the inputs' device."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)
        built = manifest.build.get("tensorrt", {})
        found = library()
        if found is None:
            raise EngineError(f"engine {path} was built with {built.get('library')} {built.get('version')}, "
                              "which is not installed here: pip install 'kiln[tensorrt]'")
        trt, flavour = found
        if (flavour, trt.__version__) != (built.get("library"), built.get("version")):
            raise EngineError(
                f"engine {path} was built with {built.get('library')} {built.get('version')}; this machine has "
                f"{flavour} {trt.__version__}: rebuild it here (TensorRT plans are tied to the version that built them)"
            )
        device = cuda_device()
        if device is None:
            raise EngineError(f"engine {path} needs a CUDA GPU ({flavour}); torch sees none on this machine")
        name, sm = device
        targets = built.get("compute_capabilities") or []
        if targets and f"SM{sm}" not in targets:
            raise EngineError(f"engine {path} was built for {', '.join(targets)}; this GPU ({name}) is SM{sm}: "
                              "rebuild with compute_capabilities including it")
        build_device = built.get("build_device")
        if not targets and build_device and build_device.get("sm") != sm:
            raise EngineError(f"engine {path} was built on {build_device.get('name')} (SM{build_device.get('sm')}); "
                              f"this GPU is {name} (SM{sm}): rebuild it here")
        self._trt = trt
        self._logger = collecting_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        # A plan can carry host code (a lean runtime, plugin libraries) that deserializing would
        # load; kiln builds plans without any, so none is let in whatever TensorRT's default.
        if hasattr(self._runtime, "engine_host_code_allowed"):
            self._runtime.engine_host_code_allowed = False
        plan = (path / PLAN_FILE).read_bytes()
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise EngineError(f"{flavour} cannot load {path / PLAN_FILE}: {self._logger.errors()}")
        self._runtime_cache = None
        if hasattr(self._engine, "create_runtime_config"):  # TensorRT-RTX: JIT kernels cached across runs
            runtime_config = self._engine.create_runtime_config()
            self._runtime_cache = runtime_config.create_runtime_cache()
            cache_file = path / RUNTIME_CACHE_FILE
            if cache_file.is_file():
                self._runtime_cache.deserialize(cache_file.read_bytes())
            runtime_config.set_runtime_cache(self._runtime_cache)
            self._context = self._engine.create_execution_context(runtime_config)
        else:
            self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"{flavour} cannot create an execution context for {path / PLAN_FILE}: {self._logger.errors()}")
        self._inputs = [s.name for s in manifest.inputs]
        self._outputs = {s.name: torch_dtype(s.dtype) for s in manifest.outputs}
        self._shapes_seen: set[tuple[tuple[int, ...], ...]] = set()
        self._lock = threading.Lock()

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first = next(iter(inputs.values()))
        home = first.device
        stream = torch.cuda.current_stream()
        # One execution context holds the shapes and addresses of the call being enqueued; the
        # server runs an engine from several threads (`instances`), so enqueueing is serialized.
        with self._lock:
            keep = []
            for name in self._inputs:
                tensor = inputs[name].to("cuda", non_blocking=True).contiguous()
                keep.append(tensor)
                self._context.set_input_shape(name, tuple(tensor.shape))
                self._context.set_tensor_address(name, tensor.data_ptr())
            outputs = {}
            for name, dtype in self._outputs.items():
                shape = tuple(self._context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
                self._context.set_tensor_address(name, outputs[name].data_ptr())
            if not self._context.execute_async_v3(stream.cuda_stream):
                raise EngineError(f"TensorRT failed to run {self.path / PLAN_FILE}: {self._logger.errors()}")
            signature = tuple(tuple(t.shape) for t in keep)
            if signature not in self._shapes_seen:  # TensorRT-RTX compiles kernels for new shapes
                self._shapes_seen.add(signature)
                self.save_runtime_cache()
        if home.type != "cuda":
            return {k: v.to(home) for k, v in outputs.items()}
        return outputs

    def save_runtime_cache(self) -> bool:
        """Write the JIT kernel cache into the engine directory when it is writable."""
        if self._runtime_cache is None or not os.access(self.path, os.W_OK):
            return False
        torch.cuda.current_stream().synchronize()
        (self.path / RUNTIME_CACHE_FILE).write_bytes(bytes(self._runtime_cache.serialize()))
        return True


def load(directory: Path, manifest: Manifest) -> Engine:
    return TensorRTEngine(directory, manifest)


__all__ = ["TensorRTEngine", "PLAN_FILE", "library", "cuda_device", "collecting_logger", "load"]
