"""Backend `triton`: the captured program rewritten by kiln's fusion passes to call kiln's kernels,
stored as `program.pt2` (graph) + `weights.safetensors`, and run by PyTorch.

Where it runs: on a GPU, the `torch.ops.kiln.*` ops launch the Triton kernels and
`torch.ops.kiln_cuda.*` the CUDA C++ ones, and each distinct input shape is captured once as
a CUDA graph and replayed (one launch per batch instead of one per op); on CPU every op runs
its plain-torch reference, so an engine built and verified on a machine without a GPU is the
same program that runs on one.

Precision: fp16 / bf16 are captured in that precision with fp32 inputs and outputs (see
optimize.passes.mixed_precision); int8-weight is fp16 activations with int8 per-channel weights
(optimize.passes.quantize). The tensor contract is fp32 at the outputs either way.

Packed batches: when the padding-removal pass applied, the engine computes only the real tokens
of a batch and the manifest says so (`build["packed_batches"]`, read by `Engine.accepts_packed`):
requests of different lengths can share one batch padded to the longest without paying for the
padding. Such engines do not use CUDA graphs (the packed size changes with every batch).
Beside the padded program, the build derives a **packed entry** (`packed.pt2`, see
`optimize.passes.packed_entry`): the same layers reading tokens packed back to back with
`cu_seqlens`, returning token outputs packed, so `Engine.run_packed` hands a packed batch to the
kernels as it is. It shares `weights.safetensors` with the padded program; it is checked here
against the padded program on a batch of mixed lengths and left out, with the reason in the
manifest (`packed_batches.padded_because`), when it cannot be derived or does not agree.

Options (`CompileConfig.backend_options`):
- `device` ("auto" | "cuda" | "cpu", default "auto": the GPU when there is one);
- `cuda_graphs` (default True): capture and replay CUDA graphs on GPU (padded engines);
- `max_cuda_graphs` (default 32): distinct input shapes captured; later ones run uncaptured.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.export import ExportedProgram

from optimize.backends import register_backend
from optimize.backends.base import Backend, BuildContext
from optimize.passes.base import GENERIC_PASSES, KERNEL_PASSES
from optimize.passes.packed_entry import Unpackable, packed_input_names, packed_program
from optimize.runtime.backends.triton import OPTIONS, PACKED_PROGRAM_FILE, TritonEngine, import_kernels
from optimize.runtime.config import CompileConfig
from optimize.runtime.engine import Engine
from optimize.runtime.errors import ConfigError
from optimize.runtime.manifest import Manifest
from optimize.runtime.program import save_program

# key of the build record: None, or {"mask_input": name, "program": "packed.pt2" or None,
# "inputs": the packed entry's inputs in call order, "padded_because": why there is no entry}
PACKED_BATCHES = "packed_batches"
_DEVICES = ("auto", "cuda", "cpu")


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


def _check_packed_entry(padded: ExportedProgram, packed: ExportedProgram, ctx: BuildContext) -> None:
    """Raise `Unpackable` unless the packed entry gives the padded program's answers on a batch
    of rows of different lengths (the build's verification runs the padded program only)."""
    lengths = [min(n, ctx.config.max_seq) for n in (3, 1, 6)][:ctx.config.max_batch]
    mask = packed_mask_input(padded)
    g = torch.Generator().manual_seed(ctx.config.seed + 3)
    padded_feeds: dict[str, torch.Tensor] = {}
    packed_feeds: list[torch.Tensor] = []
    for spec in ctx.inputs:
        low, high = spec.value_range or (0, 1)
        dtype = getattr(torch, spec.dtype)
        shape = [len(lengths), max(lengths), *[d if isinstance(d, int) else d.opt for d in spec.shape[2:]]]
        full = (torch.rand(shape, generator=g).to(dtype) if dtype.is_floating_point
                else torch.randint(int(low), int(high) + 1, shape, generator=g).to(dtype))
        if spec.name == mask:
            full = torch.stack([(torch.arange(max(lengths)) < n).to(dtype) for n in lengths])
        padded_feeds[spec.name] = full
        packed_feeds.append(torch.cat([full[i, :n] for i, n in enumerate(lengths)]))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.inference_mode():
        expected = padded.module()(**padded_feeds)
        got = packed.module()(*packed_feeds, cu, max(lengths))
    tol = ctx.plan.tolerance if ctx.plan is not None and ctx.plan.tolerance is not None else ctx.config.tolerance
    limit = tol.max_abs_error if tol is not None else 1e-4
    for spec in ctx.outputs:
        want = expected[spec.name]
        if spec.token_layout:
            want = torch.cat([want[i, :n] for i, n in enumerate(lengths)])
        error = (got[spec.name].float() - want.float()).abs().max().item() if want.numel() else 0.0
        if got[spec.name].shape != want.shape or not error <= limit:
            raise Unpackable(f"the packed entry's {spec.name} differs from the padded program's ({error:.3g})")


@register_backend
class TritonBackend(Backend):
    name: ClassVar[str] = "triton"
    # int8 (calibrated activations) and fp8 have no kernels here: ConfigError at compile time.
    precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16", "bf16", "int8-weight"})
    passes: ClassVar[frozenset[str]] = GENERIC_PASSES | KERNEL_PASSES
    options: ClassVar[dict[str, Any]] = OPTIONS

    def native_precisions(self) -> frozenset[str]:
        """None without a CUDA GPU: the kernels' PyTorch references run instead, which keeps
        CPU engines correct but never fast (all-MiniLM-L6-v2 at 8 × 128: 170 ms where OpenVINO
        takes 62), so `--backend auto` does not spend builds on them."""
        return self.precisions if torch.cuda.is_available() else frozenset()

    def quantized_compute(self, options: dict[str, Any], calibrated: bool) -> torch.dtype:
        # weight-only int8 keeps 16-bit activations; the int8 GEMM dequantizes in its epilogue
        return torch.float16

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
        files = save_program(program, directory)
        if not packed:
            ctx.record[PACKED_BATCHES] = None
            return files
        record: dict[str, Any] = {"mask_input": mask, "program": None}
        try:
            entry = packed_program(program, ctx.inputs, ctx.outputs, mask, ctx.config.max_batch,
                                   ctx.config.max_seq)
            _check_packed_entry(program, entry, ctx)
        except Unpackable as exc:
            record["padded_because"] = str(exc)
        else:
            files += save_program(entry, directory, PACKED_PROGRAM_FILE, weights=False)
            record.update(program=PACKED_PROGRAM_FILE, inputs=packed_input_names(ctx.inputs))
        ctx.record[PACKED_BATCHES] = record
        return files

    def load(self, directory: Path, manifest: Manifest) -> Engine:
        return TritonEngine(directory, manifest)
