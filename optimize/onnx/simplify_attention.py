"""Pass `onnx_simplify_attention`: clean up the attention subgraphs the exporter leaves behind.

torch's SDPA decomposition transposes K through a flatten → 3-D transpose → unflatten chain
built from Shape/Slice/Concat arithmetic (9 nodes per layer in BERT-family models), and applies
the 1/sqrt(d) softmax scale as two multiplications by d^-1/4 on Q and on Kᵀ. Backends see the
real pattern — MatMul(Q, Kᵀ) → Add(mask) → Softmax → MatMul(V) — only once that is gone:

- `transpose_chains`: Reshape → Transpose → Reshape that only merges leading dims, permutes
  the trailing ones and splits the leading dims back is one Transpose (proved on symbolic shape
  expressions, not guessed from node names);
- `transposes_merged`: Transpose ∘ Transpose → one Transpose (an identity one disappears);
- `scales_folded`: Mul by a scalar constant after a projection (MatMul + bias, through layout
  ops) is folded into the projection's weight and bias: (xW + b)·c = x(cW) + cb;
- `nan_guards_removed`: torch's safe softmax, `Where(IsNaN(p), 0, p)` after `p = Softmax(x)`,
  becomes `p` when every term of `x` is finite by construction (`finite_scores`). Softmax gives
  NaN only for a row whose largest logit is infinite; the guard exists for rows whose every key
  is masked with -inf, and the exporter's masks fill with the dtype's finite minimum instead. The
  guard costs two full passes over the [batch, heads, seq, seq] scores and hides the attention
  pattern from OpenVINO's fused attention (measured on all-MiniLM-L6-v2 with the OpenVINO bf16
  engine, Intel Xeon with AMX, 2 cores: 8-10% of the whole model at 8 × 128 and at 1 × 32);
- `masks_narrowed`: transformers builds an encoder's mask as `padding & (q_idx >= 0)`; the second
  term is true everywhere (`all_true`), yet it broadcasts the [batch, 1, 1, keys] padding mask
  up to [batch, 1, queries, keys], and every layer then reads that square. The `And` goes when
  all the mask reaches are `Where`s feeding `Add`s into whose other operand (the scores) the
  dropped term broadcasts without widening it, so the narrow mask gives the same sums.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx

from optimize.onnx.base import OnnxPass, OnnxPassContext
from optimize.onnx.graph import Graph, topological_sort

Sym = int | str | tuple[str, int]
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _dim(g: Graph, value: str, axis: int) -> Sym:
    """A symbol for `value`'s dim `axis`: its size when static, its dim_param when named
    (ONNX gives equal dims the same name), else the (value, axis) pair itself."""
    shape = g.shapes.get(value)
    if shape is not None and 0 <= axis < len(shape) and shape[axis] is not None:
        return shape[axis]  # type: ignore[return-value]
    return (value, axis)


def shape_expr(g: Graph, name: str, depth: int = 0) -> list[Sym] | None:
    """The value of a 1-D int64 shape tensor as a list of symbols, when it is computed from
    constants and `Shape` by Slice/Concat/Gather/Squeeze/Unsqueeze/Cast; None otherwise."""
    if depth > 16:
        return None
    const = g.constant(name)
    if const is not None:
        if const.dtype.kind not in "iu" or const.ndim > 1:
            return None
        return [int(v) for v in const.reshape(-1)]
    node = g.producer.get(name)
    if node is None:
        return None
    op = node.op_type
    if op == "Shape":
        rank = g.rank(node.input[0])
        if rank is None:
            return None
        start = int(_attr(node, "start", 0))  # type: ignore[arg-type]
        end = int(_attr(node, "end", rank))  # type: ignore[arg-type]
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        return [_dim(g, node.input[0], i) for i in range(max(0, start), min(rank, end))]
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
        return shape_expr(g, node.input[0], depth + 1)
    if op == "Concat" and int(_attr(node, "axis", 0)) == 0:  # type: ignore[arg-type]
        parts = [shape_expr(g, i, depth + 1) for i in node.input]
        if any(p is None for p in parts):
            return None
        return [s for p in parts for s in p]  # type: ignore[union-attr]
    if op == "Slice":
        data = shape_expr(g, node.input[0], depth + 1)
        consts = [g.constant(i) if i else None for i in node.input[1:]]
        if data is None or consts[0] is None or consts[1] is None:
            return None
        axes = consts[2] if len(consts) > 2 and consts[2] is not None else np.array([0])
        steps = consts[3] if len(consts) > 3 and consts[3] is not None else np.array([1])
        if axes.reshape(-1).tolist() not in ([0], [-1]) or steps.reshape(-1).tolist() != [1]:
            return None
        n = len(data)
        start, end = int(consts[0].reshape(-1)[0]), int(consts[1].reshape(-1)[0])
        start = max(0, min(n, start + n if start < 0 else start))
        end = max(0, min(n, end + n if end < 0 else end))
        return data[start:end]
    if op == "Gather" and int(_attr(node, "axis", 0)) == 0:  # type: ignore[arg-type]
        data, index = shape_expr(g, node.input[0], depth + 1), g.constant(node.input[1])
        if data is None or index is None:
            return None
        return [data[int(i)] for i in index.reshape(-1)]
    return None


def _settle(g: Graph) -> None:
    """Restore topological order (rewrites append nodes) and drop what became dead."""
    topological_sort(g.graph)
    g.reindex()
    g.prune()


def _bypass(g: Graph, node: onnx.NodeProto, value: str) -> None:
    """Remove `node` (one output) and make its consumers read `value` instead."""
    target = node.output[0]
    g.remove_nodes([node])
    g.rename_input(target, value)
    _settle(g)


def _collapse_one_chain(g: Graph, reshape2: onnx.NodeProto) -> bool:
    transpose = g.producer.get(reshape2.input[0])
    if transpose is None or transpose.op_type != "Transpose" or g.single_consumer(transpose.output[0]) is None:
        return False
    reshape1 = g.producer.get(transpose.input[0])
    if reshape1 is None or reshape1.op_type != "Reshape" or g.single_consumer(reshape1.output[0]) is None:
        return False
    x = reshape1.input[0]
    rank = g.rank(x)
    perm = list(_attr(transpose, "perm", []))  # type: ignore[arg-type]
    e1, e2 = shape_expr(g, reshape1.input[1]), shape_expr(g, reshape2.input[1])
    if rank is None or e1 is None or e2 is None or not perm:
        return False
    k = len(e1) - 1  # trailing dims kept; the leading ones are merged into e1[0]
    sx = [_dim(g, x, i) for i in range(rank)]
    if not (1 <= k < rank and e1[0] == -1 and e1[1:] == sx[rank - k:] and len(perm) == k + 1 and perm[0] == 0):
        return False
    expected = sx[: rank - k] + [sx[rank - k + p - 1] for p in perm[1:]]
    if len(e2) != rank or sum(1 for a in e2 if a == -1) > 1 or 0 in e2:
        return False
    if any(a != b and a != -1 for a, b in zip(e2, expected)):
        return False
    new_perm = list(range(rank - k)) + [rank - k + p - 1 for p in perm[1:]]
    node = onnx.helper.make_node("Transpose", [x], [reshape2.output[0]], name=g.fresh("attention_transpose"),
                                 perm=new_perm)
    g.remove_nodes([reshape1, transpose, reshape2])
    g.graph.node.append(node)
    _settle(g)
    return True


def _merge_one_transpose(g: Graph, outer: onnx.NodeProto) -> bool:
    inner = g.producer.get(outer.input[0])
    if inner is None or inner.op_type != "Transpose" or g.single_consumer(inner.output[0]) is None:
        return False
    p1, p2 = list(_attr(inner, "perm", [])), list(_attr(outer, "perm", []))  # type: ignore[arg-type]
    if not p1 or not p2 or len(p1) != len(p2):
        return False
    merged = [p1[i] for i in p2]
    source, target = inner.input[0], outer.output[0]
    if merged == list(range(len(merged))) and target not in g.outputs:
        g.remove_nodes([inner, outer])
        g.rename_input(target, source)
    else:
        node = onnx.helper.make_node("Transpose", [source], [target], name=g.fresh("merged_transpose"), perm=merged)
        g.remove_nodes([inner, outer])
        g.graph.node.append(node)
    _settle(g)
    return True


def _rewrite_all(g: Graph, op_type: str, rewrite) -> int:
    """Apply `rewrite` to nodes of `op_type` until none matches; return how many matched."""
    count = 0
    while any(rewrite(g, node) for node in list(g.graph.node) if node.op_type == op_type):
        count += 1
    return count


def _projection(g: Graph, value: str) -> tuple[onnx.NodeProto, onnx.NodeProto | None] | None:
    """(MatMul with a constant weight, its bias Add or None) that `value` is a pure layout view
    of, every step used only on this path."""
    node = g.producer.get(value)
    while node is not None and node.op_type in LAYOUT_OPS:
        if g.single_consumer(node.input[0]) is None:
            return None
        node = g.producer.get(node.input[0])
    if node is None:
        return None
    bias = None
    if node.op_type == "Add":
        a, b = node.input
        if g.constant(b) is not None and g.producer.get(a) is not None:
            bias, node = node, g.producer.get(a)
        elif g.constant(a) is not None and g.producer.get(b) is not None:
            bias, node = node, g.producer.get(b)
        else:
            return None
        if g.single_consumer(node.output[0]) is None:
            return None
    if node is None or node.op_type != "MatMul" or g.constant(node.input[1]) is None:
        return None
    return node, bias


def _scaled_constant(g: Graph, name: str, scale: np.ndarray) -> str:
    value = g.constant(name)
    assert value is not None
    return g.add_initializer((value * scale).astype(value.dtype), name.split("/")[-1] + "_scaled")


def _fold_one_scale(g: Graph, mul: onnx.NodeProto) -> bool:
    if mul.output[0] in g.outputs:
        return False
    for value, factor in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        scale = g.constant(factor)
        if scale is None or scale.size != 1 or scale.dtype.kind != "f" or g.single_consumer(value) is None:
            continue
        found = _projection(g, value)
        if found is None:
            continue
        matmul, bias = found
        matmul.input[1] = _scaled_constant(g, matmul.input[1], scale.reshape(()))
        if bias is not None:
            slot = 1 if g.constant(bias.input[1]) is not None else 0
            bias.input[slot] = _scaled_constant(g, bias.input[slot], scale.reshape(()))
        _bypass(g, mul, value)
        return True
    return False


# Ops that move or broadcast elements without changing any: a bound on the input holds for the
# output. Casts qualify only into types that neither overflow nor wrap what they are given
# (`_keeps_values`): fp32's finite minimum cast to fp16 is -inf, and int64 cast to int8 wraps.
_MOVES_ELEMENTS = LAYOUT_OPS | {"Expand"}
# What fp32 or fp64 holds without wrapping (integers round, keeping their order and sign).
_CAST_SOURCES = frozenset({onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                           onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT64, onnx.TensorProto.INT32,
                           onnx.TensorProto.BOOL})


def _keeps_values(g: Graph, node: onnx.NodeProto) -> bool:
    """Whether `node` passes its first input's values through unchanged (up to rounding)."""
    if node.op_type in _MOVES_ELEMENTS:
        return True
    if node.op_type != "Cast":
        return False
    to = _attr(node, "to")
    source = g.types.get(node.input[0])
    if to == onnx.TensorProto.DOUBLE:
        return source in _CAST_SOURCES
    # a finite double beyond fp32's range is ±inf in fp32
    return to == onnx.TensorProto.FLOAT and source in _CAST_SOURCES and source != onnx.TensorProto.DOUBLE


