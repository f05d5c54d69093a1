"""kernels/softmax.py: Triton masked softmax against a float64 reference."""

from __future__ import annotations

import pytest
import torch

import kiln_kernels
from kiln_kernels.softmax import softmax_cost, softmax_reference, softmax_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = {
    torch.float32: [(1, 1), (7, 33), (2, 3, 129), (3, 1000)],
    torch.float16: [(1, 1), (7, 33), (2, 129)],
    torch.bfloat16: [(1, 1), (7, 33), (2, 129)],
}
CASES = [(dt, s) for dt in DTYPES for s in SHAPES[dt]]


def _d(t):
    return t.double().cpu() if t is not None else None


@pytest.mark.parametrize("dtype,shape", CASES)
def test_softmax_matches_float64_reference(device, dtype, shape, poisoned, assert_close):
    x = (torch.randn(shape) * 4).to(dtype).to(device)
    out = poisoned(shape, dtype, device)
    assert softmax_triton(x, out=out) is out
    assert_close(out, softmax_reference(_d(x)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bert_broadcast_mask_is_read_through_strides(device, dtype, poisoned, assert_close):
    # scores [B, H, S, S] + extended attention mask [B, 1, 1, S] with padded keys
    b, h, s = 2, 3, 7
    x = torch.randn(b, h, s, s).to(dtype).to(device)
    mask = torch.zeros(b, 1, 1, s)
    mask[0, ..., 5:] = torch.finfo(torch.float32).min  # HF's large negative value
    mask[1, ..., 2:] = float("-inf")
    mask = mask.to(dtype).to(device)
    out = poisoned(x.shape, dtype, device)
    softmax_triton(x, mask, out=out)
    assert_close(out, softmax_reference(_d(x), _d(mask)), dtype)
    assert (out[1, ..., 2:] == 0).all()


def test_full_and_1d_masks(device, assert_close):
    x = torch.randn(5, 9, 33, device=device)
    full = torch.randn(5, 9, 33, device=device)
    assert_close(softmax_triton(x, full), softmax_reference(_d(x), _d(full)))
    row = torch.randn(33, device=device)
    assert_close(softmax_triton(x, row), softmax_reference(_d(x), _d(row)))


def test_fully_masked_rows_give_zeros_not_nan(device, poisoned, assert_close):
    x = torch.randn(4, 19, device=device)
    mask = torch.zeros(4, 19, device=device)
    mask[1] = float("-inf")
    mask[3, :18] = float("-inf")  # one survivor: probability 1
    for block_n in (None, 8):  # single-tile and looped paths
        out = poisoned((4, 19), torch.float32, device)
        softmax_triton(x, mask, out=out, block_n=block_n)
        assert (out[1] == 0).all()
        assert out[3, 18] == 1
        assert_close(out, softmax_reference(_d(x), _d(mask)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_wider_than_one_tile_take_two_pass_path(device, dtype, poisoned, assert_close):
    x = (torch.randn(3, 1000) * 8).to(dtype).to(device)
    mask = torch.randn(1, 1000).to(dtype).to(device)
    out = poisoned((3, 1000), dtype, device)
    softmax_triton(x, mask, out=out, block_n=128)
    assert_close(out, softmax_reference(_d(x), _d(mask)), dtype)


def test_8k_wide_rows(device, poisoned, assert_close):
    x = (torch.randn(2, 8193) * 4).to(device)
    out = poisoned((2, 8193), torch.float32, device)
    softmax_triton(x, out=out)
    assert_close(out, softmax_reference(_d(x)))


def test_five_dim_input_with_broadcast_mask(device, assert_close):
    x = torch.randn(2, 2, 3, 5, 7, device=device)
    mask = torch.randn(2, 1, 3, 1, 7, device=device)
    assert_close(softmax_triton(x, mask), softmax_reference(_d(x), _d(mask)))


def test_mask_that_does_not_broadcast_raises():
    with pytest.raises(ValueError, match="broadcast"):
        softmax_triton(torch.randn(2, 8), torch.zeros(3, 8))


def test_custom_op_matches_reference_and_torch(op_device, assert_close):
    x, mask = torch.randn(2, 3, 5, 5, device=op_device), torch.randn(2, 1, 1, 5, device=op_device)
    y = torch.ops.kiln.softmax(x, mask)
    assert y.device.type == op_device
    assert_close(y, softmax_reference(_d(x), _d(mask)))
    assert_close(torch.ops.kiln.softmax(x, None), torch.softmax(x, dim=-1))


def test_opcheck_schema_fake_and_dispatch(op_device):
    x, mask = torch.randn(2, 3, 5, 7, device=op_device), torch.randn(2, 1, 1, 7, device=op_device)
    torch.library.opcheck(torch.ops.kiln.softmax.default, (x, mask))
    torch.library.opcheck(torch.ops.kiln.softmax.default, (x, None))


class _Scores(torch.nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.ops.kiln.softmax(x * 0.5, mask)


def test_export_traces_through_the_op(assert_close):
    x, mask = torch.randn(2, 3, 5, 5), torch.randn(2, 1, 1, 5)
    ep = torch.export.export(_Scores(), (x, mask))
    assert "kiln.softmax.default" in {str(n.target) for n in ep.graph.nodes}
    assert_close(ep.module()(x, mask), _Scores()(x, mask))


def test_cost_model_counts_flops_and_bytes_by_hand():
    # scores [8, 12, 384, 384] fp16 with a [8, 1, 1, 384] fp16 mask
    rows = 8 * 12 * 384
    c = softmax_cost(rows, 384, torch.float16, mask_numel=8 * 384)
    assert c.flops == rows * 384 * 6
    assert c.bytes == rows * 384 * 2 * 2 + 8 * 384 * 2
    x = torch.empty(8, 12, 384, 384, dtype=torch.float16, device="meta")
    m = torch.empty(8, 1, 1, 384, dtype=torch.float16, device="meta")
    assert kiln_kernels.op_cost("softmax", x, m) == c


def test_in_place_softmax(device, assert_close):
    x = torch.randn(6, 77, device=device)
    ref = softmax_reference(_d(x))
    assert softmax_triton(x, out=x) is x
    assert_close(x, ref)
