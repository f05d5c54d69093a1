import re

import numpy as np
import onnx
import pytest

from optimize.onnx.graph import Graph
from optimize.onnx.quantize import Quantize
from optimize.onnx.sensitivity import activation_sqnr
from tests.optimize.onnx.helpers import embedding_cosines


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def start(self, stage, total=None):
        self.events.append(("start", f"{stage}|{total}"))

    def advance(self, detail=""):
        self.events.append(("advance", detail))

    def finish(self, stage, seconds):
        self.events.append(("finish", stage))


def _scales(model: onnx.ModelProto, op_type: str) -> dict[str, np.ndarray]:
    g = Graph(model)
    return {n.input[0]: g.constant(n.input[1]) for n in g.graph.node if n.op_type == op_type}


@pytest.fixture(scope="module")
def static_int8(minilm_export, minilm_source, tmp_path_factory):
    """MiniLM with TensorRT-style int8 Q/DQ (symmetric), percentile and min/max calibrated."""
    from optimize.runtime.config import CompileConfig
    from optimize.onnx import OnnxPassContext
    from optimize.samples import calibration_feeds

    models, records, reporters = {}, {}, {}
    for method in ("percentile", "minmax"):
        config = CompileConfig(max_batch=4, max_seq=32, precision="int8", calibration_method=method)
        reporters[method] = Recorder()
        ctx = OnnxPassContext(config, minilm_source.inputs, minilm_export[1], "tensorrt", tmp_path_factory.mktemp(method),
                              samples=lambda: calibration_feeds(minilm_source, config), reporter=reporters[method],
                              options={"int8_activations": "int8"})
        models[method], counts = Quantize().run(onnx.ModelProto.FromString(minilm_export[0].SerializeToString()), ctx)
        records[method] = (ctx.record["quantization"], counts)
    return models, records, reporters


def test_static_int8_quantizes_weight_matmuls_per_channel_and_activations_per_tensor(static_int8):
    models, records, _ = static_int8
    model = models["percentile"]
    record, counts = records["percentile"]
    assert counts["matmuls_quantized"] == 36 and counts["activation_matmuls_kept"] == 12, "6 layers × (Q, K, V, O, FFN up, FFN down)"
    assert record["activations"] == "int8 symmetric" and record["calibration"] == "percentile"
    g = Graph(model)
    for node in g.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        value, scale, zero = (g.constant(i) if i else None for i in [*node.input, ""][:3])
        if value is not None and value.ndim == 2:  # a weight: one scale per output column
            axis = next(a.i for a in node.attribute if a.name == "axis")
            assert value.dtype == np.int8 and axis == 1 and scale.shape == (value.shape[1],)
        else:  # an activation: one scale, zero point 0 (TensorRT takes symmetric int8 only)
            assert scale.size == 1 and (zero is None or (zero.dtype == np.int8 and zero.item() == 0))
    assert not any(n.op_type == "QuantizeLinear" and g.consumers.get(n.output[0], [None])[0] is None for n in g.graph.node)


def test_percentile_calibration_clips_what_minmax_keeps(static_int8):
    models, _, _ = static_int8
    percentile, minmax = (_scales(models[m], "QuantizeLinear") for m in ("percentile", "minmax"))
    assert percentile.keys() == minmax.keys() and len(percentile) == 24
    ratios = np.array([float(percentile[k]) / float(minmax[k]) for k in percentile])
    assert (ratios <= 1.0 + 1e-6).all(), "a percentile range never exceeds the observed range"
    assert (ratios < 0.99).any(), "and clips the outliers of at least one activation"


def test_calibration_reports_progress_per_batch(static_int8):
    _, records, reporters = static_int8
    events = reporters["percentile"].events
    batches = records["percentile"][0]["batches"]
    assert events[0][0] == "start" and events[0][1].startswith("calibrate int8 (percentile")
    assert sum(1 for kind, _ in events if kind == "advance") == batches
    assert events[-1][0] == "finish"