def finite_scores(g: Graph, value: str, depth: int = 0) -> bool:
    """Whether `value` is finite by construction: a sum of MatMuls of activations (finite
    whenever the model's activations are), finite constants, `Where` choices between such
    terms, and their products with (and quotients by nonzero) finite constants, through layout
    ops and casts that keep values."""
    if depth > 12:
        return False
    const = g.constant(value)
    if const is not None:
        return const.dtype.kind in "iub" or bool(np.isfinite(const).all())
    node = g.producer.get(value)
    if node is None:
        return False
    op = node.op_type
    if op == "MatMul":
        return True
    if op == "Add":
        return all(finite_scores(g, v, depth + 1) for v in node.input)
    if op in ("Mul", "Div"):
        factor = g.constant(node.input[1])
        if factor is None or not np.isfinite(factor).all() or (op == "Div" and np.any(factor == 0)):
            return False
        return finite_scores(g, node.input[0], depth + 1)
    if op == "Where":
        return all(finite_scores(g, v, depth + 1) for v in node.input[1:])
    if _keeps_values(g, node):
        return finite_scores(g, node.input[0], depth + 1)
    return False


def lower_bound(g: Graph, value: str, depth: int = 0) -> float | None:
    """A number no element of the integer tensor `value` is below, when one is evident: a
    constant's minimum, or the start of an increasing `Range`, through layout ops and casts
    that keep values."""
    if depth > 12:
        return None
    const = g.constant(value)
    if const is not None:
        return float(const.min()) if const.size and const.dtype.kind in "iu" else None
    node = g.producer.get(value)
    if node is None:
        return None
    if node.op_type == "Range":
        start, delta = g.constant(node.input[0]), g.constant(node.input[2])
        if start is None or delta is None or start.size != 1 or delta.size != 1 or float(delta.reshape(())) <= 0:
            return None
        return float(start.reshape(()))
    if _keeps_values(g, node):
        return lower_bound(g, node.input[0], depth + 1)
    return None


