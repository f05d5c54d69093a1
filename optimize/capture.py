"""Capture: `torch.export` over the dynamic batch/sequence ranges of the TensorSpecs.

The result is an ExportedProgram whose inputs are keyword tensors named after the specs and
whose output is a dict of named tensors, whatever the source was. Output specs (names, dtypes,
which dims are `batch` / `seq`) are read back from the program's symbolic shapes.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.export import Dim as ExportDim
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from optimize.runtime.errors import CaptureError
from optimize.runtime.specs import Dim, TensorSpec, dtype_name
from optimize.sources.base import Source

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CastPrecision(torch.nn.Module):
    """Runs a module with its floating weights in `dtype`; floating inputs are cast in and
    floating outputs cast back to fp32, so the engine's tensor contract does not change."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = copy.deepcopy(module).to(dtype)
        self.dtype = dtype

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        cast = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        out = self.module(**cast)
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def _dynamic_shapes(specs: list[TensorSpec]) -> dict[str, dict[int, Any]]:
    made: dict[str, Any] = {}
    shapes: dict[str, dict[int, Any]] = {}
    for spec in specs:
        axes = {}
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, Dim):
                if dim.name not in made:
                    made[dim.name] = ExportDim(dim.name, min=dim.min, max=dim.max)
                axes[axis] = made[dim.name]
        shapes[spec.name] = axes
    return shapes


class _KeywordInputs(torch.nn.Module):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.module(**inputs)


def with_keyword_signature(module: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """Wrap `module` so its forward has the explicit signature `(*, name0, name1, ...)`.

    torch.export binds example inputs and `dynamic_shapes` to the forward's parameters; a
    `**inputs` forward (how sources are written, to accept any names) gives it nothing to bind
    to. The signature also names the program's placeholders after the inputs.
    """
    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(n, P.KEYWORD_ONLY) for n in names]

    def forward(self: _KeywordInputs, **inputs: torch.Tensor) -> Any:
        return self.module(**inputs)

    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cls = type("KeywordInputs", (_KeywordInputs,), {"forward": forward})
    return cls(module)


class _Replay(torch.nn.Module):
    """Runs an unlifted exported graph node by node so that re-exporting it keeps each node's
    metadata (module path, stack trace): the profiler attributes ops to layers through it."""

    def __init__(self, gm: torch.fx.GraphModule, names: list[str]) -> None:
        super().__init__()
        self.gm = gm
        self.names = names

    def forward(self, **inputs: torch.Tensor) -> Any:
        flat = [inputs[n] for n in self.names]
        with torch.fx.traceback.preserve_node_meta():
            # Interpreter.run applies the graph's pytree codegen: outputs come back unflattened
            return torch.fx.Interpreter(self.gm).run(*flat)


def example_sizes(inputs: list[TensorSpec]) -> dict[str, int]:
    """Small example sizes for export, not 1 when the range allows (export specializes 0/1)."""
    return {d.name: min(d.max, max(d.min, 2 if d.name == "batch" else 8)) for s in inputs for d in s.dims}


def export_module(module: torch.nn.Module, source: Source) -> ExportedProgram:
    """`torch.export` of `module` (called with the source's named inputs) over the dynamic dims
    of `source.inputs`. Raises `CaptureError` with the exporter's first line when it fails."""
    names = [s.name for s in source.inputs]
    if isinstance(module, torch.fx.GraphModule) and getattr(module, "_out_spec", None) is not None:
        module = _Replay(module, names)  # a rewritten program: keep its node metadata
    module = with_keyword_signature(module, names)  # sources are in eval mode
    example = source.make_inputs(example_sizes(source.inputs), torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_export_logs():
            warnings.simplefilter("ignore")
            return torch.export.export(module, (), example, dynamic_shapes=_dynamic_shapes(source.inputs), strict=False)
    except Exception as exc:  # torch.export raises many types (UserError, GuardOnDataDependent, ...)
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise CaptureError(f"torch.export cannot capture {model_family(source)}: "
                           f"{lines[0] if lines else type(exc).__name__}") from exc


def model_family(source: Source) -> str:
    """How errors name the model: its family and class for Hugging Face sources
    ("longformer (LongformerModel)"), else its name."""
    family, architecture = source.metadata.get("model_type"), source.metadata.get("architecture")
    if family and architecture:
        return f"{family} ({architecture})"
    return architecture or source.name


@contextlib.contextmanager
def _quiet_export_logs() -> Iterator[None]:
    """Keep torch.export's own reports off the console: when a data-dependent guard fails it
    logs a warning and prints the partial graph (hundreds of lines) to stderr; a failed capture
    is reported as one `CaptureError` line instead."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def capture(source: Source, precision: str = "fp32") -> ExportedProgram:
    """Export `source.module`, cast to `precision` first when it is fp16/bf16."""
    if precision not in PRECISION_DTYPES:
        raise CaptureError(f"capture supports precisions {', '.join(PRECISION_DTYPES)}; got {precision!r}")
    module = source.module if precision == "fp32" else CastPrecision(source.module, PRECISION_DTYPES[precision])
    return export_module(module, source)


def output_specs(program: ExportedProgram, inputs: list[TensorSpec]) -> list[TensorSpec]:
    """Names, dtypes and shapes of the program's outputs, with dims mapped back to the
    input `Dim`s they derive from (an output dim that is an expression of several input dims
    becomes an unbounded dynamic dim)."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    by_symbol: dict[Any, Dim] = {}
    # torch.export may rename placeholders (e.g. lower-cases "INPUT0"); user inputs keep the
    # order of the keyword signature, which is the order of `inputs`.
    for spec, placeholder in zip(inputs, program.graph_signature.user_inputs, strict=True):
        value = placeholders[placeholder].meta["val"]
        for size, dim in zip(value.shape, spec.shape):
            if isinstance(dim, Dim) and not isinstance(size, int):
                by_symbol[size.node.expr] = dim

    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = [n.meta["val"] for n in output_node.args[0]]
    names_tree = pytree.tree_unflatten(list(range(len(values))), program.call_spec.out_spec)
    if not isinstance(names_tree, dict):
        raise CaptureError("captured program must return a dict of named tensors")
    specs = []
    for name, index in names_tree.items():
        value = values[index]
        shape: list[int | Dim] = []
        for axis, size in enumerate(value.shape):
            if isinstance(size, int):
                shape.append(size)
            elif size.node.expr in by_symbol:
                shape.append(by_symbol[size.node.expr])
            else:
                shape.append(Dim(f"{name}_d{axis}", 1, 1, 2**31 - 1))
        specs.append(TensorSpec(name, dtype_name(value.dtype), tuple(shape)))
    return specs
