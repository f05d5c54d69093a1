"""Graph passes and the pass manager.

Passes run in the fixed order of `PIPELINE` (each module does one rewrite). `CompileConfig.passes`
turns passes on or off by name; a backend says which passes it can execute (fusions into kiln
kernels only for backends that run those kernels). In verification mode the manager checks the
graph against the reference after every pass and names the first pass that breaks accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import fx

from optimize.passes.base import GENERIC_PASSES, KERNEL_PASSES, GraphPass, PassContext, PassResult
from optimize.passes.constant_folding import ConstantFolding
from optimize.passes.dead_code import DeadCode
from optimize.passes.fuse_attention import FuseAttention
from optimize.passes.fuse_bias_gelu import FuseBiasGelu
from optimize.passes.fuse_embedding_layer_norm import FuseEmbeddingLayerNorm
from optimize.passes.fuse_qkv import FuseQKV
from optimize.passes.fuse_residual_layer_norm import FuseResidualLayerNorm
from optimize.passes.precision import Precision
from optimize.passes.quantize_int8 import QuantizeInt8
from optimize.passes.remove_dropout import RemoveDropout
from optimize.passes.remove_padding import RemovePadding
from optimize.runtime.errors import AccuracyError, ConfigError

# The order passes run in. Clean-ups first so the fusions see the simplest graph; embedding + LN
# before residual + LN (an embedding sum is an add too); bias + GELU before int8 so the GELU
# moves into the int8 GEMM's epilogue; precision after the fusions (it only wraps what is left
# of aten reductions); padding removal last, over the fused ops.
PIPELINE: list[type[GraphPass]] = [
    RemoveDropout, ConstantFolding, DeadCode,
    FuseAttention, FuseQKV, FuseEmbeddingLayerNorm, FuseResidualLayerNorm, FuseBiasGelu,
    QuantizeInt8, Precision, RemovePadding,
]
PASSES: dict[str, type[GraphPass]] = {p.name: p for p in PIPELINE}
Verifier = Callable[[fx.GraphModule], dict[str, float]]


def register_pass(cls: type[GraphPass], after: str | None = None) -> type[GraphPass]:
    """Add a pass to the pipeline (at the end, or right after the pass named `after`)."""
    if cls.name in PASSES:
        PIPELINE.remove(PASSES[cls.name])
    index = PIPELINE.index(PASSES[after]) + 1 if after else len(PIPELINE)
    PIPELINE.insert(index, cls)
    PASSES[cls.name] = cls
    return cls


def check_pass_names(names: list[str] | set[str]) -> None:
    unknown = sorted(set(names) - set(PASSES))
    if unknown:  # `CompileConfig.passes` also toggles the ONNX passes (optimize.onnx)
        # why: optimize.onnx imports onnx and onnxscript (~4 s, measured): builds without ONNX never pay it
        from optimize.onnx import ONNX_PASSES

        unknown = sorted(set(unknown) - set(ONNX_PASSES))
    if unknown:
        # why: optimize.onnx imports onnx and onnxscript (~4 s, measured): builds without ONNX never pay it
        from optimize.onnx import ONNX_PASSES

        raise ConfigError(f"unknown pass(es) {', '.join(unknown)}; available: {', '.join([*PASSES, *ONNX_PASSES])}")


def run_passes(
    gm: fx.GraphModule,
    ctx: PassContext,
    allowed: frozenset[str],
    verifier: Verifier | None = None,
    tolerance: tuple[float, float] | None = None,
) -> list[PassResult]:
    """Run the enabled passes of `PIPELINE` on `gm` in order; return one result per pass.

    A pass runs when the backend allows it (`allowed`), `ctx.config.passes` does not turn it
    off, and the pass itself applies. With `verifier` (graph → {"max_abs_error", "min_cosine"})
    and `tolerance` (max_abs_error, min_cosine) accuracy is checked after every pass that
    changed something, and `AccuracyError` names the first pass that broke it.
    """
    check_pass_names(set(ctx.config.passes))
    results = []
    for cls in PIPELINE:
        p = cls()
        enabled = ctx.config.passes.get(p.name, True)
        reason = ("not supported by backend " + ctx.backend if p.name not in allowed
                  else "disabled in config" if not enabled else p.applies(ctx))
        if reason:
            results.append(PassResult(p.name, skipped=reason))
            continue
        t0 = time.perf_counter()
        matches = p.run(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        result = PassResult(p.name, matches, time.perf_counter() - t0)
        if verifier is not None and result.total:
            result.accuracy = verifier(gm)
            if tolerance and (result.accuracy["max_abs_error"] > tolerance[0]
                              or result.accuracy["min_cosine"] < tolerance[1]):
                raise AccuracyError(
                    f"pass {p.name} broke accuracy: max abs error {result.accuracy['max_abs_error']:.3g} "
                    f"(allowed {tolerance[0]:.3g}), min cosine {result.accuracy['min_cosine']:.6f} "
                    f"(allowed {tolerance[1]})"
                )
        results.append(result)
    return results


__all__ = ["GraphPass", "PassContext", "PassResult", "PIPELINE", "PASSES", "GENERIC_PASSES", "KERNEL_PASSES", "register_pass",
           "run_passes", "check_pass_names"]
