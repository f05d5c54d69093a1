"""FLOP counting of `optimize.profile` against analytic counts derived here, per model.

Analytic count of an encoder/decoder forward at batch B, sequence S (2·M·N·K per product):
- linears per layer: QKV 3·2·S·H·H, attention output 2·S·H·H, FFN 2·(2·S·H·I);
- attention per layer: QKᵀ and PV, 2·2·pairs·H (heads × head_dim = H), pairs = S² (encoder,
  a padding mask does not skip work) or S(S+1)/2 (causal);
- pooler (BERT): one linear on the first token, 2·H·H.
Sequences are long enough (S=128) that attention is 3–6% of the total, so a missing or
un-halved attention count fails the 1% check; attention is also checked on its own.
"""

from __future__ import annotations

import pytest
import torch

import optimize
from optimize.profile.flops import visible_pairs


def _encoder_flops(batch: int, seq: int, hidden: int, inter: int, layers: int, pooler: bool) -> tuple[int, int]:
    linears = 2 * seq * (4 * hidden * hidden + 2 * hidden * inter)
    attention = 2 * 2 * seq * seq * hidden
    total = batch * (layers * (linears + attention) + (2 * hidden * hidden if pooler else 0))
    return total, batch * layers * attention


def _attention_flops(prof: optimize.profile.Profile) -> int:
    return sum(op.flops for op in prof.ops if op.kind == "attention")


def _assert_within_1pct(counted: int, analytic: int) -> None:
    assert abs(counted - analytic) <= 0.01 * analytic, f"counted {counted}, analytic {analytic} ({counted / analytic:.4f}×)"


def test_bert_base_total_matches_analytic_count():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig()  # BERT-base: 12 layers, hidden 768, FFN 3072; random weights
    model = transformers.BertModel(config).eval()
    batch, seq = 1, 128
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 100:] = 0  # padding: a dense mask still computes every pair
    prof = optimize.profile.count(model, {"input_ids": ids, "attention_mask": mask})
    total, attention = _encoder_flops(batch, seq, 768, 3072, 12, pooler=True)
    _assert_within_1pct(prof.totals.flops, total)
    _assert_within_1pct(_attention_flops(prof), attention)
    assert prof.uncounted == []
    # the hierarchy adds up: the twelve layers hold every linear and attention FLOP but the pooler's
    layer_flops = sum(prof.module(f"encoder.layer.{i}").flops for i in range(12))
    assert layer_flops == total - 2 * 768 * 768 * batch
    assert prof.module("pooler").flops == 2 * 768 * 768 * batch


def test_gpt2_total_matches_analytic_count_with_causal_attention_halved():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config()  # GPT-2 small: 12 layers, 768 wide, FFN 4·768
    model = transformers.GPT2Model(config).eval()
    batch, seq, hidden = 1, 128, 768
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    prof = optimize.profile.count(model, {"input_ids": ids})
    pairs = seq * (seq + 1) // 2
    linears = 2 * seq * (hidden * 3 * hidden + hidden * hidden + hidden * 4 * hidden + 4 * hidden * hidden)
    attention = 2 * 2 * pairs * hidden
    _assert_within_1pct(prof.totals.flops, batch * 12 * (linears + attention))
    _assert_within_1pct(_attention_flops(prof), batch * 12 * attention)
    assert prof.uncounted == []


def test_minilm_total_matches_analytic_count(minilm_model_dir):
    batch, seq = 2, 128
    prof = optimize.profile.count(str(minilm_model_dir), batch=batch, seq=seq)
    total, attention = _encoder_flops(batch, seq, 384, 1536, 6, pooler=True)
    _assert_within_1pct(prof.totals.flops, total)
    _assert_within_1pct(_attention_flops(prof), attention)
    assert prof.inputs["input_ids"]["shape"] == [batch, seq]
    # mean pooling and normalization are vector work, counted but never in the matrix total
    assert prof.totals.vector_flops > 0
    assert prof.uncounted == []


