"""The graph-pass interface: one rewrite over a torch.fx graph that reports what it matched."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx

from optimize.runtime.config import CompileConfig
from optimize.runtime.specs import TensorSpec

aten = torch.ops.aten

# Passes every backend can take: they only remove or precompute aten nodes.
GENERIC_PASSES = frozenset({"remove_dropout", "constant_folding", "dead_code"})
# Passes whose result calls kiln kernels (torch.ops.kiln / kernels_cuda) or relies on their
# fp32 accumulation: only backends that execute those ops (`triton`) take them.
KERNEL_PASSES = frozenset({"fuse_attention", "fuse_qkv", "fuse_embedding_layer_norm", "fuse_residual_layer_norm",
                           "fuse_bias_gelu", "quantize_int8", "precision", "remove_padding"})


@dataclass
class PassContext:
    """What a pass may consult: the compile config, the engine's inputs, and the backend that
    will run the result (fusions into kiln kernels only make sense for backends that run them)."""

    config: CompileConfig
    inputs: list[TensorSpec]
    backend: str


@dataclass
class PassResult:
    """One line of the compile report."""

    name: str
    matches: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    accuracy: dict[str, float] | None = None
    skipped: str = ""

    @property
    def total(self) -> int:
        return sum(self.matches.values())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pass": self.name, "matches": self.matches, "seconds": round(self.seconds, 4)}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        if self.skipped:
            out["skipped"] = self.skipped
        return out


class GraphPass(ABC):
    """A named rewrite of an unlifted `torch.export` graph module (parameters are `get_attr`
    nodes, so a pass may add or replace weights with `register_buffer`)."""

    name: ClassVar[str]
    description: ClassVar[str]

    def applies(self, ctx: PassContext) -> str:
        """Empty when the pass should run in `ctx`, else the reason it is skipped."""
        return ""

    @abstractmethod
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        """Rewrite `gm` in place; return match counts by kind (e.g. {"dropout": 13})."""


def call_nodes(gm: fx.GraphModule, *targets: Any) -> list[fx.Node]:
    """The call_function nodes of `gm` whose target is one of `targets`, in graph order."""
    wanted = set(targets)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in wanted]


def attr_tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor behind a `get_attr` node (a parameter, buffer or constant), else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value if isinstance(value, torch.Tensor) else None


def add_constant(gm: fx.GraphModule, prefix: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register `value` as a new buffer of `gm` and return a `get_attr` node for it."""
    index = 0
    while hasattr(gm, f"{prefix}_{index}"):
        index += 1
    name = f"{prefix}_{index}"
    gm.register_buffer(name, value.detach().contiguous())
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)
