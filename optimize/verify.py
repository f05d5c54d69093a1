"""Accuracy verification: an engine against the fp32 eager model on fresh random inputs.

Every compile runs this on several shapes spread over the declared ranges (the corners and
random points between them); the worst numbers land in the manifest.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from optimize.runtime.config import CompileConfig
from optimize.runtime.precision import FACTS
from optimize.runtime.specs import Dim, TensorSpec


@dataclass
class AccuracyReport:
    """Worst max-abs error and lowest cosine similarity over all shapes and outputs."""

    max_abs_error: float = 0.0
    min_cosine: float = 1.0
    shapes: list[dict[str, int]] = field(default_factory=list)
    per_output: dict[str, dict[str, float]] = field(default_factory=dict)
    worst: str = ""
    # Samples (or tokens) whose label, the arg-max of a `logits` output, differs from fp32's.
    labels_differ: int = 0
    labels_compared: int = 0

    def add(self, stats: dict[str, dict[str, float]], where: str) -> None:
        """Fold one comparison (per output, as `compare` returns) into the report; `where`
        names the inputs it was made on, for `worst`."""
        for name, entry in stats.items():
            self.labels_differ += int(entry.get("labels_differ", 0))
            self.labels_compared += int(entry.get("labels_compared", 0))
            seen = self.per_output.setdefault(name, {"max_abs_error": 0.0, "min_cosine": 1.0})
            seen["max_abs_error"] = max(seen["max_abs_error"], entry["max_abs_error"])
            seen["min_cosine"] = min(seen["min_cosine"], entry["min_cosine"])
            if entry["max_abs_error"] > self.max_abs_error or entry["min_cosine"] < self.min_cosine:
                self.worst = f"output '{name}' {where}"
            self.max_abs_error = max(self.max_abs_error, entry["max_abs_error"])
            self.min_cosine = min(self.min_cosine, entry["min_cosine"])

    def within(self, max_abs_error: float, min_cosine: float) -> bool:
        return self.max_abs_error <= max_abs_error and self.min_cosine >= min_cosine

    def to_json(self) -> dict[str, Any]:
        return {
            "max_abs_error": self.max_abs_error,
            "min_cosine": self.min_cosine,
            "shapes": self.shapes,
            "per_output": self.per_output,
            "worst": self.worst,
            **({"labels_differ": self.labels_differ, "labels_compared": self.labels_compared}
               if self.labels_compared else {}),
        }


def verification_sizes(inputs: list[TensorSpec], config: CompileConfig) -> list[dict[str, int]]:
    """Shapes to verify at: each dim's min, opt, max, then random sizes inside the ranges."""
    dims: dict[str, Dim] = {d.name: d for s in inputs for d in s.dims}
    rng = random.Random(config.seed)
    sizes = [
        {n: d.min for n, d in dims.items()},
        {n: d.opt for n, d in dims.items()},
        {n: d.max for n, d in dims.items()},
    ]
    while len(sizes) < max(config.verify_samples, 1) + 2:
        sizes.append({n: rng.randint(d.min, d.max) for n, d in dims.items()})
    unique = []
    for s in sizes:
        if s not in unique:
            unique.append(s)
    return unique