class _Attention(torch.nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_is_counted_on_cpu_and_causal_counts_visible_pairs(causal: bool):
    b, h, s, d = 2, 3, 37, 16  # odd sequence: the causal count is not a power-of-two accident
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    prof = optimize.profile.count(_Attention(causal), (q, k, v))
    pairs = s * (s + 1) // 2 if causal else s * s
    assert prof.totals.flops == 4 * b * h * pairs * d
    assert [op.kind for op in prof.ops if op.flops] == ["attention"]


def test_visible_pairs_follows_pytorch_top_left_causal_mask():
    for sq, sk in [(5, 5), (3, 7), (7, 3), (1, 9)]:
        mask = torch.ones(sq, sk, dtype=torch.bool).tril()
        assert visible_pairs(sq, sk, causal=True) == int(mask.sum())
        assert visible_pairs(sq, sk, causal=False) == sq * sk


class _Spectral(torch.nn.Module):
    """A linear plus ops without a FLOP formula (FFT, sort)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft(x, dim=-1).abs()
        y = self.proj(torch.fft.irfft(torch.fft.rfft(x, dim=-1), n=64, dim=-1))
        return y + torch.sort(spectrum, dim=-1).values.sum()


def test_ops_without_a_formula_are_reported_not_counted_as_zero():
    x = torch.randn(4, 64)
    prof = optimize.profile.count(_Spectral(), (x,))
    uncounted = {u.op: u for u in prof.uncounted}
    assert uncounted["aten._fft_r2c"].calls == 2
    assert "aten._fft_c2r" in uncounted and "aten.sort" in uncounted
    assert all(u.reason for u in prof.uncounted)
    assert uncounted["aten._fft_r2c"].example_shapes == [[4, 64]]
    assert prof.totals.uncounted_calls == sum(u.calls for u in prof.uncounted)
    flagged = [op for op in prof.ops if not op.counted]
    assert {op.op for op in flagged} == set(uncounted)
    # what has a formula is still counted exactly: the linear, 2·4·64·32
    assert prof.totals.flops == 2 * 4 * 64 * 32


def test_kernels_custom_ops_use_their_cost_models():
    import kiln_kernels
    b, s, h, d = 2, 19, 4, 16

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(h * d))
            self.bias = torch.nn.Parameter(torch.zeros(h * d))

        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            o = torch.ops.kiln.attention(q, k, v, None, True)
            return torch.ops.kiln.layer_norm(o.reshape(b, s, h * d), self.weight, self.bias, 1e-5)

    q, k, v = (torch.randn(b, s, h, d) for _ in range(3))
    prof = optimize.profile.count(Block(), (q, k, v))
    by_op = {op.op: op for op in prof.ops}
    attention = kiln_kernels.attention_cost(b, h, s, s, d, torch.float32, causal=True)
    norm = kiln_kernels.layer_norm_cost(b * s, h * d, torch.float32)
    assert by_op["kiln.attention"].flops == attention.flops
    assert by_op["kiln.attention"].bytes == attention.bytes
    assert by_op["kiln.attention"].kind == "attention"
    assert by_op["kiln.layer_norm"].vector_flops == norm.flops and by_op["kiln.layer_norm"].flops == 0
    assert prof.uncounted == []


def test_custom_op_without_a_cost_model_is_reported(monkeypatch):
    import kiln_kernels
    monkeypatch.setattr(kiln_kernels, "ARGS_COST_MODELS", {})
    monkeypatch.setattr(kiln_kernels, "COST_MODELS", {})

    class Norm(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.kiln.layer_norm(x, torch.ones(8), None, 1e-5)

    prof = optimize.profile.count(Norm(), (torch.randn(3, 8),))
    assert [u.op for u in prof.uncounted] == ["kiln.layer_norm"]
    assert "no cost model" in prof.uncounted[0].reason


@torch.library.custom_op("kiln_test_other_library::layer_norm", mutates_args=())
def _other_library_layer_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:])


@_other_library_layer_norm.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_another_librarys_op_named_like_a_kiln_kernel_is_not_costed_as_one():
    """Costs are looked up by name only inside kiln's namespace: `other::layer_norm` could
    be anything, and a wrong count is worse than a missing one."""
    import kiln_kernels  # noqa: F401  (registers kiln::layer_norm, whose cost model must not be used here)

    class Norm(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.kiln_test_other_library.layer_norm(x)

    prof = optimize.profile.count(Norm(), (torch.randn(3, 8),))
    assert [u.op for u in prof.uncounted] == ["kiln_test_other_library.layer_norm"]
    assert "not a kiln kernel" in prof.uncounted[0].reason
    assert prof.totals.flops == 0 and prof.totals.vector_flops == 0


def test_bytes_are_minimum_traffic_per_op():
    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Embedding(1000, 16)
            self.register_buffer("bias", torch.randn(16))

        def forward(self, ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            rows = self.table(ids)                  # reads 5 rows of the 1000, not the table
            product = torch.mm(a, b)                # reads a and b, writes the product
            return (rows + self.bias).t(), product  # bias broadcast: read once; t() is a view

    ids = torch.tensor([1, 2, 3, 4, 5])
    a, b = torch.randn(7, 9), torch.randn(9, 11)
    prof = optimize.profile.count(Mixed(), (ids, a, b))
    by_op = {op.op: op for op in prof.ops}
    assert by_op["aten.embedding"].bytes == 5 * 8 + 2 * 5 * 16 * 4
    assert by_op["aten.mm"].bytes == (7 * 9 + 9 * 11 + 7 * 11) * 4
    assert by_op["aten.mm"].flops == 2 * 7 * 9 * 11
    assert by_op["aten.add"].bytes == (5 * 16 + 16 + 5 * 16) * 4
    assert by_op["aten.t"].bytes == 0
    assert by_op["aten.mm"].intensity == pytest.approx(2 * 7 * 9 * 11 / by_op["aten.mm"].bytes)


def test_convolution_counts_macs_of_every_output():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, groups=1)
    grouped = torch.nn.Conv2d(8, 8, kernel_size=3, groups=4, bias=False)
    prof = optimize.profile.count(torch.nn.Sequential(conv, grouped), (torch.randn(2, 3, 10, 10),))
    first, second = [op for op in prof.ops if op.kind == "conv"]
    assert first.flops == 2 * (2 * 8 * 8 * 8) * (3 * 3 * 3) and first.vector_flops == 2 * 8 * 8 * 8
    assert second.flops == 2 * (2 * 8 * 6 * 6) * (2 * 3 * 3) and second.vector_flops == 0


def test_torch_compiled_module_is_counted_once_on_its_original():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    prof = optimize.profile.count(torch.compile(model), (torch.randn(4, 8),))
    assert prof.totals.flops == 2 * 4 * 8 * 8  # neither 0 (Inductor kernels) nor doubled
    assert any("torch.compile" in note for note in prof.notes)
