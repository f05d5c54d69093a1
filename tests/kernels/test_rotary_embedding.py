"""kernels/rotary_embedding.py: Triton rotary embedding (GPT-NeoX and GPT-J) against references."""

from __future__ import annotations

import pytest
import torch

import kiln_kernels
from kiln_kernels.rotary_embedding import (
    rotary_cos_sin,
    rotary_embedding_cost,
    rotary_embedding_reference,
    rotary_embedding_triton,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _d(t):
    return t.double().cpu()


def _hf_neox(x, cos, sin, pos):
    """Hugging Face Llama's formulation: x * cos + rotate_half(x) * sin, full-width angles."""
    c = torch.cat((cos, cos), dim=-1)[pos].unsqueeze(-2)
    s = torch.cat((sin, sin), dim=-1)[pos].unsqueeze(-2)
    rd = c.shape[-1]
    xr = x[..., :rd]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
    return torch.cat((xr * c + torch.cat((-x2, x1), dim=-1) * s, x[..., rd:]), dim=-1)


def _hf_gptj(x, cos, sin, pos):
    """Hugging Face GPT-J's formulation: rotate_every_two with interleaved angles."""
    c = cos.repeat_interleave(2, dim=-1)[pos].unsqueeze(-2)
    s = sin.repeat_interleave(2, dim=-1)[pos].unsqueeze(-2)
    rd = c.shape[-1]
    xr = x[..., :rd]
    rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat((xr * c + rot * s, x[..., rd:]), dim=-1)


# (leading token dims, Hq, Hk, head_dim, rotary_dim): GQA, odd head counts, partial rotary
SHAPES = [
    ((1,), 1, 1, 32, 32),
    ((2, 7), 3, 1, 64, 64),
    ((9,), 4, 2, 64, 16),  # partial rotary (Pythia-style 25%)
    ((3, 5), 2, 2, 80, 64),  # head dim not a power of two, 16 channels pass through
]


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("lead,hq,hk,d,rd", SHAPES)
def test_rotary_fp32_matches_float64_reference(device, lead, hq, hk, d, rd, interleaved, poisoned, assert_close):
    q = torch.randn(*lead, hq, d, device=device)
    k = torch.randn(*lead, hk, d, device=device)
    cos, sin = rotary_cos_sin(64, rd, device=device)
    pos = torch.randint(0, 64, lead, device=device)
    q_out, k_out = poisoned(q.shape, q.dtype, device), poisoned(k.shape, k.dtype, device)
    rotary_embedding_triton(q, k, cos, sin, pos, interleaved, q_out=q_out, k_out=k_out)
    q_ref, k_ref = rotary_embedding_reference(_d(q), _d(k), _d(cos), _d(sin), pos.cpu(), interleaved)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_rotary_half_types(device, dtype, interleaved, poisoned, assert_close):
    q = torch.randn(5, 3, 32).to(dtype).to(device)
    k = torch.randn(5, 1, 32).to(dtype).to(device)
    cos, sin = rotary_cos_sin(16, 32, device=device)
    pos = torch.tensor([0, 15, 3, 3, 7], device=device)
    q_out, k_out = poisoned(q.shape, dtype, device), poisoned(k.shape, dtype, device)
    rotary_embedding_triton(q, k, cos, sin, pos, interleaved, q_out=q_out, k_out=k_out)
    q_ref, k_ref = rotary_embedding_reference(_d(q), _d(k), _d(cos), _d(sin), pos.cpu(), interleaved)
    assert_close(q_out, q_ref, dtype)
    assert_close(k_out, k_ref, dtype)


def test_reference_equals_hugging_face_formulations(assert_close):
    q, k = torch.randn(2, 6, 4, 64, dtype=torch.float64), torch.randn(2, 6, 2, 64, dtype=torch.float64)
    cos, sin = rotary_cos_sin(32, 32, dtype=torch.float64)
    pos = torch.randint(0, 32, (2, 6))
    for interleaved, hf in ((False, _hf_neox), (True, _hf_gptj)):
        q_ref, k_ref = rotary_embedding_reference(q, k, cos, sin, pos, interleaved)
        assert_close(q_ref, hf(q, cos, sin, pos), torch.float32)
        assert_close(k_ref, hf(k, cos, sin, pos), torch.float32)


def test_q_and_k_sliced_from_a_fused_qkv_projection(device, assert_close):
    qkv = torch.randn(7, 3, 4, 32, device=device)  # [T, (q|k|v), H, D]: strided q and k
    q, k = qkv[:, 0], qkv[:, 1]
    cos, sin = rotary_cos_sin(8, 32, device=device)
    pos = torch.arange(7, device=device, dtype=torch.int32)
    q_out, k_out = rotary_embedding_triton(q, k, cos, sin, pos)
    q_ref, k_ref = rotary_embedding_reference(_d(q), _d(k), _d(cos), _d(sin), pos.cpu())
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)