def test_weight_only_int8_dequantizes_weights_and_keeps_activations_float(minilm_onnx, pass_context, minilm_source,
                                                                         sentence_batches):
    model, counts = Quantize().run(minilm_onnx, pass_context("int8-weight", int8_weight_mode="weight_only"))
    assert counts == {"matmuls_quantized": 36, "quantize_nodes": 0, "dequantize_nodes": 36, "activation_matmuls_kept": 12}
    assert embedding_cosines(model, minilm_source.module, sentence_batches).min() > 0.995  # "Good morning!": 0.998


def test_dynamic_int8_on_real_sentences_stays_above_0_99_but_for_a_greeting(minilm_onnx, pass_context, minilm_source,
                                                                            sentence_batches):
    model, counts = Quantize().run(minilm_onnx, pass_context("int8-weight", backend="onnxruntime",
                                                             int8_weight_mode="dynamic"))
    assert counts["matmuls_quantized"] == 36
    cosines = embedding_cosines(model, minilm_source.module, sentence_batches)
    assert cosines[:-1].min() > 0.99
    assert 0.97 < cosines[-1] < cosines[:-1].min(), "'Good morning!' (5 tokens) is int8's hardest case: 0.983 here"


def test_activation_sqnr_ranks_the_gelu_outputs_lowest(minilm_onnx, minilm_source):
    from optimize.samples import calibration_feeds

    from tests.optimize.onnx.shapes import CONFIG

    g = Graph(minilm_onnx)
    inputs = sorted({n.input[0] for n in g.graph.node if n.op_type == "MatMul" and g.constant(n.input[1]) is not None})
    sqnr = activation_sqnr(minilm_onnx, calibration_feeds(minilm_source, CONFIG)[:2], inputs, "int8")
    assert len(sqnr) == 24
    worst = min(sqnr, key=sqnr.get)
    assert worst.startswith("gelu"), "FFN down-projection inputs carry the outliers"
    assert all(5 < db < 60 for db in sqnr.values())


# --- fp8 (E4M3) --------------------------------------------------------------------------------

E4M3_HALF_STEP = 2.0**-4  # round to nearest with 3 mantissa bits: |error| <= 2^-4 |x| for normal values
E4M3_MIN_NORMAL = 2.0**-6


def _fp8_context(minilm_source, minilm_export, workdir, method="percentile", reporter=None, reference=None,
                 tolerance=None):
    from optimize.runtime.config import CompileConfig
    from optimize.onnx import OnnxPassContext
    from optimize.samples import calibration_feeds

    config = CompileConfig(max_batch=4, max_seq=32, precision="fp8", calibration_method=method, tolerance=tolerance)
    return OnnxPassContext(config, minilm_source.inputs, minilm_export[1], "tensorrt", workdir,
                           samples=lambda: calibration_feeds(minilm_source, config), reporter=reporter,
                           reference=reference)


def _fp8_values(g: Graph, name: str) -> np.ndarray:
    return g.constant(name).astype(np.float64)


@pytest.fixture(scope="module")
def fp8_minilm(minilm_export, minilm_source, tmp_path_factory):
    """MiniLM through the fp8 pass, percentile and min/max calibrated (no float fallback loop)."""
    models, records, reporters = {}, {}, {}
    for method in ("percentile", "minmax"):
        reporters[method] = Recorder()
        ctx = _fp8_context(minilm_source, minilm_export, tmp_path_factory.mktemp(f"fp8-{method}"), method,
                           reporters[method])
        models[method], counts = Quantize().run(onnx.ModelProto.FromString(minilm_export[0].SerializeToString()), ctx)
        records[method] = (ctx.record["quantization"], counts)
    return models, records, reporters


