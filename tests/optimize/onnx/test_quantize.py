import numpy as np
import onnx
import pytest

from optimize.onnx.graph import Graph
from optimize.onnx.quantize import Quantize, activation_sqnr
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
    from optimize.config import CompileConfig
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

    from tests.optimize.onnx.conftest import CONFIG

    g = Graph(minilm_onnx)
    inputs = sorted({n.input[0] for n in g.graph.node if n.op_type == "MatMul" and g.constant(n.input[1]) is not None})
    sqnr = activation_sqnr(minilm_onnx, calibration_feeds(minilm_source, CONFIG)[:2], inputs, symmetric=True)
    assert len(sqnr) == 24
    worst = min(sqnr, key=sqnr.get)
    assert worst.startswith("gelu"), "FFN down-projection inputs carry the outliers"
    assert all(5 < db < 60 for db in sqnr.values())
