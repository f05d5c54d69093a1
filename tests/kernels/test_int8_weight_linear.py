"""kernels/int8_weight_linear.py: Triton int8-weight linear against a float64 reference."""

from __future__ import annotations

import pytest
import torch

import kiln_kernels
from kiln_kernels.int8_weight_linear import (
    int8_weight_linear_cost,
    int8_weight_linear_reference,
    int8_weight_linear_triton,
    quantize_int8_per_channel,
)

# Tolerances: an fp32-accumulated dot of K terms against float64; errors grow like sqrt(K)
# times the input rounding, and outputs are O(sqrt(K)) here, so relative bounds suffice.
TOL = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (5e-2, 1.6e-2),
}


def _inputs(lead, n, k, dtype, device, bias=True):
    x = torch.randn(*lead, k).to(dtype).to(device)
    w_int8, scale = quantize_int8_per_channel(torch.randn(n, k) / k**0.5)
    b = torch.randn(n).to(dtype).to(device) if bias else None
    return x, w_int8.to(device), scale.to(device), b


def _d(t):
    return t.double().cpu() if t is not None else None


def _ref(x, w, s, b, activation):
    return int8_weight_linear_reference(_d(x), w.cpu(), _d(s), _d(b), activation)


# (leading dims of x, N, K): batch 1 (decode), odd sizes that cross every tile edge
SHAPES = [((1,), 17, 33), ((7,), 40, 100), ((2, 9), 65, 48)]


@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("lead,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_linear_matches_float64_reference(device, dtype, lead, n, k, activation, poisoned, assert_close):
    x, w, s, b = _inputs(lead, n, k, dtype, device)
    out = poisoned((*lead, n), dtype, device)
    assert int8_weight_linear_triton(x, w, s, b, activation, out=out) is out
    atol, rtol = TOL[dtype]
    assert_close(out, _ref(x, w, s, b, activation), atol=atol, rtol=rtol)


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_partial_sums_add_up(device, split_k, poisoned, assert_close):
    # K = 100 is 4 blocks of 32: split 3 leaves an uneven share, the last split a short one
    x, w, s, b = _inputs((5,), 40, 100, torch.float32, device)
    out = poisoned((5, 40), torch.float32, device)
    int8_weight_linear_triton(x, w, s, b, "gelu", out=out, split_k=split_k)
    assert_close(out, _ref(x, w, s, b, "gelu"), atol=1e-4, rtol=1e-5)


def test_more_splits_than_k_blocks_leave_empty_splits_harmless(device, assert_close):
    x, w, s, _ = _inputs((3,), 20, 40, torch.float32, device, bias=False)
    got = int8_weight_linear_triton(x, w, s, None, split_k=4)  # 2 K blocks, 4 splits
    assert_close(got, _ref(x, w, s, None, "none"), atol=1e-4, rtol=1e-5)


def test_strided_activation_and_weight(device, assert_close):
    x = torch.randn(33, 6, device=device).t()  # [6, 33] column-major
    w_int8, scale = quantize_int8_per_channel(torch.randn(24, 33))
    w = w_int8.to(device).t().contiguous().t()  # [24, 33] stored column-major
    assert w.stride() == (1, 24)
    got = int8_weight_linear_triton(x, w, scale.to(device), None)
    assert_close(got, _ref(x, w, scale, None, "none"), atol=1e-4, rtol=1e-5)


def test_quantization_round_trips_within_half_a_step():
    w = torch.randn(16, 64)
    w_int8, scale = quantize_int8_per_channel(w)
    assert w_int8.dtype == torch.int8 and w_int8.abs().max() <= 127
    assert ((w_int8.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    zero_q, zero_s = quantize_int8_per_channel(torch.zeros(2, 8))
    assert (zero_q == 0).all() and (zero_s == 1).all()


def test_bad_arguments_raise():
    x, w, s, b = _inputs((2,), 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="activation"):
        int8_weight_linear_triton(x, w, s, b, "relu")
    with pytest.raises(TypeError, match="int8"):
        int8_weight_linear_triton(x, w.float(), s, b)
    with pytest.raises(ValueError, match="K"):
        int8_weight_linear_triton(x[:, :15], w, s, b)
    square_w, square_s = quantize_int8_per_channel(torch.randn(16, 16))
    with pytest.raises(ValueError, match="share memory"):
        int8_weight_linear_triton(x, square_w, square_s, None, out=x)


def test_custom_op_matches_dequantized_nn_linear(op_device, assert_close):
    lin = torch.nn.Linear(24, 10)
    w_int8, scale = quantize_int8_per_channel(lin.weight)
    x = torch.randn(3, 24)
    expected = torch.nn.functional.gelu(x @ (w_int8.float() * scale[:, None]).t() + lin.bias)
    got = torch.ops.kiln.int8_weight_linear(
        x.to(op_device), w_int8.to(op_device), scale.to(op_device), lin.bias.detach().to(op_device), "gelu"
    )
    assert got.device.type == op_device
    assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_opcheck_schema_fake_and_dispatch(op_device):
    x, w, s, b = _inputs((2, 3), 20, 24, torch.float32, op_device)
    torch.library.opcheck(torch.ops.kiln.int8_weight_linear.default, (x, w, s, b, "gelu_tanh"))
    torch.library.opcheck(torch.ops.kiln.int8_weight_linear.default, (x, w, s, None, "none"))


class _QLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        w_int8, scale = quantize_int8_per_channel(torch.randn(12, 16))
        self.register_buffer("w", w_int8)
        self.register_buffer("s", scale)
        self.b = torch.nn.Parameter(torch.randn(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.kiln.int8_weight_linear(x, self.w, self.s, self.b, "gelu_tanh")


def test_export_traces_through_the_op(assert_close):
    x = torch.randn(2, 5, 16)
    ep = torch.export.export(_QLinear(), (x,))
    assert "kiln.int8_weight_linear.default" in {str(n.target) for n in ep.graph.nodes}
    m = _QLinear()
    m.load_state_dict(ep.module().state_dict())
    assert_close(ep.module()(x), m(x))


def test_cost_model_counts_flops_and_bytes_by_hand():
    # decode step, batch 4, 4096 -> 11008 (Llama-7B MLP up), fp16, fp32 scales, fp16 bias, GELU
    c = int8_weight_linear_cost(4, 11008, 4096, torch.float16, activation="gelu")
    assert c.flops == 2 * 4 * 11008 * 4096 + 4 * 11008 * (1 + 1 + 5)
    assert c.bytes == 4 * 4096 * 2 + 11008 * 4096 + 11008 * 4 + 11008 * 2 + 4 * 11008 * 2
    x = torch.empty(4, 4096, dtype=torch.float16, device="meta")
    w = torch.empty(11008, 4096, dtype=torch.int8, device="meta")
    s = torch.empty(11008, dtype=torch.float32, device="meta")
    b = torch.empty(11008, dtype=torch.float16, device="meta")
    assert kiln_kernels.op_cost("int8_weight_linear", x, w, s, b, "gelu") == c
