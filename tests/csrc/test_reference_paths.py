"""CPU dispatch of the `kiln_cuda::*` ops (the reference paths) against float64 math, and
their fake implementations under torch.export. The same checks on CUDA are marked gpu."""

import pytest
import torch



def random_mask(batch: int, seq: int, generator: torch.Generator, prefix: bool) -> torch.Tensor:
    if prefix:
        lengths = torch.randint(0, seq + 1, (batch,), generator=generator)
        return (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return (torch.rand(batch, seq, generator=generator) < 0.6).long()


def expected_packing(mask: torch.Tensor) -> tuple[list[int], list[int]]:
    index, cu = [], [0]
    batch, seq = mask.shape
    for b in range(batch):
        for s in range(seq):
            if mask[b, s]:
                index.append(b * seq + s)
        cu.append(len(index))
    return index, cu


def check_packing(mask: torch.Tensor, hidden: int, dtype: torch.dtype) -> None:
    token_index, cu_seqlens, max_len = torch.ops.kiln_cuda.pack_indices(mask)
    want_index, want_cu = expected_packing(mask.cpu())
    assert token_index.cpu().tolist() == want_index
    assert cu_seqlens.cpu().tolist() == want_cu
    assert int(max_len.item()) == int((mask != 0).sum(1).max().item() if mask.numel() else 0)
    x = torch.randn(*mask.shape, hidden, device=mask.device).to(dtype)
    packed = torch.ops.kiln_cuda.gather_rows(x, token_index)
    assert packed.shape == (len(want_index), hidden)
    restored = torch.ops.kiln_cuda.scatter_rows(packed, token_index, *mask.shape)
    expected = torch.where(mask[..., None] != 0, x, torch.zeros_like(x))
    assert torch.equal(restored, expected)


@pytest.mark.parametrize("batch, seq, prefix", [(1, 1, True), (7, 13, True), (5, 129, False), (3, 1000, False)])
def test_packing_round_trip_on_cpu(batch, seq, prefix):
    g = torch.Generator().manual_seed(batch * seq)
    check_packing(random_mask(batch, seq, g, prefix), hidden=24, dtype=torch.float32)


def softmax_float64(x, mask, scale):
    z = x.double() * scale
    if mask is not None:
        rows = mask.shape[0]
        z = (z.reshape(rows, -1, x.shape[-1]) + mask.double()[:, None, :]).reshape(x.shape)
    out = torch.softmax(z, dim=-1)
    return torch.nan_to_num(out, nan=0.0)  # fully masked rows are defined as zeros


@pytest.mark.parametrize("rows_per_mask, cols", [(1, 7), (6, 129), (4, 1000)])
def test_scale_mask_softmax_reference_matches_float64_with_fully_masked_rows(rows_per_mask, cols):
    g = torch.Generator().manual_seed(cols)
    x = torch.randn(3 * rows_per_mask, cols, generator=g) * 4
    mask = torch.where(torch.rand(3, cols, generator=g) < 0.3, float("-inf"), 0.0)
    mask[1] = float("-inf")
    out = torch.ops.kiln_cuda.scale_mask_softmax(x, mask, 0.125)
    torch.testing.assert_close(out.double(), softmax_float64(x, mask, 0.125), atol=1e-6, rtol=1e-5)
    assert (out[rows_per_mask:2 * rows_per_mask] == 0).all()


def layer_norm_float64(x, bias, residual, weight, ln_bias, eps):
    s = x.double() + bias.double() + residual.double()
    mean = s.mean(-1, keepdim=True)
    var = ((s - mean) ** 2).mean(-1, keepdim=True)
    return (s - mean) / torch.sqrt(var + eps) * weight.double() + ln_bias.double(), s


@pytest.mark.parametrize("rows, hidden", [(1, 8), (7, 256), (129, 384)])
def test_bias_residual_layer_norm_reference_matches_float64(rows, hidden):
    g = torch.Generator().manual_seed(rows + hidden)
    x, residual = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    bias, weight, ln_bias = (torch.randn(hidden, generator=g) for _ in range(3))
    y, s = torch.ops.kiln_cuda.bias_residual_layer_norm(x, bias, residual, weight, ln_bias, 1e-12)
    want_y, want_s = layer_norm_float64(x, bias, residual, weight, ln_bias, 1e-12)
    torch.testing.assert_close(y.double(), want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.double(), want_s, atol=1e-6, rtol=1e-6)


def test_ops_trace_through_torch_export():
    class Encoder(torch.nn.Module):
        def forward(self, x, mask):
            index, _, _ = torch.ops.kiln_cuda.pack_indices(mask)
            packed = torch.ops.kiln_cuda.gather_rows(x, index)
            w = torch.ones(x.shape[-1])
            y, _ = torch.ops.kiln_cuda.bias_residual_layer_norm(packed, None, None, w, None, 1e-5)
            return torch.ops.kiln_cuda.scatter_rows(y, index, x.shape[0], x.shape[1])

    x, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    program = torch.export.export(Encoder(), (x, mask))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"kiln_cuda.pack_indices.default", "kiln_cuda.scatter_rows.default"} <= targets
    torch.testing.assert_close(program.module()(x, mask), Encoder()(x, mask))


# ---- the same checks on the GPU kernels -------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("batch, seq, prefix", [(1, 1, True), (7, 13, True), (5, 129, False), (33, 1000, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packing_round_trip_on_gpu(batch, seq, prefix, dtype):
    g = torch.Generator().manual_seed(batch * seq)
    check_packing(random_mask(batch, seq, g, prefix).cuda(), hidden=40, dtype=dtype)  # 80 B rows: byte path
    check_packing(random_mask(batch, seq, g, prefix).int().cuda(), hidden=64, dtype=dtype)  # 16 B vector path


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("rows_per_mask, cols", [(1, 7), (12, 129), (4, 1000), (2, 1024)])
def test_scale_mask_softmax_on_gpu_matches_float64(dtype, atol, rows_per_mask, cols):
    g = torch.Generator().manual_seed(cols)
    x = (torch.randn(5 * rows_per_mask, cols, generator=g) * 4).to(dtype)
    mask = torch.where(torch.rand(5, cols, generator=g) < 0.3, float("-inf"), 0.0)
    mask[2] = float("-inf")
    out = torch.ops.kiln_cuda.scale_mask_softmax(x.cuda(), mask.cuda(), 0.125)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.cpu().double(), softmax_float64(x, mask, 0.125), atol=atol, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-5), (torch.float16, 8e-3), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("rows, hidden", [(1, 256), (7, 384), (129, 768), (1000, 1024)])
def test_bias_residual_layer_norm_on_gpu_matches_float64(dtype, atol, rows, hidden):
    g = torch.Generator().manual_seed(rows + hidden)
    x, residual = torch.randn(rows, hidden, generator=g).to(dtype), torch.randn(rows, hidden, generator=g).to(dtype)
    bias, weight, ln_bias = (torch.randn(hidden, generator=g).to(dtype) for _ in range(3))
    args = [t.cuda() for t in (x, bias, residual, weight, ln_bias)]
    y, s = torch.ops.kiln_cuda.bias_residual_layer_norm(*args, 1e-12)
    want_y, want_s = layer_norm_float64(x, bias, residual, weight, ln_bias, 1e-12)
    torch.testing.assert_close(y.cpu().double(), want_y, atol=atol, rtol=atol)
    torch.testing.assert_close(s.cpu().double(), want_s.to(dtype).double(), atol=atol, rtol=0)
