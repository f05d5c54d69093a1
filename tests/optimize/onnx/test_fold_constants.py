import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimize.onnx.fold_constants import FoldConstants
from tests.optimize.onnx.helpers import op_types, run_ort


def _model_with_constant_subgraphs() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)  # stored transposed: Transpose is foldable
    inits = [
        numpy_helper.from_array(w.T.copy(), "w_t"),
        numpy_helper.from_array(np.float32(1.5), "a"),
        numpy_helper.from_array(np.float32(0.25), "b"),
        numpy_helper.from_array(rng.integers(-127, 127, (4, 4)).astype(np.int8), "q"),
        numpy_helper.from_array(np.float32(0.01), "q_scale"),
    ]
    nodes = [
        helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Mul", ["h", "ab"], ["h2"]),
        helper.make_node("DequantizeLinear", ["q", "q_scale"], ["wq"]),
        helper.make_node("MatMul", ["h2", "wq"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_constant_subgraphs_are_folded_but_dequantize_is_kept():
    model = _model_with_constant_subgraphs()
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    expected = run_ort(model, {"x": x})["y"]
    folded, counts = FoldConstants().run(model, None)
    assert counts["folded"] == 2, "Transpose(weight) and Add(a, b) are computed offline"
    assert "Transpose" not in op_types(folded) and "Add" not in op_types(folded)
    assert "DequantizeLinear" in op_types(folded), "folding a DequantizeLinear would undo int8 weights"
    np.testing.assert_allclose(run_ort(folded, {"x": x})["y"], expected, rtol=1e-6, atol=1e-6)


def test_exported_minilm_has_nothing_left_to_fold(minilm_onnx):
    _, counts = FoldConstants().run(minilm_onnx, None)
    assert counts["folded"] == 0, "the dynamo exporter already folds; the pass must not invent work"
