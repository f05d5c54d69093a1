"""Which quantizers of an int8 model to keep in float so that it meets an accuracy target: a
backend-neutral search (OpenVINO's NNCF models, `optimize.backends.openvino_int8`; Inductor's
quantized graphs, `optimize.backends.inductor_int8`).

int8 error in a transformer is not spread evenly: a few activations (typically an FFN's
down-projection input after GELU, attention scores, the last layers) carry outliers that one
per-tensor scale cannot hold, and they account for most of the loss. So the build measures,
instead of guessing, how much each activation quantizer costs: it scores the calibration texts
with that one quantizer bypassed (its readers see float activations) and ranks the quantizers
by the cosine regained. The quantizers are then returned to float in that order, doubling the
count each step and bisecting back, until the calibration texts are within the target;
held-out texts then judge the engine as for every build.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from optimize.runtime.errors import ConfigError


@dataclass
class Quantizer:
    """One activation quantizer of a quantized model and the MatMuls (linears) that read it."""

    name: str  # how the backend finds it (OpenVINO: the FakeQuantize node's friendly name)
    matmuls: list[str]
    regained: float = 0.0  # calibration cosine gained when it alone is bypassed


@dataclass
class Selection:
    """What the search kept in float and the calibration cosine each step reached."""

    kept: list[str] = field(default_factory=list)  # MatMul names kept in float
    quantized: int = 0  # MatMuls left int8
    cosine: float = 0.0  # worst calibration cosine of the final model
    steps: list[dict[str, Any]] = field(default_factory=list)


def rank(quantizers: list[Quantizer], score_without: Callable[[Quantizer], float], base: float) -> list[Quantizer]:
    """`quantizers` ordered by the calibration cosine each regains when bypassed alone (most
    first); `score_without(q)` scores the model with `q` bypassed, `base` is the fully
    quantized model's score."""
    for q in quantizers:
        q.regained = score_without(q) - base
    return sorted(quantizers, key=lambda q: q.regained, reverse=True)


def keep_until(
    ranked: list[Quantizer],
    quantize: Callable[[list[str]], Any],
    score: Callable[[Any], float],
    target: float,
    total: int,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Any, Selection]:
    """Re-quantize with the most costly quantizers' MatMuls kept in float, adding them in
    `ranked` order (doubling the count each step, then taking back the surplus by bisection)
    until the worst calibration cosine reaches `target`. Returns the model and the selection;
    the selection's cosine is below `target` when keeping every ranked MatMul is not enough."""
    def kept_names(count: int) -> list[str]:
        return sorted({m for q in ranked[:count] for m in q.matmuls})

    selection = Selection()
    tried: dict[int, tuple[Any, float]] = {}

    def attempt(count: int) -> float:
        if count not in tried:
            model = quantize(kept_names(count))
            tried[count] = (model, score(model))
            selection.steps.append({"kept_quantizers": count, "kept_matmuls": len(kept_names(count)),
                                    "calibration_cosine": round(tried[count][1], 6)})
            if on_step is not None:
                on_step(count, tried[count][1])
        return tried[count][1]

    low, high = 0, 1
    while attempt(high) < target and high < len(ranked):
        low, high = high, min(2 * high, len(ranked))
    if tried[high][1] >= target:
        while high - low > 1:  # the smallest count in (low, high] that meets the target
            middle = (low + high) // 2
            if attempt(middle) >= target:
                high = middle
            else:
                low = middle
    model, cosine = tried[high]
    selection.kept = kept_names(high)
    selection.quantized = total - len(selection.kept)
    selection.cosine = cosine
    return model, selection


def keep_sensitive(
    quantized: Any,
    quantizers: list[Quantizer],
    score_without: Callable[[Quantizer], float],
    quantize: Callable[[list[str]], Any],
    score: Callable[[Any], float],
    base: float,
    target: float,
    record: dict[str, Any],
    *,
    kind: str = "matmuls",
    name: Callable[[str], str] = str,
    reporter: Any = None,
) -> tuple[Any, float]:
    """`rank` then `keep_until`, for a backend's build: returns the model (`quantized` itself
    when its `base` score already meets `target`) and its calibration cosine, which is below
    `target` when keeping every ranked quantizer in float is not enough (the caller refuses the
    build). The choice goes to `record` (the manifest's quantization record): the all-int8
    cosine and `kept_in_float`, whose `kind` entry lists what was kept, each as `name` gives it."""
    record["calibration_cosine_all_int8"] = round(base, 6)
    total = len({m for q in quantizers for m in q.matmuls})
    if base >= target:
        record["kept_in_float"] = {kind: [], "quantized": total, "calibration_cosine": round(base, 6),
                                   "target": target, "steps": []}
        return quantized, base
    stage = f"rank {len(quantizers)} int8 quantizers by the cosine each costs"
    t0 = time.perf_counter()
    if reporter is not None:
        reporter.start(stage)
    ranked = rank(quantizers, score_without, base)
    if reporter is not None:
        reporter.finish(stage, round(time.perf_counter() - t0, 3))

    def step(count: int, cosine: float) -> None:
        if reporter is not None:
            reporter.advance(f"{count} costliest quantizers in float: calibration cosine {cosine:.5f}")

    model, selection = keep_until(ranked, quantize, score, target, total, step)
    record["kept_in_float"] = {kind: [name(n) for n in selection.kept], "quantized": selection.quantized,
                               "calibration_cosine": round(selection.cosine, 6), "target": target,
                               "steps": selection.steps}
    return model, selection.cosine


def check_smooth_quant(options: dict[str, Any]) -> None:
    """Refuse an `int8_smooth_quant` backend option that is neither "auto" nor a number."""
    alpha = options["int8_smooth_quant"]
    if alpha != "auto" and (isinstance(alpha, bool) or not isinstance(alpha, int | float)):
        raise ConfigError(f"backend option int8_smooth_quant must be 'auto' or a number; got {alpha!r}")


__all__ = ["Quantizer", "Selection", "rank", "keep_until", "keep_sensitive", "check_smooth_quant"]
