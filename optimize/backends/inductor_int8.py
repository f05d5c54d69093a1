"""int8 (weights and activations) for backend `inductor`: the captured graph's linears get
quantize / dequantize nodes in the form PyTorch's own PT2E quantization leaves, which
Inductor's freezing passes turn into oneDNN int8 GEMMs (`onednn.qlinear_pointwise`, on AMX or
VNNI where the CPU has them).

Each linear `y = x W^T + b` with a constant weight becomes
`y = dequant(quant(x / s)) · dequant(W_int8)^T + b` with
- `s`: SmoothQuant's per-input-channel scale `max|x_j|^α / max|W_j|^(1-α)`, which moves the
  activation's outlier channels into the weight (`W_int8` quantizes `W · diag(s)`); the division
  fuses into the quantize kernel, so it costs no extra pass over `x`;
- activations: one asymmetric uint8 scale and zero point per tensor, over the range of `x / s`
  on the calibration texts that errs least (clipping a few outlier tokens gives every other
  token finer steps); linears that read one activation (query, key, value) share its quantizer;
- weights: symmetric int8, one scale per output channel.

What int8 hurts most is measured, not guessed: the backend scores the calibration texts with
each quantizer alone left out, then keeps the costliest linears in float until the texts meet
the guard's cosine (`optimize.backends.int8_search`). The graph is scored eagerly, where the
quantize / dequantize nodes compute the same rounding as the int8 kernels.

Linears kept in float, and everything else, compute in the program's float type: a program
captured in bf16 gets int8 GEMMs that read and write bf16 (the converts around the
dequantize nodes are the form Inductor's int8-mixed-bf16 patterns match).

PyTorch's own PT2E quantizers moved to `torchao`; kiln writes the nodes itself, so the int8
path needs nothing beyond torch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
# why: importing it registers torch.ops.quantized_decomposed (the ops PT2E leaves, Inductor lowers)
import torch.ao.quantization.fx._decomposed  # noqa: F401
from torch import fx

from optimize.passes.base import add_constant
from optimize.passes.matching import LinearMatch, match_linear, release_attrs

aten = torch.ops.aten
_qd = torch.ops.quantized_decomposed
_convert = torch.ops.prims.convert_element_type.default

Feeds = dict[str, torch.Tensor]

# Tokens of each activation kept to choose its clipping range (MiniLM's 1536-wide FFN input:
# 12 MB; the built-in calibration texts are about 1300 tokens).
SAMPLE_TOKENS = 2048


@dataclass
class Observed:
    """Calibration statistics of one linear's input."""

    low: torch.Tensor  # per channel: min over every calibration token
    high: torch.Tensor  # per channel: max
    sample: torch.Tensor  # [tokens, channels]: the first SAMPLE_TOKENS tokens, to choose the clipping range


def linears(gm: fx.GraphModule) -> dict[str, LinearMatch]:
    """The linears of `gm` by a stable name (the weight's), in graph order."""
    found: dict[str, LinearMatch] = {}
    for node in gm.graph.nodes:
        m = match_linear(gm, node)
        if m is not None and m.node.target is aten.linear.default:
            found[str(m.weight.target)] = m
    return found


def groups(gm: fx.GraphModule) -> list[list[str]]:
    """The linears of `gm` grouped by the activation they read (a layer's query, key and value
    projections read one), in graph order: a group shares one smoothing and one quantizer."""
    by_input: dict[fx.Node, list[str]] = {}
    for name, m in linears(gm).items():
        by_input.setdefault(m.x, []).append(name)
    return list(by_input.values())


def observe(gm: fx.GraphModule, batches: Iterable[Feeds], names: list[str]) -> dict[str, Observed]:
    """Per-channel min and max of each linear's input over `batches`, by linear (linears that
    read one activation share its statistics; `gm` is called with the feeds, in the order of
    `names`, like the engine)."""
    reading: dict[fx.Node, list[str]] = {}
    for name, m in linears(gm).items():
        reading.setdefault(m.x, []).append(name)
    seen: dict[fx.Node, Observed] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> object:
            result = super().run_node(node)
            if node in reading:
                flat = result.detach().float().reshape(-1, result.shape[-1])
                low, high = flat.amin(0), flat.amax(0)
                before = seen.get(node)
                seen[node] = Observed(low, high, flat[:SAMPLE_TOKENS].clone()) if before is None else Observed(
                    torch.minimum(before.low, low), torch.maximum(before.high, high),
                    torch.cat([before.sample, flat[:SAMPLE_TOKENS - len(before.sample)]]))
            return result

    recorder = Recorder(gm)
    with torch.no_grad():
        for feeds in batches:
            recorder.run(*[feeds[n] for n in names])
    return {name: seen[node] for node, group in reading.items() if node in seen for name in group}