def all_true(g: Graph, value: str, depth: int = 0) -> bool:
    """Whether the boolean tensor `value` is true everywhere, evidently: a constant, `And`s of
    such, and comparisons a `lower_bound` decides."""
    if depth > 12:
        return False
    const = g.constant(value)
    if const is not None:
        return const.dtype == np.bool_ and bool(const.all())
    node = g.producer.get(value)
    if node is None:
        return False
    if node.op_type == "And":
        return all(all_true(g, v, depth + 1) for v in node.input)
    if node.op_type in ("GreaterOrEqual", "Greater"):
        low, limit = lower_bound(g, node.input[0]), g.constant(node.input[1])
        if low is None or limit is None or limit.size == 0:
            return False
        return low >= float(limit.max()) if node.op_type == "GreaterOrEqual" else low > float(limit.max())
    return False


def _adds_keep_their_shape(g: Graph, mask: str, dropped: str) -> bool:
    """Whether `mask` reaches only `Where` conditions whose choices feed only `Add`s into whose
    other operand the `dropped` term broadcasts without widening it (each of its dims is 1 or
    the other operand's same dim), so the mask without that term gives the same sums."""
    wheres = g.consumers.get(mask, [])
    narrow = g.shapes.get(dropped)
    if not wheres or mask in g.outputs or narrow is None:
        return False
    for where in wheres:
        if where.op_type != "Where" or list(where.input).count(mask) != 1 or where.input[0] != mask:
            return False
        adds = g.consumers.get(where.output[0], [])
        if not adds or where.output[0] in g.outputs:
            return False
        for add in adds:
            if add.op_type != "Add" or list(add.input).count(where.output[0]) != 1:
                return False
            other = g.shapes.get(add.input[1] if add.input[0] == where.output[0] else add.input[0])
            if other is None or len(narrow) > len(other):
                return False
            if any(d != 1 and (d is None or d != o) for d, o in zip(narrow, other[len(other) - len(narrow):])):
                return False
    return True


