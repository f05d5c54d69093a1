"""The int8 rewrite of backend `inductor` (`optimize.backends.inductor_int8`), checked eagerly on
fresh random inputs against float64 references: SmoothQuant is exact in float, the chosen
ranges and weight scales bound the rounding error, and the rewritten graph has one quantizer
per activation and no float copy of a quantized weight."""

import pytest
import torch
from torch import fx

from optimize.backends import inductor_int8 as int8

qd = torch.ops.quantized_decomposed


class Block(torch.nn.Module):
    """Three projections of one activation (like query, key and value) and one of another."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(32, 32) for _ in range(3))
        self.out = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.q(x) + self.k(x) - self.v(x)))


def _inputs() -> torch.Tensor:
    x = torch.randn(2, 24, 32)
    x[..., 3] *= 20  # an outlier channel, as transformers' activations have
    return x


def _graph(seed: int) -> tuple[fx.GraphModule, list[dict[str, torch.Tensor]]]:
    """The exported block and eight calibration batches."""
    torch.manual_seed(seed)
    block = Block().eval()
    batches = [{"x": _inputs()} for _ in range(8)]
    return torch.export.export(block, (batches[0]["x"],)).module(), batches


def test_smoothing_moves_scale_between_activation_and_weight_without_changing_the_product():
    torch.manual_seed(1)
    x, w = torch.randn(64, 48, dtype=torch.float64), torch.randn(16, 48, dtype=torch.float64)
    x[:, 5] *= 30
    observed = int8.Observed(x.amin(0), x.amax(0), x)
    s = int8.smoothing(observed, w, 0.8).double()
    torch.testing.assert_close((x / s) @ (w * s).t(), x @ w.t())
    assert (x / s).abs().amax(0).max() < x.abs().amax(0).max() / 5, "the outlier channel is flattened"


def test_activation_range_keeps_zero_exact_and_errs_no_more_than_min_max():
    torch.manual_seed(2)
    x = torch.randn(4096, 8).abs()
    x[:3, 0] = 40.0  # three outlier tokens
    observed = int8.Observed(x.amin(0), x.amax(0), x)
    scale, zero = int8.activation_qparams(observed, None)

    def roundtrip(values: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
        return (torch.clamp(torch.round(values / scale) + zero, 0, 255) - zero) * scale

    assert roundtrip(torch.zeros(1), scale, zero).item() == 0.0
    min_max = 40.0 / 255
    chosen = (roundtrip(x, scale, zero) - x).pow(2).mean()
    assert chosen < (roundtrip(x, min_max, 0) - x).pow(2).mean()
    assert scale < min_max, "clipping the outliers gives the other tokens finer steps"


def test_weights_round_to_within_half_a_step_per_output_channel():
    torch.manual_seed(3)
    w = torch.randn(24, 40) * torch.logspace(-2, 1, 24)[:, None]  # channels of very different size
    values, scale = int8.weight_int8(w)
    assert values.dtype == torch.int8 and values.abs().max() <= 127
    error = (values.float() * scale[:, None] - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()


def test_rewritten_graph_quantizes_each_activation_once_and_smoothing_cuts_the_error():
    gm, batches = _graph(4)
    stats = int8.observe(gm, batches, ["x"])
    assert len(stats) == 4 and [len(g) for g in int8.groups(gm)] == [3, 1]
    fresh = _inputs()  # new values (the export fixed the shape)
    with torch.no_grad():
        expected = gm(fresh)
    errors = {}
    for alpha in (-1.0, 0.5, 0.8):
        quantized = int8.quantize(gm, stats, alpha)
        nodes = [n for n in quantized.graph.nodes if n.op == "call_function"]
        assert sum(n.target == qd.quantize_per_tensor.default for n in nodes) == 2, "one quantizer per activation"
        assert sum(n.target == qd.dequantize_per_channel.default for n in nodes) == 4
        assert not any(p.is_floating_point() and p.dim() == 2 for p in quantized.buffers()), "no float weight left"
        with torch.no_grad():
            errors[alpha] = ((quantized(fresh) - expected).norm() / expected.norm()).item()
    assert errors[-1.0] < 0.1 and errors[0.5] < 0.03 and errors[0.8] < 0.03, errors
    assert errors[0.5] < errors[-1.0] / 2, "SmoothQuant moves the outlier channel into the weights"


def test_kept_linears_stay_float_and_untouched():
    gm, batches = _graph(5)
    stats = int8.observe(gm, batches, ["x"])
    keep = int8.groups(gm)[1]
    quantized = int8.quantize(gm, stats, 0.8, keep)
    nodes = [n for n in quantized.graph.nodes if n.op == "call_function"]
    assert sum(n.target == qd.quantize_per_tensor.default for n in nodes) == 1
    linears = int8.linears(quantized)
    assert list(linears) == keep, "only the kept linear still multiplies by a float weight"
    with torch.no_grad():
        assert torch.equal(quantized.get_parameter(keep[0]) if keep[0] in dict(quantized.named_parameters())
                           else quantized.get_buffer(keep[0]), gm.get_parameter(keep[0]))
