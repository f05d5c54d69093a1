"""Each fusion pass on small models written to hit (or miss) its pattern: what is matched, what is
deliberately left alone, and that the rewritten graph still computes the model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from optimize.backends import get_backend
from optimize.capture import capture
from optimize.passes import PassContext, run_passes
from optimize.passes import order
from optimize.passes.base import call_nodes
from optimize.runtime.config import CompileConfig
from optimize.sources import load_source
from optimize.verify import compare_real_tokens

ops = torch.ops.kiln
aten = torch.ops.aten
TOKENS = {0: "batch", 1: "seq"}


def run(factory: str, precision: str = "fp32", **passes: bool):
    """Capture `factory` (a function of this module) as the triton backend would, run every
    pass; return (graph, results by pass name, eager module, source)."""
    config = CompileConfig(backend="triton", precision=precision, max_batch=4, max_seq=16, passes=passes)
    src = load_source(f"{__name__}:{factory}", config)
    plan = get_backend("triton").precision_plan(config)
    gm = capture(src, plan.capture).module()
    fx_passes = frozenset(order.names(order.FX))
    results = {r.name: r for r in run_passes(gm, PassContext(config, src.inputs, "triton", plan), fx_passes)}
    return gm, results, src


def agreement(gm, src, sizes=None) -> dict[str, float]:
    feeds = src.make_inputs(sizes or {"batch": 3, "seq": 11}, torch.Generator().manual_seed(1))
    with torch.inference_mode():
        stats = compare_real_tokens(feeds, src.module(**feeds), gm(**feeds))
    return {"max_abs_error": max(s["max_abs_error"] for s in stats.values()),
            "min_cosine": min(s["min_cosine"] for s in stats.values())}


# ---------------------------------------------------------------------------------- attention
def bert_eager():
    """A Hugging Face BERT with the explicit (eager) attention: matmul, scale, additive mask,
    softmax, matmul."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    config._attn_implementation = "eager"
    model = transformers.BertModel(config, add_pooling_layer=False)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return model, {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": mask}, \
        {"input_ids": TOKENS, "attention_mask": TOKENS}


def test_explicit_attention_chain_becomes_the_kernel_and_runs_packed():
    gm, results, src = run("bert_eager")
    assert results["fuse_attention"].matches == {"sdpa": 0, "explicit": 2}
    assert results["remove_padding"].matches["packed_attention"] == 2
    assert not call_nodes(gm, aten.softmax.int, aten.matmul.default)
    stats = agreement(gm, src, {"batch": 2, "seq": 8})
    assert stats["max_abs_error"] < 1e-4


class CausalNoMask(torch.nn.Module):
    """Decoder-style attention with `is_causal=True` and no padding mask."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, 32)


def causal_no_mask():
    torch.manual_seed(0)
    return CausalNoMask(), {"x": torch.randn(2, 6, 32)}, {"x": TOKENS}


def test_causal_sdpa_without_mask_becomes_a_causal_kernel_call():
    gm, results, src = run("causal_no_mask")
    assert results["fuse_attention"].matches["sdpa"] == 1
    (node,) = call_nodes(gm, ops.attention.default)
    assert node.args[3] is None and node.args[4] is True
    assert results["remove_padding"].matches["packed_attention"] == 0  # no mask: nothing to pack by
    assert agreement(gm, src)["max_abs_error"] < 1e-5


class BiasedAttention(torch.nn.Module):
    """Attention with an additive position bias (ALiBi-like): not a mask, must stay SDPA."""

    def forward(self, x):
        b, s, _ = x.shape
        q = x.view(b, s, 2, 8).transpose(1, 2)
        pos = torch.arange(s, dtype=x.dtype)
        bias = -(pos[None, :] - pos[:, None]).abs()
        return F.scaled_dot_product_attention(q, q, q, attn_mask=bias).transpose(1, 2).reshape(b, s, 16)


def biased_attention():
    return BiasedAttention(), {"x": torch.randn(2, 6, 16)}, {"x": TOKENS}


def test_attention_with_a_bias_that_is_not_a_mask_is_left_alone():
    gm, results, src = run("biased_attention")
    assert results["fuse_attention"].matches["sdpa"] == 0
    assert call_nodes(gm, aten.scaled_dot_product_attention.default)
    assert agreement(gm, src)["max_abs_error"] < 1e-5


# --------------------------------------------------------------------------------- QKV / GELU
class Block(torch.nn.Module):
    """q/k/v linears on one input, a linear on another; erf-GELU and tanh-GELU spelled out;
    a same-shape residual LayerNorm and a broadcast one."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))
        self.other = torch.nn.Linear(16, 16)
        self.up1, self.up2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16, bias=False)
        self.norm1, self.norm2 = torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)
        self.shift = torch.nn.Parameter(torch.randn(16))

    def forward(self, x, y):
        h = self.q(x) + self.k(x) * self.v(x) + self.other(y)
        u = self.up1(h)
        u = u * 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0)))
        w = self.up2(u)
        w = 0.5 * w * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (w + 0.044715 * torch.pow(w, 3.0))))
        return self.norm2(self.norm1(h + w) + self.shift)


def block():
    torch.manual_seed(0)
    return Block(), {"x": torch.randn(2, 5, 16), "y": torch.randn(2, 5, 16)}, {"x": TOKENS, "y": TOKENS}


