"""Weight-only int8 quantization (precision "int8-weight"): every matrix multiply by a constant
weight becomes `kiln.int8_weight_linear` over symmetric per-output-channel int8 weights.

No calibration: the scales come from the weights alone (max |w| per output row / 127), so the
weights take a quarter of their fp32 memory (half of fp16) and small-batch GEMMs, which only
stream weights, get faster; activations keep the engine's precision. A `kiln.bias_gelu`
that follows a bias-free linear (see fuse_bias_gelu) moves into the GEMM's epilogue.
"""

from __future__ import annotations

from typing import ClassVar

from torch import fx

from optimize.passes.base import GraphPass, PassContext, add_constant
from optimize.passes.matching import is_call, kernel_ops, match_linear, release_attrs, single_user

_EPILOGUES = {"none": "gelu", "tanh": "gelu_tanh"}  # bias_gelu approximate -> int8 linear activation


class Quantize(GraphPass):
    name: ClassVar[str] = "quantize"
    description: ClassVar[str] = "weight-only int8 (per-channel) linears → kiln.int8_weight_linear"

    def applies(self, ctx: PassContext) -> str:
        if not ctx.plan.weight_only:
            return f"precision is {ctx.plan.precision} (runs for int8-weight)"
        return ""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, int]:
        # why: kiln_kernels imports Triton (~0.9 s, measured): only this pass's run needs it
        from kiln_kernels import quantize_int8_per_channel

        ops = kernel_ops()
        counts = {"linear": 0, "gelu_epilogue": 0}
        replaced: list[str] = []
        for node in list(gm.graph.nodes):
            m = match_linear(gm, node)
            if m is None:
                continue
            w_int8, scale = quantize_int8_per_channel(m.weight_out_in(gm).float())
            q = add_constant(gm, "_kiln_int8_weight", w_int8, node)
            s = add_constant(gm, "_kiln_int8_scale", scale, node)
            bias, activation, target = m.bias, "none", node
            epilogue = single_user(node)
            if bias is None and is_call(epilogue, ops.bias_gelu.default) and epilogue.args[0] is node:
                bias, activation, target = epilogue.args[1], _EPILOGUES[epilogue.args[2]], epilogue
                counts["gelu_epilogue"] += 1
            with gm.graph.inserting_before(node):
                out = gm.graph.call_function(ops.int8_weight_linear.default, (m.x, q, s, bias, activation))
            target.replace_all_uses_with(out)
            if target is not node:
                gm.graph.erase_node(target)
            gm.graph.erase_node(node)
            counts["linear"] += 1
            replaced += [str(m.weight.target)] + ([str(m.bias.target)] if isinstance(m.bias, fx.Node) else [])
        release_attrs(gm, replaced)
        return counts

