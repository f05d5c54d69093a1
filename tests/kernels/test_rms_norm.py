"""kernels/rms_norm.py: Triton RMSNorm (+ fused residual add) against a float64 reference."""

from __future__ import annotations

import pytest
import torch

import kiln_kernels
from kiln_kernels.rms_norm import rms_norm_cost, rms_norm_reference, rms_norm_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = {
    torch.float32: [(1, 1), (7, 33), (3, 5, 129), (2, 1000)],
    torch.float16: [(1, 1), (7, 33), (3, 129)],
    torch.bfloat16: [(1, 1), (7, 33), (3, 129)],
}
CASES = [(dt, s) for dt in DTYPES for s in SHAPES[dt]]


def _inputs(shape, dtype, device, residual=False):
    n = shape[-1]
    x = (torch.randn(shape) * 3 + 1).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(n)).to(dtype).to(device)
    r = torch.randn(shape).to(dtype).to(device) if residual else None
    return x, w, r


def _d(t):
    return t.double().cpu() if t is not None else None


@pytest.mark.parametrize("dtype,shape", CASES)
def test_rms_norm_matches_float64_reference(device, dtype, shape, poisoned, assert_close):
    x, w, _ = _inputs(shape, dtype, device)
    out = poisoned(shape, dtype, device)
    y = rms_norm_triton(x, w, 1e-6, out=out)
    assert y is out
    assert_close(y, rms_norm_reference(_d(x), _d(w), 1e-6), dtype)


@pytest.mark.parametrize("dtype,shape", CASES)
def test_fused_residual_returns_normalized_sum_and_sum(device, dtype, shape, poisoned, assert_close):
    x, w, r = _inputs(shape, dtype, device, residual=True)
    out, res_out = poisoned(shape, dtype, device), poisoned(shape, dtype, device)
    y, h = rms_norm_triton(x, w, 1e-6, r, out=out, residual_out=res_out)
    y_ref, h_ref = rms_norm_reference(_d(x), _d(w), 1e-6, _d(r))
    assert_close(h, h_ref, dtype)
    assert_close(y, y_ref, dtype)


@pytest.mark.parametrize("residual", [False, True])
def test_rows_wider_than_one_tile_take_looped_path(device, residual, poisoned, assert_close):
    x, w, r = _inputs((5, 1000), torch.float32, device, residual)
    out, res_out = poisoned((5, 1000), torch.float32, device), poisoned((5, 1000), torch.float32, device)
    got = rms_norm_triton(x, w, 1e-6, r, out=out, residual_out=res_out, block_n=64)
    ref = rms_norm_reference(_d(x), _d(w), 1e-6, _d(r))
    if residual:
        assert_close(got[0], ref[0])
        assert_close(got[1], ref[1])
    else:
        assert_close(got, ref)


def test_zero_rows_stay_zero_not_nan(device, assert_close):
    # mean square 0: rstd = 1/sqrt(eps) is finite and multiplies zeros.
    x = torch.zeros(3, 17, device=device)
    x[1] = torch.randn(17)
    w = torch.randn(17, device=device)
    assert_close(rms_norm_triton(x, w, 1e-6), rms_norm_reference(_d(x), _d(w), 1e-6))


def test_custom_ops_match_reference(op_device, assert_close):
    x, w, r = _inputs((4, 24), torch.float32, op_device, residual=True)
    y = torch.ops.kiln.rms_norm(x, w, 1e-6)
    assert y.device.type == op_device
    assert_close(y, rms_norm_reference(_d(x), _d(w), 1e-6))
    y, h = torch.ops.kiln.add_rms_norm(x, r, w, 1e-6)
    y_ref, h_ref = rms_norm_reference(_d(x), _d(w), 1e-6, _d(r))
    assert_close(y, y_ref)
    assert_close(h, h_ref)


def test_opcheck_schema_fake_and_dispatch(op_device):
    x, w, r = _inputs((3, 2, 40), torch.float32, op_device, residual=True)
    torch.library.opcheck(torch.ops.kiln.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.kiln.add_rms_norm.default, (x, r, w, 1e-6))


class _Block(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        y, h = torch.ops.kiln.add_rms_norm(x, r, self.w, 1e-6)
        return torch.ops.kiln.rms_norm(y * h, self.w, 1e-6)


def test_export_traces_through_the_ops(assert_close):
    m = _Block(16)
    x, r = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    ep = torch.export.export(m, (x, r))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"kiln.add_rms_norm.default", "kiln.rms_norm.default"} <= targets
    assert_close(ep.module()(x, r), m(x, r))


def test_cost_model_counts_flops_and_bytes_by_hand():
    c = rms_norm_cost(16, 4096, torch.bfloat16)
    assert c.flops == 16 * 4096 * 4
    assert c.bytes == 16 * 4096 * 2 * 2 + 4096 * 2
    c = kiln_kernels.COST_MODELS["add_rms_norm"](16, 4096, torch.bfloat16)
    assert (c.flops, c.bytes) == (16 * 4096 * 5, 16 * 4096 * 2 * 4 + 4096 * 2)


def test_in_place_call_normalizes_once(device, assert_close):
    x, w, r = _inputs((5, 65), torch.float32, device, residual=True)
    y_ref, h_ref = rms_norm_reference(_d(x), _d(w), 1e-6, _d(r))
    rms_norm_triton(x, w, 1e-6, r, out=x, residual_out=r)
    assert_close(x, y_ref)
    assert_close(r, h_ref)
