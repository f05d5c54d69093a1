"""Engines of backend `triton`: the rewritten program (`program.pt2` + weights) calling kiln's
kernels, run by PyTorch on the GPU (Triton and CUDA kernels, CUDA graphs for padded engines) or
on the CPU (the kernels' references).

An engine whose manifest names a packed entry (`build["packed_batches"]["program"]`, written by
`optimize.backends.triton`) loads it beside the padded program, on the same weight tensors, and
runs packed batches through it (`Engine.run_packed`): inputs packed as the server sends them,
`cu_seqlens` and the longest row, token outputs packed."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from torch.export.passes import move_to_device_pass

from optimize.runtime.engine import Engine
from optimize.runtime.errors import EngineError
from optimize.runtime.manifest import Manifest
from optimize.runtime.program import load_program, load_weights

# The backend's options (`CompileConfig.backend_options`) and their defaults; engines read
# theirs from the manifest over these.
OPTIONS: dict[str, Any] = {"device": "auto", "cuda_graphs": True, "max_cuda_graphs": 32}
PACKED_PROGRAM_FILE = "packed.pt2"  # the packed entry, beside program.pt2


def import_kernels() -> None:
    """Register kiln's custom ops; `torch.export.load` of a program that calls them fails
    without (the ops must exist before the graph is deserialized)."""
    # why: kiln_kernels imports Triton (~0.9 s, measured): only programs that call kiln ops need it
    import kiln_kernels  # noqa: F401
    import kiln_kernels.native  # noqa: F401


class CudaGraphs:
    """Replays one CUDA graph per input signature (names, shapes, dtypes), captured on first use.

    The server sends a small set of shapes (its batch sizes and sequence-length buckets), so up
    to `limit` signatures are captured and later ones run without a graph. Graphs share one
    memory pool; outputs are cloned right after each replay, and replays are serialized, which
    is what makes sharing the pool safe.
    """

    def __init__(self, module: torch.nn.Module, limit: int) -> None:
        self.module = module
        self.limit = limit
        self.graphs: dict[tuple, tuple[dict[str, torch.Tensor], torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.pool: Any = None
        self.lock = threading.Lock()

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(feeds.items()))
        with self.lock:
            entry = self.graphs.get(key)
            if entry is None:
                if len(self.graphs) >= self.limit:
                    return self.module(**feeds)
                entry = self.graphs[key] = self._capture(feeds)
            static_inputs, graph, static_outputs = entry
            for name, t in feeds.items():
                static_inputs[name].copy_(t)
            graph.replay()
            return {name: t.clone() for name, t in static_outputs.items()}

    def _capture(self, feeds: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any, dict[str, torch.Tensor]]:
        static = {name: t.clone() for name, t in feeds.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # Triton compiles and autotunes on first calls: never inside a capture
                self.module(**static)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.module(**static)
        return static, graph, outputs


class TritonEngine(Engine):
    """Runs the rewritten program on the GPU (Triton / CUDA kernels) or the CPU (references)."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)
        import_kernels()
        options = {**OPTIONS, **manifest.config.backend_options}
        self.device = _device(options["device"])
        if self.device.type == "cuda" and self.accepts_packed:
            # why: kiln_kernels imports Triton (~0.9 s, measured): loaded with the first engine, not the module
            from kiln_kernels.native import is_built

            if not is_built():
                raise EngineError(
                    f"engine {path} packs tokens with kiln's CUDA extension (kiln_kernels._C), which is not built here: "
                    "reinstall kiln with nvcc on PATH, or recompile with --disable-pass remove_padding")
        weights = load_weights(path)
        program = load_program(path, weights=weights)
        packed = self.manifest.build.get("packed_batches") or {}
        entry = load_program(path, file=packed["program"], weights=weights) if packed.get("program") else None
        if self.device.type != "cpu":
            # export burnt the build machine's device into the graph (aranges, casts, asserts)
            program = move_to_device_pass(program, self.device)
            entry = move_to_device_pass(entry, self.device) if entry is not None else None
        self._module = program.module()
        self._packed = entry.module() if entry is not None else None
        self._packed_inputs: list[str] = list(packed.get("inputs") or [])
        self._graphs = None
        if self.device.type == "cuda" and options["cuda_graphs"] and not self.accepts_packed:
            self._graphs = CudaGraphs(self._module, int(options["max_cuda_graphs"]))

    @property
    def uses_cuda_graphs(self) -> bool:
        """True on GPU for padded engines: each input shape is captured once and replayed."""
        return self._graphs is not None

    @property
    def has_packed_entry(self) -> bool:
        return self._packed is not None

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        home = next(iter(inputs.values())).device
        feeds = {name: t.to(self.device) for name, t in inputs.items()}
        outputs = self._graphs(feeds) if self._graphs is not None else self._module(**feeds)
        return {name: t.to(home) for name, t in outputs.items()}

    def _run_packed(self, inputs: dict[str, torch.Tensor], cu_seqlens: torch.Tensor,
                    max_seqlen: int) -> dict[str, torch.Tensor]:
        assert self._packed is not None
        home = next(iter(inputs.values())).device
        feeds = {**inputs, "cu_seqlens": cu_seqlens}
        args = [feeds[name].to(self.device) for name in self._packed_inputs[:-1]]
        outputs = self._packed(*args, max_seqlen)
        return {name: t.to(home) for name, t in outputs.items()}


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise EngineError("backend option device='cuda' but no CUDA device is visible")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load(directory: Path, manifest: Manifest) -> Engine:
    return TritonEngine(directory, manifest)


__all__ = ["TritonEngine", "CudaGraphs", "OPTIONS", "PACKED_PROGRAM_FILE", "import_kernels", "load"]
