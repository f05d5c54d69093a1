"""Pass `onnx_mixed_precision`: compute in fp16 or bf16, with fp32 islands where it matters.

Strongly typed engines (TensorRT 10+/TensorRT-RTX: no precision flags any more) take their
precision from the graph, so the graph itself must say which node runs in which type. Kept in
fp32, each for a reason recorded in the manifest:

- `op`: normalizations, softmax and reductions — long sums whose result fp16 cannot hold or
  round well (the BERT fp16 LayerNorm overflow, NVIDIA/TensorRT#2564, #3101);
- `overflow`: the producer and every consumer of a tensor whose calibrated range comes within
  `OVERFLOW_MARGIN` of fp16's largest value 65504 (measured over real samples; a constant with
  such values counts too — e.g. the attention mask's float32-min bias, -3.4e38, is -inf in fp16);
- `underflow`: consumers of a small constant that fp16 rounds to 0 (the 1e-9 clamp that guards
  mean pooling's division would stop guarding).

bf16 has fp32's exponent range, so the overflow guard is not needed for it (it is skipped, and
says so). Everything else computes in the low type; graph inputs and outputs keep their fp32
contract, and a Cast is inserted on every edge where producer and consumer types differ.

ONNX Runtime's `float16.convert_float_to_float16` does the fp16 half of this, but not bf16, and
its block lists are by op type or name only; the per-edge casting here is small and shared by
both types, and the decision of what stays in fp32 — the part that matters — is ours either way.
"""

from __future__ import annotations

from typing import ClassVar

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper
import torch

from optimize.onnx.base import OnnxPass, OnnxPassContext
from optimize.onnx.calibration import tensor_ranges
from optimize.onnx.graph import FLOAT_TYPES, Graph, topological_sort

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest fp16 subnormal; smaller magnitudes round to 0
SMALL_CONSTANT = 16  # elements: constants up to this size are checked for underflow
# A tensor within this factor of FP16_MAX on the calibration samples stays fp32: samples are a
# few hundred sentences, and unseen inputs reach somewhat larger activations.
OVERFLOW_MARGIN = 4.0

KEEP_OPS = frozenset({
    "LayerNormalization", "RMSNormalization", "SkipLayerNormalization", "BatchNormalization",
    "InstanceNormalization", "GroupNormalization", "LpNormalization", "MeanVarianceNormalization",
    "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd", "ReduceMax", "ReduceMin", "CumSum",
})
# Ops that accept any input type without a cast and produce no float.
TYPE_AGNOSTIC = frozenset({"Shape", "Size", "IsNaN", "IsInf"})
# Ops whose float output type is fixed by an attribute or that create values: left as they are
# (they produce fp32), and a Cast feeds low-precision consumers.
FIXED_OUTPUT = frozenset({"Cast", "CastLike", "ConstantOfShape", "RandomNormal", "RandomUniform",
                          "RandomNormalLike", "RandomUniformLike", "EyeLike", "Range"})

_LOW = {torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}
_NUMPY_LOW = {onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.BFLOAT16: ml_dtypes.bfloat16}


def _lift_constants(g: Graph) -> None:
    """Float `Constant` nodes become initializers, so all constants are handled alike."""
    lifted = []
    for node in g.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
            if tensor.data_type == onnx.TensorProto.FLOAT:
                init = onnx.TensorProto()
                init.CopyFrom(tensor)
                init.name = node.output[0]
                g.graph.initializer.append(init)
                lifted.append(node)
    if lifted:
        g.remove_nodes(lifted)


def decide_fp32_nodes(
    g: Graph, ranges: dict[str, tuple[float, float]] | None, limit: float, check_underflow: bool = True
) -> dict[str, str]:
    """Node name → reason, for every node that must compute in fp32."""
    keep: dict[str, str] = {}
    for node in g.graph.node:
        if node.op_type in KEEP_OPS:
            keep[node.name] = "op"
    overflowing: set[str] = set()
    if ranges is not None:
        overflowing |= {name for name, (lo, hi) in ranges.items() if max(abs(lo), abs(hi)) > limit}
    underflowing: set[str] = set()
    for name, init in g.initializers.items():
        if init.data_type == onnx.TensorProto.FLOAT:
            value = numpy_helper.to_array(init)
            if value.size and np.nanmax(np.abs(value)) > limit:
                overflowing.add(name)
            # A small constant (an epsilon, a clamp bound) that rounds to 0 changes meaning:
            # clamp(min=1e-9) guarding a division becomes clamp(min=0).
            elif check_underflow and 0 < value.size <= SMALL_CONSTANT and np.any((value != 0) & (np.abs(value) < FP16_TINY)):
                underflowing.add(name)
    for name in sorted(underflowing):
        for consumer in g.consumers.get(name, []):
            keep.setdefault(consumer.name, "underflow")
    for name in sorted(overflowing):
        producer = g.producer.get(name)
        if producer is not None and producer.op_type not in FIXED_OUTPUT:
            keep.setdefault(producer.name, "overflow")
        for consumer in g.consumers.get(name, []):
            if consumer.op_type not in TYPE_AGNOSTIC:
                keep.setdefault(consumer.name, "overflow")
    return keep


