import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from optimize.onnx import OnnxPassContext
from optimize.onnx.simplify_attention import SimplifyAttention
from optimize.onnx.graph import Graph
from optimize.onnx.mixed_precision import KEEP_OPS, MixedPrecision
from optimize.runtime.config import CompileConfig
from optimize.runtime.specs import Dim, TensorSpec
from tests.optimize.onnx.helpers import embedding_cosines, run_ort


def _input_types(model: onnx.ModelProto, op_type: str) -> set[int]:
    g = Graph(model)
    return {g.types[i] for n in g.graph.node if n.op_type == op_type for i in n.input[:1] if i in g.types}


def test_minilm_fp16_keeps_norms_softmax_reductions_and_the_mask_in_fp32(minilm_onnx, pass_context, minilm_source,
                                                                         sentence_batches):
    ctx = pass_context("fp16")
    model, _ = SimplifyAttention().run(minilm_onnx, ctx)
    model, counts = MixedPrecision().run(model, ctx)
    onnx.checker.check_model(model, full_check=True)
    for op in ("LayerNormalization", "Softmax", "ReduceSum", "ReduceL2"):
        assert _input_types(model, op) == {TensorProto.FLOAT}, f"{op} computes in fp32"
    assert _input_types(model, "MatMul") == {TensorProto.FLOAT16}, "every projection computes in fp16"
    weights = [t for t in model.graph.initializer if len(t.dims) == 2 and t.data_type != TensorProto.INT64]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in model.graph.output), "fp32 output contract"
    islands = ctx.record["fp32_nodes"]
    # The exporter's attention bias is float32-min (-3.4e38): -inf in fp16, so the calibrated
    # range check keeps the mask and the score + mask additions in fp32.
    assert any(name.startswith("node_Where") for name in islands["overflow"]) and len(islands["overflow"]) == 7
    assert {"node_clamp", "node_clamp_min"} <= set(islands["underflow"]), "the 1e-9 pooling clamp is not 0"
    assert counts["fp32_op_nodes"] == len(islands["op"]) >= 13 + 6
    cos = embedding_cosines(model, minilm_source.module, sentence_batches)
    assert cos.min() > 0.9999


def _overflowing_model() -> onnx.ModelProto:
    """x @ W reaches ~1e5 (beyond fp16's 65504) before a LayerNormalization brings it back;
    W itself (|w| < 12000) is in range, so only calibration can see the overflow."""
    rng = np.random.default_rng(0)
    w = np.clip(rng.standard_normal((16, 32)) * 3000, -12000, 12000).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="big_matmul"),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], name="norm", axis=-1),
        helper.make_node("MatMul", ["n", "w2"], ["y"], name="out_matmul"),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(32, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(32, np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


# Uncalibrated, the fp16 MatMul overflows on purpose: numpy's warnings about it are the point.
@pytest.mark.filterwarnings("ignore:overflow encountered in dot:RuntimeWarning",
                            "ignore:invalid value encountered in reduce:RuntimeWarning")
@pytest.mark.parametrize("calibrated", [True, False], ids=["calibrated", "uncalibrated"])
def test_calibrated_range_check_keeps_an_overflowing_matmul_in_fp32(tmp_path, calibrated):
    x = (np.random.default_rng(1).standard_normal((4, 16)) * 10).astype(np.float32)
    model = _overflowing_model()
    expected = run_ort(model, {"x": x})["y"]
    spec = TensorSpec("x", "float32", (Dim("batch", 1, 4, 4), 16))
    samples = (lambda: [{"x": torch.from_numpy(x)}]) if calibrated else None
    ctx = OnnxPassContext(CompileConfig(precision="fp16", max_batch=4), [spec], [], "tensorrt", tmp_path, samples=samples)
    converted, counts = MixedPrecision().run(model, ctx)
    # ONNX's reference evaluator computes fp16 ops in fp16; ONNX Runtime's CPU provider runs
    # fp16 MatMuls in fp32 behind inserted casts and would hide the overflow.
    got = ReferenceEvaluator(converted).run(None, {"x": x})[0]
    if calibrated:
        assert "big_matmul" in ctx.record["fp32_nodes"]["overflow"]
        assert "out_matmul" not in ctx.record["fp32_nodes"].get("overflow", []), "in-range work stays fp16"
        np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2)
    else:  # without samples only constants are checked: the overflow reaches the output
        assert "overflow" not in ctx.record["fp32_nodes"]
        assert not np.isfinite(got).all()


def test_bf16_needs_no_range_check_but_keeps_the_same_fp32_ops(minilm_onnx, pass_context):
    ctx = pass_context("bf16")
    model, counts = MixedPrecision().run(minilm_onnx, ctx)
    onnx.checker.check_model(model, full_check=True)
    assert ctx.record["fp16_range_check"].startswith("not needed")
    assert counts["fp32_overflow_nodes"] == 0
    assert _input_types(model, "MatMul") == {TensorProto.BFLOAT16}
    assert _input_types(model, "LayerNormalization") == {TensorProto.FLOAT}
    kept = {n for names in ctx.record["fp32_nodes"].values() for n in names}
    assert all(n.op_type in KEEP_OPS for n in model.graph.node if n.name in kept)


def test_fp32_precision_skips_the_pass(pass_context):
    assert MixedPrecision().applies(pass_context("fp32")) == "precision is fp32"
    assert MixedPrecision().applies(pass_context("int8", quantized_fallback="fp16")) == ""
