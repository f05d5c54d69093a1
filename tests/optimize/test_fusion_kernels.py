"""The fused graphs run on the Triton kernels themselves, not only on their references.

On CPU the `torch.ops.kiln.*` ops run plain-torch references; on GPU they launch Triton. To
check here that what the passes emit (argument order, strides, packed layouts, dtypes) is what
the Triton launchers accept, each graph is run again with every kiln op swapped for its
launcher under TRITON_INTERPRET=1 (set by tests/conftest.py on machines without a GPU).
"""

from __future__ import annotations

import pytest
import torch
from torch import fx

from optimize.backends import get_backend
from optimize.capture import capture
from optimize.passes import PassContext, run_passes
from optimize.passes import order
from optimize.runtime.config import CompileConfig
from optimize.sources import load_source
from optimize.verify import compare_real_tokens
from tests.optimize.hf_random import TINY_BERT, hf_dir

import kiln_kernels
from kiln_kernels._util import INTERPRET  # noqa: E402

pytestmark = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (CPU); GPU tests cover the GPU")

ops = torch.ops.kiln
LAUNCHERS = {
    ops.attention.default: kiln_kernels.attention_triton,
    ops.attention_varlen.default: kiln_kernels.attention_varlen_triton,
    ops.layer_norm.default: kiln_kernels.layer_norm_triton,
    ops.add_layer_norm.default: lambda x, r, w, b, eps: kiln_kernels.layer_norm_triton(x, w, b, eps, r),
    ops.bias_gelu.default: kiln_kernels.bias_gelu_triton,
    ops.embedding_layer_norm.default: lambda ids, pos_ids, type_ids, word, pos, types, w, b, eps:
        kiln_kernels.embedding_layer_norm_triton(ids, word, pos, types, w, b, eps, position_ids=pos_ids,
                                            token_type_ids=type_ids),
    ops.int8_weight_linear.default: kiln_kernels.int8_weight_linear_triton,
}


class OnTriton(fx.Interpreter):
    """Runs a graph with kiln's ops replaced by their Triton launchers; records which ran."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.launched: set[str] = set()

    def call_function(self, target, args, kwargs):
        if target in LAUNCHERS:
            self.launched.add(target.name())
            return LAUNCHERS[target](*args, **kwargs)
        return super().call_function(target, args, kwargs)


@pytest.mark.parametrize("model, precision, packed", [
    ("bert", "fp32", True), ("bert", "fp16", False), ("bert", "int8-weight", True), ("gpt2", "bf16", True),
])
def test_fused_graph_on_the_triton_kernels_matches_eager(model: str, precision: str, packed: bool):
    if model == "bert":
        source = hf_dir("bert", 2, **TINY_BERT)
    else:
        source = hf_dir("gpt2", 2, n_embd=64, n_head=4, vocab_size=500)
    config = CompileConfig(backend="triton", precision=precision, max_batch=4, max_seq=16,
                           passes={} if packed else {"remove_padding": False})
    src = load_source(source, config)
    plan = get_backend("triton").precision_plan(config)
    gm = capture(src, plan.capture).module()
    run_passes(gm, PassContext(config, src.inputs, "triton", plan), frozenset(order.names(order.FX)))
    feeds = src.make_inputs({"batch": 3, "seq": 7}, torch.Generator().manual_seed(1))
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    interpreter = OnTriton(gm)
    with torch.inference_mode():
        expected = src.module(**feeds)
        got = interpreter.run(*[feeds[n] for n in names])
    assert ("kiln::attention_varlen" if packed else "kiln::attention") in interpreter.launched
    tolerance = config.tolerance
    for name, stats in compare_real_tokens(feeds, expected, got).items():
        assert stats["max_abs_error"] <= tolerance.max_abs_error and stats["min_cosine"] >= tolerance.min_cosine, name