def test_fp8_puts_every_weight_matmul_behind_e4m3_qdq_and_keeps_attention_float(fp8_minilm):
    models, records, _ = fp8_minilm
    model = models["percentile"]
    record, counts = records["percentile"]
    assert counts == {"matmuls_quantized": 36, "quantize_nodes": 24, "dequantize_nodes": 60,
                      "activation_matmuls_kept": 12, "sensitive_matmuls_kept_float": 0}, \
        "36 weights, 24 distinct inputs (Q, K and V share theirs)"
    assert record == {"mode": "fp8", "format": "FLOAT8E4M3FN", "calibration": "percentile", "batches": 12,
                      "activations": "fp8 e4m3 per tensor", "weights": "fp8 e4m3 per output channel", "kept_float": []}
    fp8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    assert len(fp8) == 36 + 36 + 1, "weights, their zero points, one shared activation zero point"
    assert max(o.version for o in model.opset_import if o.domain == "") >= 19
    g = Graph(model)
    for node in g.graph.node:
        if node.op_type == "QuantizeLinear":
            assert g.types[node.input[2]] == onnx.TensorProto.FLOAT8E4M3FN and _fp8_values(g, node.input[2]) == 0
            scale = g.constant(node.input[1])
            assert scale.dtype == np.float32 and scale.size == 1 and scale > 0
            assert [c.op_type for c in g.consumers[node.output[0]]] == ["DequantizeLinear"]
        if node.op_type in ("MatMul", "Gemm"):
            producers = [g.producer.get(i) for i in node.input[:2]]
            quantized = [p is not None and p.op_type == "DequantizeLinear" for p in producers]
            assert quantized in ([True, True], [False, False]), "both operands in fp8 or neither"
    onnx.checker.check_model(model, full_check=True)


def test_fp8_weights_dequantize_to_within_e4m3_rounding_of_the_originals(fp8_minilm, minilm_export):
    original = Graph(minilm_export[0])
    weights = {n.name: original.constant(n.input[1]) for n in original.graph.node if n.op_type == "MatMul"}
    g = Graph(fp8_minilm[0]["percentile"])
    checked = 0
    for node in g.graph.node:
        dq = g.producer.get(node.input[1]) if node.op_type == "MatMul" else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        weight = weights[node.name].astype(np.float64)
        values, scale = _fp8_values(g, dq.input[0]), g.constant(dq.input[1]).astype(np.float64)
        assert next(a.i for a in dq.attribute if a.name == "axis") == 1 and scale.shape == (weight.shape[1],)
        np.testing.assert_allclose(scale, np.abs(weight).max(axis=0) / 448, rtol=1e-6)
        assert (np.abs(values).max(axis=0) == 448).all(), "each column's largest weight maps to E4M3's largest value"
        error = np.abs(values * scale - weight)
        normal = np.abs(weight) >= E4M3_MIN_NORMAL * scale
        assert (error[normal] <= E4M3_HALF_STEP * np.abs(weight[normal]) * (1 + 1e-6)).all()
        # subnormals are spaced 2^-9 apart, in units of the scale
        assert (error[~normal] <= 2.0**-10 * np.broadcast_to(scale, weight.shape)[~normal] * (1 + 1e-6)).all()
        assert 0 < error.mean() < E4M3_HALF_STEP * np.abs(weight).mean(), "rounded, and not to zero"
        checked += 1
    assert checked == 36


def test_fp8_minilm_on_onnxruntime_stays_within_cosine_0_99_on_held_out_sentences(fp8_minilm, minilm_source,
                                                                                 sentence_batches):
    cosines = embedding_cosines(fp8_minilm[0]["percentile"], minilm_source.module, sentence_batches)
    assert len(cosines) == 17
    # The fp8 tolerance is 0.98; held-out sentences score 0.995 ("Good morning!") to 0.999.
    assert cosines.min() > 0.99
    assert cosines.max() < 1 - 1e-5, "the embeddings went through fp8 rounding"