def test_in_place_rotation(device, assert_close):
    q, k = torch.randn(4, 2, 32, device=device), torch.randn(4, 2, 32, device=device)
    cos, sin = rotary_cos_sin(8, 32, device=device)
    pos = torch.arange(4, device=device)
    q_ref, k_ref = rotary_embedding_reference(_d(q), _d(k), _d(cos), _d(sin), pos.cpu())
    rotary_embedding_triton(q, k, cos, sin, pos, q_out=q, k_out=k)
    assert_close(q, q_ref)
    assert_close(k, k_ref)


def test_position_zero_is_identity(device, assert_close):
    q, k = torch.randn(3, 2, 32, device=device), torch.randn(3, 1, 32, device=device)
    cos, sin = rotary_cos_sin(4, 32, device=device)
    q_out, k_out = rotary_embedding_triton(q, k, cos, sin, torch.zeros(3, dtype=torch.long, device=device))
    assert_close(q_out, q, atol=0, rtol=0)
    assert_close(k_out, k, atol=0, rtol=0)


def test_bad_shapes_raise():
    q, k = torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    cos, sin = rotary_cos_sin(4, 32)
    with pytest.raises(ValueError, match="positions"):
        rotary_embedding_triton(q, k, cos, sin, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="rotary_dim"):
        big_cos, big_sin = rotary_cos_sin(4, 64)
        rotary_embedding_triton(q, k, big_cos, big_sin, torch.zeros(3, dtype=torch.long))


def test_custom_op_matches_reference(op_device, assert_close):
    q, k = torch.randn(2, 5, 4, 32, device=op_device), torch.randn(2, 5, 2, 32, device=op_device)
    cos, sin = rotary_cos_sin(16, 32, device=op_device)
    pos = torch.randint(0, 16, (2, 5), device=op_device)
    for interleaved in (False, True):
        got = torch.ops.kiln.rotary_embedding(q, k, cos, sin, pos, interleaved)
        assert got[0].device.type == op_device
        ref = rotary_embedding_reference(_d(q), _d(k), _d(cos), _d(sin), pos.cpu(), interleaved)
        assert_close(got[0], ref[0])
        assert_close(got[1], ref[1])


def test_opcheck_schema_fake_and_dispatch(op_device):
    q, k = torch.randn(2, 5, 4, 32, device=op_device), torch.randn(2, 5, 2, 32, device=op_device)
    cos, sin = rotary_cos_sin(16, 16, device=op_device)  # partial rotary
    pos = torch.randint(0, 16, (2, 5), device=op_device)
    torch.library.opcheck(torch.ops.kiln.rotary_embedding.default, (q, k, cos, sin, pos, True))


class _Rope(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        cos, sin = rotary_cos_sin(16, 32)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, q, k, pos):
        q, k = torch.ops.kiln.rotary_embedding(q, k, self.cos, self.sin, pos, False)
        return q.sum(-2) + k.sum(-2)


def test_export_traces_through_the_op(assert_close):
    args = (torch.randn(2, 5, 4, 32), torch.randn(2, 5, 2, 32), torch.randint(0, 16, (2, 5)))
    ep = torch.export.export(_Rope(), args)
    assert "kiln.rotary_embedding.default" in {str(n.target) for n in ep.graph.nodes}
    assert_close(ep.module()(*args), _Rope()(*args))


def test_cost_model_counts_flops_and_bytes_by_hand():
    # Llama-7B-like: 512 tokens, 32 q heads, 32 k heads, D = rotary_dim = 128, bf16
    c = rotary_embedding_cost(512, 32, 32, 128, 128, torch.bfloat16)
    assert c.flops == 3 * 512 * 64 * 128
    assert c.bytes == 2 * 512 * 64 * 128 * 2 + 512 * 128 * 4 + 512 * 8
    q = torch.empty(512, 32, 128, dtype=torch.bfloat16, device="meta")
    cos = torch.empty(4096, 64, device="meta")
    pos = torch.empty(512, dtype=torch.int64, device="meta")
    assert kiln_kernels.op_cost("rotary_embedding", q, q, cos, cos, pos) == c
