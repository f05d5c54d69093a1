"""kernels/layer_norm.py: Triton LayerNorm (+ fused residual add) against a float64 reference."""

from __future__ import annotations

import pytest
import torch

import kiln_kernels
from kiln_kernels.layer_norm import layer_norm_cost, layer_norm_reference, layer_norm_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp16/bf16 run slowly in the interpreter (numpy emulation), so they get the smaller shapes.
SHAPES = {
    torch.float32: [(1, 1), (7, 33), (3, 5, 129), (2, 1000)],
    torch.float16: [(1, 1), (7, 33), (3, 129)],
    torch.bfloat16: [(1, 1), (7, 33), (3, 129)],
}
CASES = [(dt, s) for dt in DTYPES for s in SHAPES[dt]]


def _inputs(shape, dtype, device, residual=False):
    n = shape[-1]
    # A nonzero mean and scale make the centring matter; weight near 1 keeps outputs O(1).
    x = (torch.randn(shape) * 3 + 2).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(n)).to(dtype).to(device)
    b = torch.randn(n).to(dtype).to(device)
    r = torch.randn(shape).to(dtype).to(device) if residual else None
    return x, w, b, r


def _double(*ts):
    return [t.double().cpu() if t is not None else None for t in ts]


@pytest.mark.parametrize("dtype,shape", CASES)
def test_layer_norm_matches_float64_reference(device, dtype, shape, poisoned, assert_close):
    x, w, b, _ = _inputs(shape, dtype, device)
    out = poisoned(shape, dtype, device)
    y = layer_norm_triton(x, w, b, 1e-5, out=out)
    assert y is out
    assert_close(y, layer_norm_reference(*_double(x, w, b), 1e-5), dtype)


@pytest.mark.parametrize("dtype,shape", CASES)
def test_fused_residual_returns_normalized_sum_and_sum(device, dtype, shape, poisoned, assert_close):
    x, w, b, r = _inputs(shape, dtype, device, residual=True)
    out, res_out = poisoned(shape, dtype, device), poisoned(shape, dtype, device)
    y, h = layer_norm_triton(x, w, b, 1e-5, r, out=out, residual_out=res_out)
    y_ref, h_ref = layer_norm_reference(*_double(x, w, b), 1e-5, r.double().cpu())
    assert_close(h, h_ref, dtype)
    assert_close(y, y_ref, dtype)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("n", [129, 1000])
def test_rows_wider_than_one_tile_take_looped_path(device, n, residual, poisoned, assert_close):
    # block_n=64 forces the three-pass wide-row path that GPUs use beyond 64 KB rows.
    x, w, b, r = _inputs((5, n), torch.float32, device, residual)
    out, res_out = poisoned((5, n), torch.float32, device), poisoned((5, n), torch.float32, device)
    got = layer_norm_triton(x, w, b, 1e-5, r, out=out, residual_out=res_out, block_n=64)
    ref = layer_norm_reference(*_double(x, w, b), 1e-5, r.double().cpu() if residual else None)
    if residual:
        assert_close(got[0], ref[0])
        assert_close(got[1], ref[1])
    else:
        assert_close(got, ref)


def test_without_bias_and_with_fp32_weight_for_fp16_input(device, assert_close):
    x, _, _, _ = _inputs((6, 40), torch.float16, device)
    w = (1 + 0.1 * torch.randn(40)).to(device)
    y = layer_norm_triton(x, w, None, 1e-5)
    assert_close(y, layer_norm_reference(*_double(x, w), None, 1e-5), torch.float16)


def test_minilm_eps_constant_rows_give_bias_in_fp16(device, assert_close):
    # eps=1e-12 underflows in fp16; statistics in fp32 keep it, and a constant row
    # (variance 0) must come out as exactly the bias, not NaN or inf.
    x = torch.full((3, 48), 1.5, dtype=torch.float16, device=device)
    w = torch.randn(48, dtype=torch.float16, device=device)
    b = torch.randn(48, dtype=torch.float16, device=device)
    y = layer_norm_triton(x, w, b, 1e-12)
    assert_close(y, b.expand(3, 48), atol=0, rtol=0)


