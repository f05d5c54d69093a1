"""Backend `triton`: the captured program rewritten by kiln's fusion passes to call kiln's kernels,
stored as `program.pt2` (graph) + `weights.safetensors`, and run by PyTorch.

Where it runs: on a GPU, the `torch.ops.kiln.*` ops launch the Triton kernels and
`torch.ops.kiln_cuda.*` the CUDA C++ ones, and each distinct input shape is captured once as
a CUDA graph and replayed (one launch per batch instead of one per op); on CPU every op runs
its plain-torch reference, so an engine built and verified on a machine without a GPU is the
same program that runs on one.

Precision: fp16 / bf16 are captured in that precision with fp32 inputs and outputs (see
optimize.passes.precision); int8-weight is fp16 activations with int8 per-channel weights
(optimize.passes.quantize_int8). The tensor contract is fp32 at the outputs either way.

Packed batches: when the padding-removal pass applied, the engine computes only the real tokens
of a batch and the manifest says so (`build["packed_batches"]`, read by `Engine.accepts_packed`):
requests of different lengths can share one batch padded to the longest without paying for the
padding. Such engines do not use CUDA graphs (the packed size changes with every batch).

Options (`CompileConfig.backend_options`):
- `device` ("auto" | "cuda" | "cpu", default "auto": the GPU when there is one);
- `cuda_graphs` (default True): capture and replay CUDA graphs on GPU (padded engines);
- `max_cuda_graphs` (default 32): distinct input shapes captured; later ones run uncaptured.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.export import ExportedProgram

from optimize.backends import register_backend
from optimize.backends.base import Backend, BuildContext
from optimize.config import CompileConfig
from optimize.engine import Engine
from optimize.errors import ConfigError, EngineError
from optimize.manifest import Manifest
from optimize.passes import GENERIC_PASSES, KERNEL_PASSES
from optimize.program import load_program, save_program

PACKED_BATCHES = "packed_batches"  # key of the build record: {"mask_input": name}, or None
_DEVICES = ("auto", "cuda", "cpu")


def import_kernels() -> None:
    """Register kiln's custom ops; `torch.export.load` of a program that calls them fails
    without (the ops must exist before the graph is deserialized)."""
    import kiln_kernels  # noqa: F401
    import kiln_kernels.native  # noqa: F401


def packed_mask_input(program: ExportedProgram) -> str | None:
    """The name of the input whose nonzeros the program packs tokens by (the padding-removal
    pass's `pack_indices` argument), or None when the program computes padding."""
    import_kernels()
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.kiln_cuda.pack_indices.default:
            source = node.args[0]
            while isinstance(source, torch.fx.Node) and source.op == "call_function":
                source = source.args[0]  # through the contiguous() the pass inserts
            if isinstance(source, torch.fx.Node) and source.op == "placeholder":
                return str(source.target)
    return None


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
        options = {**TritonBackend.options, **manifest.config.backend_options}
        self.device = _device(options["device"])
        if self.device.type == "cuda" and self.accepts_packed:
            from kiln_kernels.native import is_built

            if not is_built():
                raise EngineError(
                    f"engine {path} packs tokens with kiln's CUDA extension (kiln_kernels._C), which is not built here: "
                    "reinstall kiln with nvcc on PATH, or recompile with --disable-pass remove_padding")
        program = load_program(path)
        if self.device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            # export burnt the build machine's device into the graph (aranges, casts, asserts)
            program = move_to_device_pass(program, self.device)
        self._module = program.module()
        self._graphs = None
        if self.device.type == "cuda" and options["cuda_graphs"] and not self.accepts_packed:
            self._graphs = CudaGraphs(self._module, int(options["max_cuda_graphs"]))

    @property
    def uses_cuda_graphs(self) -> bool:
        """True on GPU for padded engines: each input shape is captured once and replayed."""
        return self._graphs is not None

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        home = next(iter(inputs.values())).device
        feeds = {name: t.to(self.device) for name, t in inputs.items()}
        outputs = self._graphs(feeds) if self._graphs is not None else self._module(**feeds)
        return {name: t.to(home) for name, t in outputs.items()}


def _device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise EngineError("backend option device='cuda' but no CUDA device is visible")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@register_backend
class TritonBackend(Backend):
    name: ClassVar[str] = "triton"
    # int8 (calibrated activations) and fp8 have no kernels here: ConfigError at compile time.
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16", "bf16", "int8-weight"})
    passes: ClassVar[frozenset[str]] = GENERIC_PASSES | KERNEL_PASSES
    options: ClassVar[dict[str, Any]] = {"device": "auto", "cuda_graphs": True, "max_cuda_graphs": 32}

    def native_precisions(self) -> frozenset[str]:
        """None without a CUDA GPU: the kernels' PyTorch references run instead, which keeps
        CPU engines correct but never fast (all-MiniLM-L6-v2 at 8 × 128: 170 ms where OpenVINO
        takes 62), so `--backend auto` does not spend builds on them."""
        return self.precisions if torch.cuda.is_available() else frozenset()

    def capture_precision(self, precision: str) -> str:
        # weight-only int8 keeps 16-bit activations; the int8 GEMM dequantizes in its epilogue
        return "fp16" if precision == "int8-weight" else precision

    def resolve_options(self, config: CompileConfig) -> dict[str, Any]:
        options = super().resolve_options(config)
        if options["device"] not in _DEVICES:
            raise ConfigError(f"backend option device must be one of {', '.join(_DEVICES)}; got {options['device']!r}")
        if not isinstance(options["cuda_graphs"], bool):
            raise ConfigError(f"backend option cuda_graphs must be true or false; got {options['cuda_graphs']!r}")
        limit = options["max_cuda_graphs"]
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"backend option max_cuda_graphs must be an integer >= 0; got {limit!r}")
        return options

    def build(self, program: ExportedProgram, ctx: BuildContext, directory: Path) -> list[str]:
        import_kernels()
        ctx.record["kernels"] = dict(sorted(Counter(
            str(n.target).removesuffix(".default") for n in program.graph.nodes
            if n.op == "call_function" and str(n.target).startswith(("kiln.", "kiln_cuda."))).items()))
        mask = packed_mask_input(program)
        packed = mask is not None and mask in {s.name for s in ctx.inputs}
        ctx.record[PACKED_BATCHES] = {"mask_input": mask} if packed else None
        return save_program(program, directory)

    def load(self, directory: Path, manifest: Manifest) -> Engine:
        return TritonEngine(directory, manifest)
