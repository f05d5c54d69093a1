import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimize.onnx.simplify_attention import SimplifyAttention
from tests.optimize.onnx.helpers import op_types, run_ort


def test_minilm_attention_is_cleaned_up_without_changing_results(minilm_onnx, sentence_batches):
    expected = [run_ort(minilm_onnx, feeds) for feeds in sentence_batches]
    nodes_before, shapes_before = len(minilm_onnx.graph.node), op_types(minilm_onnx).count("Shape")
    model, counts = SimplifyAttention().run(minilm_onnx, None)
    assert counts == {"transpose_chains": 6, "transposes_merged": 6, "scales_folded": 12, "nan_guards_removed": 6,
                      "masks_narrowed": 1}, "6 layers: one K chain, one Q and one K scale, one softmax NaN guard each; one mask"
    onnx.checker.check_model(model, full_check=True)
    assert len(model.graph.node) <= nodes_before - 60
    assert op_types(model).count("Shape") < shapes_before, "the K-transpose shape arithmetic is gone"
    assert "IsNaN" not in op_types(model), "the exporter's masks fill with a finite minimum: no guard is needed"
    assert "And" not in op_types(model), "the padding mask alone reaches the scores, [batch, 1, 1, keys]"
    assert sum(1 for n in model.graph.node if n.op_type == "Transpose"
               and list(n.attribute[0].ints) == [0, 2, 3, 1]) == 6, "K goes straight to [batch, heads, dim, seq]"
    for feeds, want in zip(sentence_batches, expected):
        for name, got in run_ort(model, feeds).items():
            np.testing.assert_allclose(got, want[name], rtol=1e-4, atol=2e-5)


def _chain(reshape1: list[int], perm: list[int], reshape2: list[int]) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Reshape", ["x", "s1"], ["r1"]),
        helper.make_node("Transpose", ["r1"], ["t"], perm=perm),
        helper.make_node("Reshape", ["t", "s2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(reshape1, np.int64), "s1"),
             numpy_helper.from_array(np.array(reshape2, np.int64), "s2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


@pytest.mark.parametrize(
    "reshape1, perm, reshape2, collapses",
    [
        ([-1, 4, 5], [0, 2, 1], [2, 3, 5, 4], True),  # flatten, swap trailing dims, unflatten: a transpose
        ([-1, 5, 4], [0, 2, 1], [2, 3, 4, 5], False),  # the first reshape reinterprets memory: not one
        ([-1, 4, 5], [0, 2, 1], [3, 2, 5, 4], False),  # leading dims come back in another order: not one
    ],
    ids=["transpose", "reinterpreting-reshape", "reordered-leading-dims"],
)
def test_reshape_transpose_reshape_collapses_only_when_it_is_a_transpose(reshape1, perm, reshape2, collapses):
    model = _chain(reshape1, perm, reshape2)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    expected = run_ort(model, {"x": x})["y"]
    rewritten, counts = SimplifyAttention().run(model, None)
    assert counts["transpose_chains"] == int(collapses)
    assert op_types(rewritten) == (["Transpose"] if collapses else ["Reshape", "Transpose", "Reshape"])
    np.testing.assert_array_equal(run_ort(rewritten, {"x": x})["y"], expected)


def _guarded_attention(fill: float, through_fp16: bool) -> onnx.ModelProto:
    """softmax(q·kᵀ + where(mask, 0, fill)) under torch's NaN guard, then ·v; the mask optionally
    cast to fp16 and back (fp32's finite minimum becomes -inf there)."""
    casts = [helper.make_node("Cast", ["bias"], ["bias16"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["bias16"], ["bias32"], to=TensorProto.FLOAT)] if through_fp16 else []
    nodes = [
        helper.make_node("MatMul", ["q", "k"], ["scores"]),
        helper.make_node("Where", ["mask", "zero", "fill"], ["bias"]),
        *casts,
        helper.make_node("Add", ["scores", "bias32" if through_fp16 else "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
        helper.make_node("IsNaN", ["p"], ["nan"]),
        helper.make_node("Where", ["nan", "zero", "p"], ["safe"]),
        helper.make_node("MatMul", ["safe", "v"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(fill, np.float32), "fill")]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [2, 4, 8]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [2, 8, 4]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 4, 8]),
              helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 1, 4])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


@pytest.mark.parametrize("fill, through_fp16, removed", [(float(np.finfo(np.float32).min), False, True),
                                                         (float("-inf"), False, False),
                                                         (float(np.finfo(np.float32).min), True, False)],
                         ids=["finite-mask", "infinite-mask", "finite-mask-made-infinite-by-fp16"])
def test_the_softmax_nan_guard_goes_only_where_no_row_can_be_nan(fill, through_fp16, removed):
    rng = np.random.default_rng()
    mask = rng.random((2, 1, 4)) < 0.6
    mask[1] = False  # every key masked for the second batch: -inf logits give NaN without the guard
    feeds = {"q": rng.standard_normal((2, 4, 8), np.float32), "k": rng.standard_normal((2, 8, 4), np.float32),
             "v": rng.standard_normal((2, 4, 8), np.float32), "mask": mask}
    model = _guarded_attention(fill, through_fp16)
    expected = run_ort(model, feeds)["y"]
    rewritten, counts = SimplifyAttention().run(model, None)
    assert counts["nan_guards_removed"] == int(removed)
    assert ("IsNaN" in op_types(rewritten)) != removed
    got = run_ort(rewritten, feeds)["y"]
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, expected)


def _padding_and_query_mask(least: int) -> onnx.ModelProto:
    """scores + where(padding & (arange(seq) >= least), 0, min): transformers' encoder mask at 0."""
    low = float(np.finfo(np.float32).min)
    nodes = [
        helper.make_node("Shape", ["scores"], ["shape"], start=2, end=3),
        helper.make_node("Squeeze", ["shape"], ["seq"]),
        helper.make_node("Range", ["start", "seq", "one"], ["positions"]),
        helper.make_node("Unsqueeze", ["positions", "axes"], ["queries"]),
        helper.make_node("GreaterOrEqual", ["queries", "least"], ["ge"]),
        helper.make_node("And", ["padding", "ge"], ["mask"]),
        helper.make_node("Where", ["mask", "zero", "low"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "start"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array(least, np.int64), "least"),
             numpy_helper.from_array(np.array([0, 1, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(low, np.float32), "low")]
    inputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2, "seq", "seq"]),
              helper.make_tensor_value_info("padding", TensorProto.BOOL, ["batch", 1, 1, "seq"])]
    # the exporter names the query axis as torch knew it: the mask's sequence length
    known = [helper.make_tensor_value_info("queries", TensorProto.INT64, [1, 1, "seq", 1]),
             helper.make_tensor_value_info("ge", TensorProto.BOOL, [1, 1, "seq", 1])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
                              value_info=known)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


@pytest.mark.parametrize("least, narrowed", [(0, True), (1, False)], ids=["always-true", "false-at-first-query"])
def test_an_always_true_mask_term_goes_and_the_sums_stay(least, narrowed):
    rng = np.random.default_rng()
    seq = int(rng.integers(2, 9))
    feeds = {"scores": rng.standard_normal((3, 2, seq, seq), np.float32),
             "padding": rng.random((3, 1, 1, seq)) < 0.7}
    model = _padding_and_query_mask(least)
    expected = run_ort(model, feeds)["y"]
    rewritten, counts = SimplifyAttention().run(model, None)
    assert counts["masks_narrowed"] == int(narrowed)
    assert ("And" in op_types(rewritten)) != narrowed
    np.testing.assert_array_equal(run_ort(rewritten, feeds)["y"], expected)