def test_strided_input_is_normalized_along_its_last_dim(device, assert_close):
    base = torch.randn(33, 7, device=device)
    x = base.t()  # [7, 33], column stride 7
    w, b = torch.randn(33, device=device), torch.randn(33, device=device)
    assert_close(layer_norm_triton(x, w, b, 1e-5), layer_norm_reference(*_double(x, w, b), 1e-5))


def test_empty_input_returns_empty(device):
    x = torch.empty(0, 16, device=device)
    assert layer_norm_triton(x, torch.ones(16, device=device), None).shape == (0, 16)


def test_mismatched_weight_raises():
    with pytest.raises(ValueError, match="weight"):
        layer_norm_triton(torch.randn(2, 8), torch.ones(7))


def test_custom_ops_match_reference_and_eager(op_device, assert_close):
    x, w, b, r = _inputs((4, 24), torch.float32, op_device, residual=True)
    y = torch.ops.kiln.layer_norm(x, w, b, 1e-5)
    assert y.device.type == op_device
    assert_close(y, layer_norm_reference(*_double(x, w, b), 1e-5))
    y, h = torch.ops.kiln.add_layer_norm(x, r, w, b, 1e-5)
    y_ref, h_ref = layer_norm_reference(*_double(x, w, b), 1e-5, r.double().cpu())
    assert_close(y, y_ref)
    assert_close(h, h_ref)
    # the fused op equals the unfused eager pair
    assert_close(y, torch.nn.functional.layer_norm(x + r, (24,), w, b, 1e-5))


def test_opcheck_schema_fake_and_dispatch(op_device):
    x, w, b, r = _inputs((3, 2, 40), torch.float32, op_device, residual=True)
    torch.library.opcheck(torch.ops.kiln.layer_norm.default, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.kiln.layer_norm.default, (x, w, None, 1e-5))
    torch.library.opcheck(torch.ops.kiln.add_layer_norm.default, (x, r, w, b, 1e-5))


class _Block(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n))
        self.b = torch.nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        y, h = torch.ops.kiln.add_layer_norm(x, r, self.w, self.b, 1e-12)
        return torch.ops.kiln.layer_norm(y + h, self.w, None, 1e-5)


def test_export_traces_through_the_ops(assert_close):
    m = _Block(16)
    x, r = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    ep = torch.export.export(m, (x, r))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"kiln.add_layer_norm.default", "kiln.layer_norm.default"} <= targets
    assert_close(ep.module()(x, r), m(x, r))


def test_cost_model_counts_flops_and_bytes_by_hand():
    # 8 rows x 768 fp16, fp16 weight and bias: 7 flops per element; read x, write y, w, b.
    c = layer_norm_cost(8, 768, torch.float16)
    assert c.flops == 8 * 768 * 7
    assert c.bytes == 8 * 768 * 2 * 2 + 768 * 2 * 2
    c = kiln_kernels.COST_MODELS["add_layer_norm"](8, 768, torch.float16)
    assert c.flops == 8 * 768 * 8
    assert c.bytes == 8 * 768 * 2 * 4 + 768 * 2 * 2
    x = torch.empty(2, 4, 768, dtype=torch.float16, device="meta")
    w = torch.empty(768, dtype=torch.float32, device="meta")
    assert kiln_kernels.op_cost("layer_norm", x, w, None, 1e-5) == layer_norm_cost(
        8, 768, torch.float16, has_bias=False, weight_dtype=torch.float32
    )


def test_in_place_call_normalizes_once(device, assert_close):
    # out=x and residual_out=residual, as an in-place residual stream would call it
    x, w, b, r = _inputs((5, 65), torch.float32, device, residual=True)
    y_ref, h_ref = layer_norm_reference(*_double(x, w, b), 1e-5, r.double().cpu())
    y, h = layer_norm_triton(x, w, b, 1e-5, r, out=x, residual_out=r)
    assert y is x and h is r
    assert_close(y, y_ref)
    assert_close(h, h_ref)
