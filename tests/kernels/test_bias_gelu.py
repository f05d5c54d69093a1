"""kernels/bias_gelu.py: Triton bias + GELU (erf and tanh) against a float64 reference."""

from __future__ import annotations

import pytest
import torch

import kiln_kernels
from kiln_kernels.bias_gelu import bias_gelu_cost, bias_gelu_reference, bias_gelu_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = {
    torch.float32: [(1,), (7, 33), (3, 5, 129), (2, 1000)],
    torch.float16: [(1,), (7, 33), (3, 129)],
    torch.bfloat16: [(1,), (7, 33), (3, 129)],
}
CASES = [(dt, s, a) for dt in DTYPES for s in SHAPES[dt] for a in ("none", "tanh")]


def _d(t):
    return t.double().cpu() if t is not None else None


@pytest.mark.parametrize("dtype,shape,approximate", CASES)
def test_bias_gelu_matches_float64_reference(device, dtype, shape, approximate, poisoned, assert_close):
    x = (torch.randn(shape) * 3).to(dtype).to(device)
    bias = torch.randn(shape[-1]).to(dtype).to(device)
    out = poisoned(shape, dtype, device)
    assert bias_gelu_triton(x, bias, approximate, out=out) is out
    assert_close(out, bias_gelu_reference(_d(x), _d(bias), approximate), dtype)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_large_magnitudes_saturate_without_overflow(device, approximate, assert_close):
    # tanh form: exp(-2u) would overflow fp32 for u < -44 without the clamp
    x = torch.tensor([-1e4, -100.0, -20.0, -5.0, 0.0, 5.0, 20.0, 100.0, 1e4], device=device)
    y = bias_gelu_triton(x, None, approximate)
    assert_close(y, bias_gelu_reference(_d(x), None, approximate))


def test_without_bias_and_strided_input(device, assert_close):
    x = torch.randn(40, 9, device=device).t()  # [9, 40], not contiguous
    assert_close(bias_gelu_triton(x), bias_gelu_reference(_d(x)))


def test_unknown_approximation_raises():
    with pytest.raises(ValueError, match="approximate"):
        bias_gelu_triton(torch.randn(3), None, "sigmoid")


def test_custom_op_matches_torch_gelu(op_device, assert_close):
    x, b = torch.randn(4, 17, device=op_device), torch.randn(17, device=op_device)
    for approximate in ("none", "tanh"):
        expected = torch.nn.functional.gelu(x + b, approximate=approximate)
        y = torch.ops.kiln.bias_gelu(x, b, approximate)
        assert y.device.type == op_device
        assert_close(y, expected)


def test_opcheck_schema_fake_and_dispatch(op_device):
    x, b = torch.randn(3, 4, 17, device=op_device), torch.randn(17, device=op_device)
    torch.library.opcheck(torch.ops.kiln.bias_gelu.default, (x, b, "tanh"))
    torch.library.opcheck(torch.ops.kiln.bias_gelu.default, (x, None, "none"))


class _FFN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 16, bias=False)
        self.b = torch.nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.kiln.bias_gelu(self.up(x), self.b, "tanh")


def test_export_traces_through_the_op(assert_close):
    x = torch.randn(2, 5, 8)
    m = _FFN()
    ep = torch.export.export(m, (x,))
    assert "kiln.bias_gelu.default" in {str(n.target) for n in ep.graph.nodes}
    assert_close(ep.module()(x), m(x))


def test_cost_model_counts_flops_and_bytes_by_hand():
    c = bias_gelu_cost(128 * 3072, 3072, torch.float16)
    assert c.flops == 128 * 3072 * 6
    assert c.bytes == 128 * 3072 * 2 * 2 + 3072 * 2
    x = torch.empty(128, 3072, dtype=torch.bfloat16, device="meta")
    c = kiln_kernels.op_cost("bias_gelu", x, None, "tanh")
    assert (c.flops, c.bytes) == (128 * 3072 * 9, 128 * 3072 * 2 * 2)


def test_in_place_bias_gelu(device, assert_close):
    x, b = torch.randn(6, 77, device=device), torch.randn(77, device=device)
    ref = bias_gelu_reference(_d(x), _d(b))
    assert bias_gelu_triton(x, b, out=x) is x
    assert_close(x, ref)
