"""The activation quantizers of an NNCF-quantized OpenVINO model and how to bypass one: what
the int8 search (`optimize.backends.int8_search`) needs to decide which MatMuls to keep in
float. On a CPU with native bf16 the kept MatMuls run in bf16 (the engine's inference
precision for everything that is not int8), otherwise in fp32.

Cost: one quantization and one compile-and-run of the calibration set per quantizer (48 on
all-MiniLM-L6-v2, about a minute on 2 cores), plus a re-quantization per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optimize.backends.int8_search import Quantizer

# Shape-only nodes between an activation quantizer and the MatMul that reads it (the attention
# MatMuls read their quantized inputs through head reshapes and transposes).
_PASS_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze"}
_MATMULS = {"MatMul", "ScaledDotProductAttention"}


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


__all__ = ["activation_quantizers", "bypass"]