def _narrow_one_mask(g: Graph, node: onnx.NodeProto) -> bool:
    if node.output[0] in g.outputs:
        return False
    for kept, dropped in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        if all_true(g, dropped) and _adds_keep_their_shape(g, node.output[0], dropped):
            _bypass(g, node, kept)
            return True
    return False


def _remove_one_nan_guard(g: Graph, where: onnx.NodeProto) -> bool:
    condition, zero, probabilities = where.input
    is_nan = g.producer.get(condition)
    softmax = g.producer.get(probabilities)
    fill = g.constant(zero)
    if (is_nan is None or is_nan.op_type != "IsNaN" or is_nan.input[0] != probabilities or softmax is None
            or softmax.op_type != "Softmax" or fill is None or np.any(fill != 0)
            or where.output[0] in g.outputs or not finite_scores(g, softmax.input[0])):
        return False
    _bypass(g, where, probabilities)
    return True


class SimplifyAttention(OnnxPass):
    name: ClassVar[str] = "onnx_simplify_attention"
    description: ClassVar[str] = ("collapse K-transpose chains, merge transposes, fold softmax scales into Q/K, "
                                   "drop softmax NaN guards over finite scores, narrow always-true mask terms")

    def run(self, model: onnx.ModelProto, ctx: OnnxPassContext) -> tuple[onnx.ModelProto, dict[str, int]]:
        g = Graph(model)
        counts = {
            "transpose_chains": _rewrite_all(g, "Reshape", _collapse_one_chain),
            "transposes_merged": _rewrite_all(g, "Transpose", _merge_one_transpose),
            "scales_folded": _rewrite_all(g, "Mul", _fold_one_scale),
            "nan_guards_removed": _rewrite_all(g, "Where", _remove_one_nan_guard),
            "masks_narrowed": _rewrite_all(g, "And", _narrow_one_mask),
        }
        if any(counts.values()):
            # Shapes of rewritten values may have changed: recompute them.
            del model.graph.value_info[:]
            model = onnx.shape_inference.infer_shapes(model)
        return model, counts
