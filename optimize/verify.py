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

from optimize.config import CompileConfig
from optimize.specs import Dim, TensorSpec


@dataclass
class AccuracyReport:
    """Worst max-abs error and lowest cosine similarity over all shapes and outputs."""

    max_abs_error: float = 0.0
    min_cosine: float = 1.0
    shapes: list[dict[str, int]] = field(default_factory=list)
    per_output: dict[str, dict[str, float]] = field(default_factory=dict)
    worst: str = ""

    def within(self, max_abs_error: float, min_cosine: float) -> bool:
        return self.max_abs_error <= max_abs_error and self.min_cosine >= min_cosine

    def to_json(self) -> dict[str, Any]:
        return {
            "max_abs_error": self.max_abs_error,
            "min_cosine": self.min_cosine,
            "shapes": self.shapes,
            "per_output": self.per_output,
            "worst": self.worst,
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
    worst agreement. `on_shape` is called before each shape (for progress displays)."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    report = AccuracyReport()
    reference.eval()
    for sizes in verification_sizes(inputs, config):
        if on_shape:
            on_shape(sizes)
        feeds = make_inputs(sizes, generator)
        with torch.inference_mode():
            expected = reference(**feeds)
        got = run(feeds)
        report.shapes.append(sizes)
        for name, stats in compare(expected, got).items():
            seen = report.per_output.setdefault(name, {"max_abs_error": 0.0, "min_cosine": 1.0})
            seen["max_abs_error"] = max(seen["max_abs_error"], stats["max_abs_error"])
            seen["min_cosine"] = min(seen["min_cosine"], stats["min_cosine"])
            if stats["max_abs_error"] > report.max_abs_error or stats["min_cosine"] < report.min_cosine:
                report.worst = f"output '{name}' at {sizes}"
            report.max_abs_error = max(report.max_abs_error, stats["max_abs_error"])
            report.min_cosine = min(report.min_cosine, stats["min_cosine"])
    return report
