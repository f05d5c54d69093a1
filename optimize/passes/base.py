"""The pass protocol (`Pass`: a named rewrite of one stage that says when it does not apply and
reports what it matched in a `PassResult`), and its FX form: one rewrite over a torch.fx graph.
The ONNX form is `optimize.onnx.base.OnnxPass`; the order of both is `optimize.passes.order`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx

from optimize.precision import PrecisionPlan
from optimize.runtime.config import CompileConfig
from optimize.runtime.specs import TensorSpec

aten = torch.ops.aten

# The stages of the pass order: over the captured torch.fx graph, over the exported ONNX model.
FX = "fx"
ONNX = "onnx"

# Passes every backend can take: they only remove or precompute aten nodes.
GENERIC_PASSES = frozenset({"remove_dropout", "fold_constants", "remove_dead_code"})
# Passes whose result calls kiln kernels (torch.ops.kiln / kernels_cuda) or relies on their
# fp32 accumulation: only backends that execute those ops (`triton`) take them.
KERNEL_PASSES = frozenset({"fuse_attention", "fuse_qkv", "fuse_embedding_layer_norm", "fuse_residual_layer_norm",
                           "fuse_bias_gelu", "quantize", "mixed_precision", "remove_padding"})


@dataclass
class PassContext:
    """What an FX pass may consult: the compile config, the engine's inputs, the backend that
    will run the result (fusions into kiln kernels only make sense for backends that run them)
    and the precision plan (`optimize.precision`; None: the config's precision as a backend
    that captures in it would build it)."""

    config: CompileConfig
    inputs: list[TensorSpec]
    backend: str
    plan: PrecisionPlan = None  # type: ignore[assignment]  # set in __post_init__

    def __post_init__(self) -> None:
        if self.plan is None:
            self.plan = PrecisionPlan.resolve(self.config)


@dataclass
class PassResult:
    """One line of the compile report, for a pass of either stage."""

    name: str
    matches: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    accuracy: dict[str, Any] | None = None
    skipped: str = ""
    stage: str = FX

    @property
    def total(self) -> int:
        return sum(self.matches.values())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pass": self.name, "stage": self.stage, "matches": self.matches,
                               "seconds": round(self.seconds, 4)}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        if self.skipped:
            out["skipped"] = self.skipped
        return out


class Pass(ABC):
    """The protocol of every pass: a `name` (see `optimize.passes.order` for the scheme), the
    `stage` it runs in, a one-line `description`, `applies(ctx)` (empty when it should run,
    else why not) and `run`, which rewrites its stage's artifact and returns match counts by
    kind; the pass manager turns those into a `PassResult`."""

    name: ClassVar[str]
    stage: ClassVar[str]
    description: ClassVar[str]

    def applies(self, ctx: Any) -> str:
        """Empty when the pass should run in `ctx`, else the reason it is skipped."""
        return ""


class GraphPass(Pass):
    """An FX pass: a named rewrite of an unlifted `torch.export` graph module (parameters are
    `get_attr` nodes, so a pass may add or replace weights with `register_buffer`)."""

    stage: ClassVar[str] = FX

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