def convert(model: onnx.ModelProto, low: int, keep: dict[str, str]) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Rewrite `model` so nodes not in `keep` compute in `low`; return it and counts."""
    g = Graph(model)
    float32 = onnx.TensorProto.FLOAT

    def is_float(name: str) -> bool:
        return g.types.get(name) in FLOAT_TYPES

    low_nodes = [n for n in g.graph.node if n.name not in keep and n.op_type not in FIXED_OUTPUT | TYPE_AGNOSTIC
                 and any(is_float(v) for v in [*n.input, *n.output] if v)]
    low_names = {n.name for n in low_nodes}
    produced_low = {o for n in low_nodes for o in n.output if o and g.types.get(o) == float32}

    # Constants: converted in place when only low nodes read them, else copied.
    low_copies: dict[str, str] = {}
    converted = 0
    for name, init in list(g.initializers.items()):
        if init.data_type != float32:
            continue
        readers = g.consumers.get(name, [])
        low_readers = [r for r in readers if r.name in low_names]
        if not low_readers:
            continue
        value = numpy_helper.to_array(init).astype(_NUMPY_LOW[low])
        if len(low_readers) == len(readers) and name not in g.outputs:
            init.CopyFrom(numpy_helper.from_array(value, name))
        else:
            low_copies[name] = g.add_initializer(value, name + "_low")
        converted += 1
    constants_low = {n for n, t in g.initializers.items() if t.data_type == low} | set(low_copies.values())

    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            casts[key] = g.fresh(f"{name}_to_{'fp32' if to == float32 else 'low'}")
            new_nodes.append(onnx.helper.make_node("Cast", [name], [casts[key]], name=g.fresh("mixed_precision_cast"), to=to))
        return casts[key]

    graph_inputs = {i.name for i in g.graph.input}
    for node in g.graph.node:
        if node.op_type in TYPE_AGNOSTIC or node.op_type == "Cast":  # they read any type as is
            continue
        wants_low = node.name in low_names
        for i, name in enumerate(node.input):
            if not name or not is_float(name) or g.types.get(name) not in (float32, low):
                continue
            if name in low_copies and wants_low:
                node.input[i] = low_copies[name]
                continue
            has_low = name in produced_low or name in constants_low
            if name in graph_inputs:
                has_low = False
            if wants_low and not has_low:
                node.input[i] = cast(name, low)
            elif not wants_low and has_low:
                node.input[i] = cast(name, float32)
    # Graph outputs keep their fp32 contract.
    for output in g.graph.output:
        if output.name in produced_low:
            producer = g.producer[output.name]
            inner = g.fresh(output.name + "_low")
            for i, name in enumerate(producer.output):
                if name == output.name:
                    producer.output[i] = inner
            for consumer in g.consumers.get(output.name, []):
                for i, name in enumerate(consumer.input):
                    if name == output.name:
                        consumer.input[i] = inner
            new_nodes.append(onnx.helper.make_node("Cast", [inner], [output.name], name=g.fresh("output_cast"), to=float32))
    g.graph.node.extend(new_nodes)
    topological_sort(g.graph)
    g.reindex()
    g.prune()
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model, {"low_precision_nodes": len(low_nodes), "constants_converted": converted, "casts": len(new_nodes)}


class MixedPrecision(OnnxPass):
    name: ClassVar[str] = "onnx_mixed_precision"
    description: ClassVar[str] = "fp16/bf16 compute with LayerNorm, softmax, reductions and overflowing tensors in fp32"

    @staticmethod
    def low_precision(ctx: OnnxPassContext) -> torch.dtype | None:
        """The plan's compute type when it is 16 bits: fp16/bf16 for those precisions, and for
        quantized ones the type the backend leaves their other ops in (TensorRT's
        `quantized_fallback`)."""
        return ctx.plan.compute if ctx.plan.compute in _LOW else None

    def applies(self, ctx: OnnxPassContext) -> str:
        if self.low_precision(ctx) is None:
            return f"precision is {ctx.plan.precision}"
        return ""

    def run(self, model: onnx.ModelProto, ctx: OnnxPassContext) -> tuple[onnx.ModelProto, dict[str, int]]:
        low = _LOW[self.low_precision(ctx)]  # type: ignore[index]
        g = Graph(model)
        for node in g.graph.node:  # decisions are recorded by node name
            if not node.name:
                node.name = g.fresh(node.op_type)
        _lift_constants(g)
        ranges = None
        if low == onnx.TensorProto.FLOAT16:
            if ctx.samples is not None:
                ranges = tensor_ranges(model, ctx)
                ctx.record["fp16_range_check"] = f"calibrated over {len(ctx.samples())} batches"
            else:
                ctx.record["fp16_range_check"] = "constants only (no samples)"
        else:
            ctx.record["fp16_range_check"] = "not needed: bf16 has fp32's range"
        fp16 = low == onnx.TensorProto.FLOAT16
        keep = decide_fp32_nodes(g, ranges, FP16_MAX / OVERFLOW_MARGIN if fp16 else float("inf"), check_underflow=fp16)
        model, counts = convert(model, low, keep)
        ctx.record["fp32_nodes"] = {
            reason: sorted(name for name, why in keep.items() if why == reason) for reason in sorted(set(keep.values()))
        }
        counts["fp32_op_nodes"] = sum(1 for why in keep.values() if why == "op")
        counts["fp32_overflow_nodes"] = sum(1 for why in keep.values() if why in ("overflow", "underflow"))
        return model, counts