def smoothing(observed: Observed, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel divisor for the activation (and multiplier for `weight`,
    [out, in]; for linears sharing an input, their weights stacked)."""
    act = torch.maximum(observed.high.abs(), observed.low.abs()).clamp(min=1e-5)
    wmax = weight.abs().amax(0).float().clamp(min=1e-5)
    return (act.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)


def activation_qparams(observed: Observed, divisor: torch.Tensor | None) -> tuple[float, int]:
    """Asymmetric uint8 scale and zero point for `x / divisor`: the range, always including 0,
    whose clipping and rounding error on the sampled tokens is smallest (min-max lets one
    outlier token coarsen every other token's steps)."""
    x = observed.sample if divisor is None else observed.sample / divisor
    lo0, hi0 = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    best = (float("inf"), 1.0, 0)
    for ratio in torch.linspace(1.0, 0.2, 41).tolist():
        lo, hi = lo0 * ratio, hi0 * ratio
        scale = max((hi - lo) / 255.0, 1e-8)
        zero = int(min(255, max(0, round(-lo / scale))))
        error = ((torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale - x).pow(2).mean().item()
        if error < best[0]:
            best = (error, scale, zero)
    return best[1], best[2]


def weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of `weight` [out, in]: the values and their scales."""
    scale = (weight.abs().amax(1) / 127.0).clamp(min=1e-8)
    return torch.clamp(torch.round(weight / scale[:, None]), -127, 127).to(torch.int8), scale


def quantize(gm: fx.GraphModule, stats: dict[str, Observed], alpha: float, keep: Iterable[str] = (),
             compute: torch.dtype = torch.float32) -> fx.GraphModule:
    """A copy of `gm` with every linear but those in `keep` quantized (see the module doc), with
    SmoothQuant's `alpha` (< 0: off); `compute` is the program's float type."""
    gm = copy.deepcopy(gm)
    kept = set(keep)
    found = linears(gm)
    graph = gm.graph
    replaced: list[str] = []
    for group in groups(gm):
        chosen = [n for n in group if n not in kept and n in stats]
        if not chosen:
            continue
        first = found[chosen[0]]
        weights = {n: found[n].weight_out_in(gm).float() for n in chosen}
        divisor = smoothing(stats[chosen[0]], torch.cat(list(weights.values())), alpha) if alpha >= 0 else None
        scale, zero = activation_qparams(stats[chosen[0]], divisor)
        with graph.inserting_before(first.node):
            x = first.x
            if compute != torch.float32:
                x = graph.call_function(_convert, (x, torch.float32))
            if divisor is not None:
                inverse = add_constant(gm, "_kiln_int8_smooth", 1.0 / divisor, first.node)
                x = graph.call_function(aten.mul.Tensor, (x, inverse))
            q = graph.call_function(_qd.quantize_per_tensor.default, (x, scale, zero, 0, 255, torch.uint8))
            dq = graph.call_function(_qd.dequantize_per_tensor.default, (q, scale, zero, 0, 255, torch.uint8))
            if compute != torch.float32:
                dq = graph.call_function(_convert, (dq, compute))
        for name in chosen:
            m = found[name]
            w = weights[name] * divisor if divisor is not None else weights[name]
            values, wscale = weight_int8(w)
            wq = add_constant(gm, "_kiln_int8_weight", values, m.node)
            ws = add_constant(gm, "_kiln_int8_weight_scale", wscale, m.node)
            wz = add_constant(gm, "_kiln_int8_weight_zero", torch.zeros(len(wscale), dtype=torch.int64), m.node)
            with graph.inserting_before(m.node):
                dqw = graph.call_function(_qd.dequantize_per_channel.default, (wq, ws, wz, 0, -128, 127, torch.int8))
                if compute != torch.float32:
                    dqw = graph.call_function(_convert, (dqw, compute))
                out = graph.call_function(aten.linear.default, (dq, dqw, m.bias))
            m.node.replace_all_uses_with(out)
            graph.erase_node(m.node)
            replaced.append(str(m.weight.target))
    release_attrs(gm, replaced)
    graph.lint()
    gm.recompile()
    return gm


__all__ = ["Observed", "linears", "groups", "observe", "smoothing", "activation_qparams", "weight_int8", "quantize"]