def test_linears_sharing_an_input_fuse_into_one_gemm():
    gm, results, src = run("block")
    assert results["fuse_qkv"].matches == {"groups": 1, "linears": 3}
    assert len(call_nodes(gm, aten.split_with_sizes.default)) == 1
    assert agreement(gm, src)["max_abs_error"] < 1e-5


def test_gelu_formulas_become_bias_gelu_with_the_linear_bias_moved_in():
    gm, results, src = run("block")
    # erf formula after a biased linear; tanh formula after a bias-free one
    assert results["fuse_bias_gelu"].matches == {"bias_gelu": 1, "gelu": 1}
    approximations = sorted(n.args[2] for n in call_nodes(gm, ops.bias_gelu.default))
    assert approximations == ["none", "tanh"]
    assert not call_nodes(gm, aten.erf.default, aten.tanh.default)
    assert agreement(gm, src)["max_abs_error"] < 1e-5


def test_only_same_shape_residual_adds_fuse_with_layer_norm():
    gm, results, _ = run("block")
    assert results["fuse_residual_layer_norm"].matches == {"add_layer_norm": 1}  # + shift broadcasts
    assert len(call_nodes(gm, aten.layer_norm.default)) == 1


# ------------------------------------------------------------------------ precision / int8
class Pooler(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = F.gelu(self.fc(x))
        return {"tokens": h, "pooled": F.normalize(h.sum(dim=1) / x.shape[1], dim=-1)}


def pooler():
    torch.manual_seed(0)
    return Pooler(), {"x": torch.randn(2, 5, 16)}, {"x": TOKENS}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_keeps_reductions_in_fp32_and_fp32_outputs(precision):
    gm, results, src = run("pooler", precision)
    assert results["mixed_precision"].matches["fp32_islands"] >= 2  # the sum and the norm
    for node in call_nodes(gm, aten.sum.dim_IntList, aten.linalg_vector_norm.default):
        assert node.meta.get("kiln_fp32") or node.args[0].meta.get("val").dtype == torch.float32
    x = torch.randn(3, 7, 16)
    with torch.inference_mode():
        got = gm(x=x)
    assert all(v.dtype == torch.float32 for v in got.values())
    assert agreement(gm, src)["min_cosine"] > 0.999


def test_int8_weight_quantizes_every_linear_and_moves_gelu_into_the_epilogue():
    gm, results, src = run("pooler", "int8-weight")
    assert results["quantize"].matches == {"linear": 1, "gelu_epilogue": 1}
    (node,) = call_nodes(gm, ops.int8_weight_linear.default)
    assert node.args[1].op == "get_attr" and node.args[4] == "gelu"
    assert not call_nodes(gm, ops.bias_gelu.default, aten.linear.default)
    assert agreement(gm, src)["min_cosine"] > 0.99


def test_fp32_engines_skip_the_precision_and_int8_passes():
    _, results, _ = run("pooler")
    assert results["mixed_precision"].skipped == "precision is fp32"
    assert "int8-weight" in results["quantize"].skipped


# --------------------------------------------------------------------------------- packing
def roberta_pooler():
    """RoBERTa with its pooler, which reads token 0 (`h[:, 0]`): padding in a left-padded row,
    and the factory's random masks put padding anywhere. Positions come from the ids (cumsum
    of ids that are not the pad id 1)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.RobertaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                        intermediate_size=64, vocab_size=100, max_position_embeddings=40)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    return transformers.RobertaModel(config), {"input_ids": torch.randint(1, 100, (2, 8)), "attention_mask": mask}, \
        {"input_ids": TOKENS, "attention_mask": TOKENS}


def test_a_position_read_outside_the_packed_layers_is_computed_even_where_it_is_padding():
    gm, results, src = run("roberta_pooler")
    assert results["remove_padding"].matches["packed_attention"] == 2
    assert results["remove_padding"].matches["read_positions"] == 1  # the pooler's token 0
    lengths = torch.tensor([9, 4, 1])
    right = (torch.arange(9)[None] < lengths[:, None]).long()
    for mask in (right, right.flip(1)):  # right padding: no query-only token; left: one per short row
        feeds = {"input_ids": torch.randint(2, 100, (3, 9), generator=torch.Generator().manual_seed(0)),
                 "attention_mask": mask}
        feeds["input_ids"] = feeds["input_ids"].masked_fill(mask == 0, 1)
        with torch.inference_mode():
            want, got = src.module(**feeds), gm(**feeds)
        torch.testing.assert_close(got["pooler_output"], want["pooler_output"], atol=1e-5, rtol=1e-5)
        stats = compare_real_tokens(feeds, want, got)
        assert stats["last_hidden_state"]["max_abs_error"] < 1e-5
    assert agreement(gm, src)["max_abs_error"] < 1e-5  # random masks: padding anywhere, token 0 too


class FirstToken(torch.nn.Module):
    """A causal decoder whose output reads token 0."""

    def __init__(self) -> None:
        import transformers

        super().__init__()
        torch.manual_seed(0)
        self.gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_head=2, n_layer=1, vocab_size=100,
                                                                   n_positions=32))

    def forward(self, input_ids, attention_mask):
        return {"first": self.gpt2(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]}


def first_token():
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    return FirstToken(), {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": mask}, \
        {"input_ids": TOKENS, "attention_mask": TOKENS}


def test_a_causal_model_that_reads_a_fixed_position_is_not_packed():
    gm, results, src = run("first_token")
    assert results["fuse_attention"].matches["sdpa"] == 1
    assert results["remove_padding"].matches["packed_attention"] == 0
    assert agreement(gm, src)["max_abs_error"] < 1e-5
