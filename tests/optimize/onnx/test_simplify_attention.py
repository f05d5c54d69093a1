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
    assert counts == {"transpose_chains": 6, "transposes_merged": 6, "scales_folded": 12}, "6 layers: one K chain, one Q and one K scale each"
    onnx.checker.check_model(model, full_check=True)
    assert len(model.graph.node) <= nodes_before - 60
    assert op_types(model).count("Shape") < shapes_before, "the K-transpose shape arithmetic is gone"
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