def test_fp8_percentile_calibration_clips_what_minmax_keeps(fp8_minilm):
    models, _, _ = fp8_minilm
    percentile, minmax = (_scales(models[m], "QuantizeLinear") for m in ("percentile", "minmax"))
    assert percentile.keys() == minmax.keys() and len(percentile) == 24
    ratios = np.array([float(percentile[k]) / float(minmax[k]) for k in percentile])
    assert (ratios <= 1.0 + 1e-6).all() and (ratios < 0.99).any()


def test_fp8_calibration_reports_progress_per_batch(fp8_minilm):
    _, records, reporters = fp8_minilm
    events = reporters["minmax"].events
    assert events[0] == ("start", "calibrate fp8 (minmax, 12 batches)|12")
    shapes = [detail for kind, detail in events if kind == "advance"]
    assert len(shapes) == records["minmax"][0]["batches"]
    assert all(re.fullmatch(r"[1-4]×[1-9][0-9]*", shape) for shape in shapes), "batch×seq of each batch"
    assert events[-1] == ("finish", "calibrate fp8 (minmax, 12 batches)")


def test_fp8_refuses_entropy_calibration_naming_the_methods_it_takes(minilm_onnx, minilm_source, minilm_export,
                                                                     tmp_path):
    from optimize.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="^calibration_method entropy is for int8; fp8 takes minmax or percentile$"):
        Quantize().run(minilm_onnx, _fp8_context(minilm_source, minilm_export, tmp_path, "entropy"))


def test_fp8_keeps_the_lowest_sqnr_matmuls_in_float_until_within_tolerance(minilm_onnx, minilm_source,
                                                                          minilm_export, tmp_path):
    from optimize.runtime.config import Tolerance

    # All 36 MatMuls in fp8 score 0.987 per token on the calibration samples: below 0.99.
    ctx = _fp8_context(minilm_source, minilm_export, tmp_path, reference=minilm_source.module,
                       tolerance=Tolerance(max_abs_error=1.0, min_cosine=0.99))
    model, counts = Quantize().run(minilm_onnx, ctx)
    record = ctx.record["quantization"]
    kept = record["kept_float"]
    assert 0 < len(kept) <= 18 and counts["sensitive_matmuls_kept_float"] == len(kept), "at most half"
    assert counts["matmuls_quantized"] == 36 - len(kept)
    assert record["calibration_samples_accuracy"]["min_cosine"] >= 0.99
    sqnr = record["activation_sqnr_db"]
    assert len(sqnr) == 24 and all(20 < db < 45 for db in sqnr.values())
    g = Graph(model)
    worst = next(iter(sqnr))
    assert {n.name for n in g.consumers[worst] if n.op_type == "MatMul"} <= set(kept), "the worst input went first"
    for node in g.graph.node:
        if node.name in kept:
            assert all(g.producer.get(i) is None or g.producer[i].op_type != "DequantizeLinear" for i in node.input)


