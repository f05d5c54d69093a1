"""Which MatMuls of an NNCF-quantized OpenVINO model to keep in float so that int8 meets an
accuracy target, and the quantization that keeps them.

int8 error in a transformer is not spread evenly: a few activations (typically an FFN's
down-projection input after GELU, attention scores, the last layers) carry outliers that one
per-tensor scale cannot hold, and they account for most of the loss. So the build measures,
instead of guessing, how much each activation quantizer costs: it quantizes the model once,
then for each quantizer feeding a MatMul it computes the calibration outputs with that one
quantizer bypassed (its consumers see float activations) and scores the cosine regained. The
quantizers are then returned to float in that order, a few at a time, re-quantizing with the
consumers in NNCF's ignored scope (float weights and activations) until the calibration texts
are within the target; held-out texts then judge the engine as for every build. On a CPU with
native bf16 the kept MatMuls run in bf16 (the engine's inference precision for everything that
is not int8), otherwise in fp32.

Cost: one quantization and one compile-and-run of the calibration set per quantizer (48 on
all-MiniLM-L6-v2, about a minute on 2 cores), plus a re-quantization per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Shape-only nodes between an activation quantizer and the MatMul that reads it (the attention
# MatMuls read their quantized inputs through head reshapes and transposes).
_PASS_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze"}
_MATMULS = {"MatMul", "ScaledDotProductAttention"}


@dataclass
class Quantizer:
    """One activation quantizer of the quantized model and the MatMuls that read it."""

    name: str  # the FakeQuantize node's friendly name
    matmuls: list[str]
    regained: float = 0.0  # calibration cosine gained when it alone is bypassed


@dataclass
class Selection:
    """What the search kept in float and the calibration cosine each step reached."""

    kept: list[str] = field(default_factory=list)  # MatMul names kept in float
    quantized: int = 0  # MatMuls left int8
    cosine: float = 0.0  # worst calibration cosine of the final model
    steps: list[dict[str, Any]] = field(default_factory=list)


def _consumers(output: Any) -> list[Any]:
    return [target.get_node() for target in output.get_target_inputs()]


def _matmuls_reading(node: Any) -> list[str]:
    """The MatMuls that read `node`'s output, through shape-only nodes."""
    found, todo = [], _consumers(node.output(0))
    while todo:
        n = todo.pop()
        kind = n.get_type_name()
        if kind in _MATMULS:
            found.append(n.get_friendly_name())
        elif kind in _PASS_THROUGH:
            todo.extend(_consumers(n.output(0)))
    return sorted(set(found))


def activation_quantizers(model: Any) -> list[Quantizer]:
    """The FakeQuantize nodes on activations (not on constant weights) that feed MatMuls, in
    graph order."""
    result = []
    for node in model.get_ordered_ops():
        if node.get_type_name() != "FakeQuantize":
            continue
        if node.input_value(0).get_node().get_type_name() == "Constant":
            continue
        matmuls = _matmuls_reading(node)
        if matmuls:
            result.append(Quantizer(node.get_friendly_name(), matmuls))
    return result


def bypass(model: Any, names: Sequence[str]) -> Any:
    """A copy of `model` with the named FakeQuantize nodes removed: their readers get the float
    activation."""
    copy = model.clone()
    wanted = set(names)
    for node in copy.get_ordered_ops():
        if node.get_friendly_name() in wanted and node.get_type_name() == "FakeQuantize":
            node.output(0).replace(node.input_value(0))
    return copy


def rank(quantized: Any, quantizers: list[Quantizer], score: Callable[[Any], float], base: float) -> list[Quantizer]:
    """`quantizers` ordered by the calibration cosine each regains when bypassed alone (most
    first); `score` compiles a model and returns its worst calibration cosine, `base` is the
    fully quantized model's."""
    for q in quantizers:
        q.regained = score(bypass(quantized, [q.name])) - base
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


__all__ = ["Quantizer", "Selection", "activation_quantizers", "bypass", "rank", "keep_until"]
