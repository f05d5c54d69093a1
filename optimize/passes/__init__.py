"""The FX passes and their stage of the pass order.

Passes run in the order of `optimize.passes.order.PASS_ORDER`, the registry of both stages; each
module here does one rewrite and is named for its pass.
`CompileConfig.passes` turns passes on or off by name; a backend says which passes it can
execute (fusions into kiln kernels only for backends that run those kernels). In verification
mode the manager checks the graph against the reference after every pass and names the first
pass that breaks accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

from optimize.passes import order
from optimize.passes.base import FX, GENERIC_PASSES, KERNEL_PASSES, GraphPass, Pass, PassContext, PassResult
from optimize.passes.order import PASS_ORDER, RENAMED, canonical_passes
from optimize.runtime.config import Tolerance

Verifier = Callable[[fx.GraphModule], dict[str, float]]


def register_pass(cls: type[GraphPass], after: str | None = None) -> type[GraphPass]:
    """Add an FX pass to the pass order (at the end of the FX stage, or right after the pass
    named `after`)."""
    order.register(cls, after)
    return cls


def unregister_pass(name: str) -> None:
    """Take a pass added with `register_pass` out again."""
    order.remove(name)


def check_pass_names(names: list[str] | set[str]) -> None:
    """Raise `ConfigError` naming passes of neither stage (old names are accepted)."""
    canonical_passes(dict.fromkeys(names, True))


def run_passes(
    gm: fx.GraphModule,
    ctx: PassContext,
    allowed: frozenset[str],
    verifier: Verifier | None = None,
    tolerance: tuple[float, float] | None = None,
) -> list[PassResult]:
    """Run the enabled FX passes on `gm` in order; return one result per pass.

    A pass runs when the backend allows it (`allowed`), `ctx.config.passes` does not turn it
    off, and the pass itself applies. With `verifier` (graph → {"max_abs_error", "min_cosine"})
    and `tolerance` (max_abs_error, min_cosine) accuracy is checked after every pass that
    changed something, and `AccuracyError` names the first pass that broke it.
    """
    def apply(p: GraphPass, graph: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, int]]:
        matches = p.run(graph, ctx)
        graph.graph.lint()
        graph.recompile()
        return graph, matches

    bounds = Tolerance(max_abs_error=tolerance[0], min_cosine=tolerance[1]) if tolerance else None
    _, results = order.run_stage(FX, gm, ctx, apply, allowed, verifier, bounds)
    return results


__all__ = ["Pass", "GraphPass", "PassContext", "PassResult", "PASS_ORDER", "RENAMED", "GENERIC_PASSES",
           "KERNEL_PASSES", "register_pass", "unregister_pass", "run_passes", "check_pass_names"]