@pytest.mark.parametrize("extra_op", [None, "ReduceMean"])
def test_fp8_on_a_tiny_opset_17_graph_matches_an_e4m3_reference(tmp_path, extra_op):
    """x[b, 13] @ W1[13, 7] → Gemm(·, W2[5, 7], transB) [→ ReduceMean(axes=[1])]: weights per
    output channel (axis 1 for MatMul, axis 0 for the transposed Gemm weight), inputs per tensor."""
    import ml_dtypes
    import torch

    from optimize.runtime.config import CompileConfig
    from optimize.onnx import OnnxPassContext
    from tests.optimize.onnx.helpers import run_ort

    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((13, 7)).astype(np.float32)
    w1[:, 3] *= 1e-3  # a column of small weights keeps its own scale
    w2 = rng.standard_normal((5, 7)).astype(np.float32)
    h = onnx.helper
    nodes = [h.make_node("MatMul", ["x", "w1"], ["hidden"], name="up"),
             h.make_node("Gemm", ["hidden", "w2"], ["gemm" if extra_op else "y"], name="down", transB=1)]
    if extra_op:  # its axes moved from an attribute to an input in opset 18: needs the version converter
        nodes.append(h.make_node("ReduceMean", ["gemm"], ["y"], name="mean", axes=[1], keepdims=1))
    graph = h.make_graph(nodes, "tiny", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 13])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 1 if extra_op else 5])],
                         [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    calibration = [rng.standard_normal((b, 13)).astype(np.float32) * 3 for b in (3, 5)]
    config = CompileConfig(precision="fp8", calibration_method="minmax")
    ctx = OnnxPassContext(config, [], [], "tensorrt", tmp_path, samples=lambda: [{"x": torch.from_numpy(c)}
                                                                                for c in calibration])
    quantized, counts = Quantize().run(model, ctx)

    assert counts["matmuls_quantized"] == 2 and counts["quantize_nodes"] == 2
    assert ctx.record["quantization"]["opset"].startswith("opset 17 → 19 (" + ("version converter: ReduceMean"
                                                                                  if extra_op else "bumped"))
    assert quantized.ir_version >= 9
    onnx.checker.check_model(quantized, full_check=True)
    g = Graph(quantized)
    dq = {g.consumers[n.output[0]][0].name: n for n in g.graph.node
          if n.op_type == "DequantizeLinear" and n.input[0] in g.initializers}
    q = {g.consumers[g.consumers[n.output[0]][0].output[0]][0].name: n for n in g.graph.node
         if n.op_type == "QuantizeLinear"}

    def fp8(x):
        return np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)

    references = {}
    for name, weight, axis in (("up", w1, 1), ("down", w2, 0)):
        node = dq[name]
        assert next(a.i for a in node.attribute if a.name == "axis") == axis
        scale = np.abs(weight).max(axis=1 - axis) / np.float32(448)
        np.testing.assert_array_equal(g.constant(node.input[1]), scale)
        values = np.clip(weight / np.expand_dims(scale, 1 - axis), -448, 448).astype(ml_dtypes.float8_e4m3fn)
        assert g.constant(node.input[0]).tobytes() == values.tobytes()
        references[name] = values.astype(np.float64) * np.expand_dims(scale, 1 - axis)
    x_amax = max(np.abs(c).max() for c in calibration)
    hidden_amax = max(np.abs(c @ w1).max() for c in calibration)
    x_scale, hidden_scale = (float(g.constant(q[n].input[1])) for n in ("up", "down"))
    np.testing.assert_allclose([x_scale, hidden_scale], [x_amax / 448, hidden_amax / 448], rtol=1e-5)

    x = rng.standard_normal((4, 13)).astype(np.float32) * 3
    hidden = fp8(x / x_scale) * x_scale @ references["up"]
    want = fp8(hidden / hidden_scale) * hidden_scale @ references["down"].T
    if extra_op:
        want = want.mean(axis=1, keepdims=True)
    got = run_ort(quantized, {"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    exact = (x @ w1 @ w2.T).mean(axis=1, keepdims=True) if extra_op else x @ w1 @ w2.T
    assert np.abs(got - exact).max() > 1e-4, "the output went through fp8 rounding"


def test_abs_histogram_percentile_is_at_most_one_bin_above_the_exact_one():
    from optimize.onnx.calibration import HIST_BINS_PER_OCTAVE, PERCENTILE, AbsHistogram

    rng = np.random.default_rng(3)
    parts = [rng.standard_t(3, size=n).astype(np.float32) * 0.7 for n in (100_003, 7, 54_321)]
    parts.append(np.zeros(129, np.float32))
    histogram = AbsHistogram()
    for part in parts:
        histogram.add(part)
    values = np.abs(np.concatenate(parts))
    for q in (50.0, 99.0, PERCENTILE):
        exact = np.percentile(values, q, method="inverted_cdf")
        assert exact <= histogram.percentile(q) <= exact * 2 ** (1 / HIST_BINS_PER_OCTAVE)
    assert histogram.max == values.max() and histogram.percentile(100) == values.max()