def compare(reference: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per output: max abs error and the lowest per-sample cosine similarity (float64)."""
    result = {}
    for name, ref in reference.items():
        got = actual[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise ValueError(f"output '{name}' has shape {tuple(got.shape)}, reference {tuple(ref.shape)}")
        r = ref.detach().double().reshape(ref.shape[0] if ref.dim() else 1, -1)
        g = got.detach().double().reshape(r.shape)
        err = (r - g).abs().max().item() if r.numel() else 0.0
        if torch.isnan(g).any() and not torch.isnan(r).any():
            err = float("inf")
        # A sample whose reference is all zeros (e.g. a fully padded row) compares by error only.
        norms = r.norm(dim=1) * g.norm(dim=1)
        cos = torch.where(norms > 0, (r * g).sum(dim=1) / norms.clamp(min=1e-30), torch.ones_like(norms))
        result[name] = {"max_abs_error": err, "min_cosine": cos.min().item() if cos.numel() else 1.0}
        if name == "logits" and ref.dim() >= 2 and ref.shape[-1] > 1:
            # The label a classifier answers: per sample (text-classification) or per token
            # (token-classification; padding is zeroed in both, so it agrees).
            differ = ref.detach().argmax(-1) != got.detach().argmax(-1)
            result[name].update(labels_differ=int(differ.sum()), labels_compared=differ.numel())
    return result


def verify(
    run: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    reference: torch.nn.Module,
    make_inputs: Callable[[dict[str, int], torch.Generator], dict[str, torch.Tensor]],
    inputs: list[TensorSpec],
    config: CompileConfig,
    on_shape: Callable[[dict[str, int]], None] | None = None,
) -> AccuracyReport:
    """Run `run` and the fp32 `reference` on fresh random inputs at several shapes; return the
    worst agreement (token outputs at real tokens only, see `compare_real_tokens`). `on_shape`
    is called before each shape (for progress displays)."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    report = AccuracyReport()
    reference.eval()
    for sizes in verification_sizes(inputs, config):
        if on_shape:
            on_shape(sizes)
        _check(report, run, reference, make_inputs(sizes, generator), sizes, f"at {sizes}")
    return report


def _check(report: AccuracyReport, run: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
           reference: torch.nn.Module, feeds: dict[str, torch.Tensor], sizes: dict[str, int], where: str) -> None:
    """Run `feeds` through the engine and the reference and add the comparison (at real
    tokens) to `report`."""
    with torch.inference_mode():
        expected = reference(**feeds)
    got = run(feeds)
    report.shapes.append(sizes)
    report.add(compare_real_tokens(feeds, expected, got), where)


def _without_padding(
    feeds: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Zero token outputs at padded positions in both, when the feeds have an `attention_mask`.

    What a model computes at a padding position is not part of its contract (pooling masks it
    out) and carries no signal; left in, it dominates the error of quantized engines (padding
    rows of all-MiniLM-L6-v2 under ORT dynamic int8: cosine 0.83 where real tokens score 0.98).
    """
    mask = feeds.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return expected, got
    keep = mask.detach().cpu().bool()

    def strip(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, value in outputs.items():
            value = value.detach().cpu()
            if value.dim() >= 2 and tuple(value.shape[:2]) == tuple(keep.shape):
                shape = keep.shape + (1,) * (value.dim() - 2)
                value = torch.where(keep.reshape(shape), value, torch.zeros((), dtype=value.dtype))
            out[name] = value
        return out

    return strip(expected), strip(got)


def compare_real_tokens(
    feeds: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """`compare` with token outputs zeroed at padding positions in both (see `_without_padding`;
    engines that skip padding, such as packed `triton` engines, output zeros there)."""
    return compare(*_without_padding(feeds, expected, got))


def verify_batches(
    run: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    reference: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    on_batch: Callable[[dict[str, int]], None] | None = None,
) -> AccuracyReport:
    """Like `verify`, on given batches (real samples) instead of random inputs; token outputs
    are compared at real tokens only (see `_without_padding`)."""
    report = AccuracyReport()
    reference.eval()
    for feeds in batches:
        first = next(iter(feeds.values()))
        sizes = {"batch": int(first.shape[0]), **({"seq": int(first.shape[1])} if first.dim() > 1 else {})}
        if on_batch:
            on_batch(sizes)
        _check(report, run, reference, feeds, sizes, f"on sample batch {sizes}")
    return report


def judge(random: AccuracyReport, samples: AccuracyReport | None, config: CompileConfig) -> tuple[dict[str, Any], str]:
    """The manifest's accuracy entry and a failure message ("" when within tolerance).

    Quantized precisions are judged on real samples when there are any: random token ids make
    activations no real input produces and exaggerate quantization error (optimize/samples.py); their
    random-input numbers are still recorded. Every other precision must pass on both.
    """
    tol = config.tolerance
    assert tol is not None
    judged = [("random inputs", random)]
    if samples is not None:
        quantized = config.precision in FACTS and FACTS[config.precision].quantized  # "auto": a guard, no precision
        real_only = quantized or tol.real_samples_only
        judged = [("real samples", samples)] if real_only else [*judged, ("real samples", samples)]
    entry: dict[str, Any] = {**random.to_json(), "tolerance": tol.to_json(), "reference": "fp32 eager",
                             "judged_on": [label for label, _ in judged]}
    if samples is not None:
        entry["samples"] = samples.to_json()
    for label, report in judged:
        if not report.within(tol.max_abs_error, tol.min_cosine):
            return entry, (
                f"engine disagrees with fp32 eager on {label}: max abs error {report.max_abs_error:.3g} "
                f"(allowed {tol.max_abs_error:.3g}), min cosine {report.min_cosine:.6f} "
                f"(allowed {tol.min_cosine}); worst: {report.worst}"
            )
    if tol.same_labels:
        if samples is None:
            return entry, "the guard asks for the same labels as fp32 on real texts, and this source has none"
        if samples.labels_differ:
            return entry, (f"engine gives another label than fp32 eager on {samples.labels_differ} of "
                           f"{samples.labels_compared} real samples/tokens (the guard asks for the same labels)")
    return entry, ""
