"""Source: a program exported with `torch.export.save` (`.pt2`).

Its inputs, dtypes and dynamic dims come from the program itself; the compile config's batch
and sequence ranges must lie inside the ranges the program was exported with. The archive is
read by `optimize.runtime.program.read_archive`: pickled weights or objects and evaluated code are
refused, the pickled example inputs every `torch.export.save` writes are dropped unread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from optimize.runtime.config import CompileConfig
from optimize.runtime.errors import ConfigError, SourceError
from optimize.runtime.program import read_archive
from optimize.runtime.specs import Dim, TensorSpec, dtype_name
from optimize.sources.base import NamedOutputs, Source, digest_files, random_like_spec

_AXIS_NAMES = {0: "batch", 1: "seq"}


class _ProgramModule(torch.nn.Module):
    """Calls an exported program's module with named inputs, in the program's own calling
    convention (positional and/or keyword, as recorded in its input spec)."""

    def __init__(self, program: torch.export.ExportedProgram, names: list[str]) -> None:
        super().__init__()
        self.inner = program.module()
        self.names = names
        self.in_spec = program.call_spec.in_spec

    def forward(self, **inputs: torch.Tensor) -> Any:
        args, kwargs = pytree.tree_unflatten([inputs[n] for n in self.names], self.in_spec)
        return self.inner(*args, **kwargs)

    def train(self, mode: bool = True) -> _ProgramModule:
        """A no-op: the program was exported in the mode it runs in, and an exported module
        refuses `train()` and `eval()` (verification calls `eval()` on every reference)."""
        return self


def load_pt2(path: Path, config: CompileConfig) -> Source:
    """Load an exported program as a `Source`; raises `SourceError` or `ConfigError`."""
    try:
        # Nothing the archive carries is unpickled or evaluated; its pickled example inputs are dropped.
        program = read_archive(path, error=SourceError, drop_sample_inputs=True)
    except SourceError:
        raise
    except Exception as exc:  # torch raises several types for a corrupt archive
        raise SourceError(f"{path}: not a torch.export program ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    user_inputs = list(program.graph_signature.user_inputs)
    ranges = program.range_constraints
    symbols: dict[Any, Dim] = {}
    specs: list[TensorSpec] = []
    for name in user_inputs:
        value = placeholders[name].meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise SourceError(f"{path}: input {name!r} is not a tensor; only tensor inputs are supported")
        shape: list[int | Dim] = []
        for axis, size in enumerate(value.shape):
            if isinstance(size, int):
                shape.append(size)
                continue
            expr = size.node.expr
            if expr not in symbols:
                vr = ranges.get(expr)
                lo, hi = (int(vr.lower), int(vr.upper)) if vr is not None and vr.upper.is_finite else (1, 2**31 - 1)
                dim_name = _AXIS_NAMES.get(axis, f"d{len(symbols)}")
                wanted = config.dims.get(dim_name)
                if wanted is not None:
                    if wanted.min < lo or wanted.max > hi:
                        raise ConfigError(
                            f"{path} accepts {dim_name} in [{lo}, {hi}]; the config asks for [{wanted.min}, {wanted.max}]"
                        )
                    symbols[expr] = wanted
                else:
                    symbols[expr] = Dim(dim_name, max(lo, 1), max(lo, 1), hi)
            shape.append(symbols[expr])
        specs.append(TensorSpec(name, dtype_name(value.dtype), tuple(shape)))

    def make_inputs(sizes: dict[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {s.name: random_like_spec(s, s.concrete(sizes), generator) for s in specs}

    return Source(
        name=path.stem,
        kind="pt2",
        location=str(path.resolve()),
        digest=digest_files([path]),
        module=NamedOutputs(_ProgramModule(program, user_inputs)),
        inputs=specs,
        make_inputs=make_inputs,
    )
