"""Backend `openvino`: ONNX → OpenVINO, int8 through NNCF, fp32 really computed in fp32."""

from pathlib import Path

import pytest
import torch

import optimize
from optimize.backends.openvino import native_bf16
from optimize.runtime.errors import ConfigError

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'kiln[cpu-engines]')")


def test_fp32_engine_matches_eager_exactly_enough_and_bounds_its_dims(tmp_path: Path):
    engine = optimize.compile("tests.optimize.factories:tiny_tokens", tmp_path / "ov",
                              optimize.CompileConfig(backend="openvino", max_batch=4, max_seq=16))
    # OpenVINO would pick bf16 by itself on some CPUs (0.03 off on MiniLM); kiln pins f32.
    assert engine.manifest.accuracy["max_abs_error"] < 1e-4
    assert {p.name for p in (tmp_path / "ov").iterdir()} >= {"model.xml", "model.bin", "manifest.json"}
    import openvino as ov

    model = ov.Core().read_model(str(tmp_path / "ov" / "model.xml"))
    shape = model.inputs[0].get_partial_shape()
    assert (shape[0].get_min_length(), shape[0].get_max_length()) == (1, 4), "TensorSpec ranges bound the dims"
    assert (shape[1].get_min_length(), shape[1].get_max_length()) == (1, 16)
    from tests.optimize.factories import TinyTokenModel

    reference = TinyTokenModel().eval()
    # With OpenVINO's CPU shape cache on, this graph is wrong at [4, 16] when the engine's first
    # call was at [1, 1] (SHAPE_CACHE_UNSAFE_OPS): kiln turns it off here, and every shape stays exact.
    assert not engine.shape_cache
    for shape in [(1, 1), (4, 16), (1, 16), (3, 11), (4, 16)]:
        ids = torch.randint(0, 50, shape)
        torch.testing.assert_close(engine.run({"ids": ids})["output_0"], reference(ids)[0], rtol=1e-4, atol=1e-4)


def test_a_bert_graph_keeps_the_shape_cache_and_stays_exact_across_shapes(tmp_path: Path):
    import transformers

    from tests.optimize.hf_random import TINY_BERT, hf_dir

    source = hf_dir("bert", 1, **TINY_BERT)
    engine = optimize.compile(source, tmp_path / "ov", optimize.CompileConfig(backend="openvino", max_batch=4, max_seq=16))
    assert engine.shape_cache, "MatMul-Softmax-MatMul attention: alternating shapes are prepared once"
    model = transformers.AutoModel.from_pretrained(source).eval()
    answers = []
    for batch, seq in [(1, 1), (4, 16), (1, 16), (2, 7), (4, 16)]:
        ids = torch.randint(0, 1000, (batch, seq))
        feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            expected = model(**feeds).last_hidden_state
        got = engine.run({s.name: feeds[s.name] for s in engine.manifest.inputs})["last_hidden_state"]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        answers.append((got, got.clone()))
    for got, copy in answers:
        assert torch.equal(got, copy), "an answer is the caller's: later calls do not write into it"


def test_int8_weight_compression_is_judged_on_real_sentences(tmp_path: Path, minilm_model_dir: Path):
    config = optimize.CompileConfig(backend="openvino", precision="int8-weight", max_batch=4, max_seq=32)
    engine = optimize.compile(minilm_model_dir, tmp_path / "ov8", config)
    accuracy = engine.manifest.accuracy
    assert accuracy["judged_on"] == ["real samples"] and accuracy["samples"]["min_cosine"] > 0.99
    assert engine.manifest.build["quantization"]["mode"] == "weight_only"
    assert (tmp_path / "ov8" / "model.bin").stat().st_size < 40 << 20, "int8 weights: ~4x smaller than fp32's 90 MB"


def test_unknown_hint_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="hint must be one of latency, throughput"):
        optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e",
                         optimize.CompileConfig(backend="openvino", backend_options={"hint": "fastest"}))


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16 (AVX512_BF16 or AMX)")
def test_bf16_engine_really_computes_in_bf16_and_keeps_minilm_close(tmp_path: Path, minilm_model_dir: Path):
    config = optimize.CompileConfig(backend="openvino", precision="bf16", max_batch=4, max_seq=32)
    engine = optimize.compile(minilm_model_dir, tmp_path / "ovbf16", config)
    assert engine._whole.model.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
    accuracy = engine.manifest.accuracy
    # bf16 rounding is visible (an fp32 engine is within 1e-5) yet the embeddings stay fp32-close
    assert 1e-3 < accuracy["samples"]["max_abs_error"] < 0.2
    assert accuracy["samples"]["min_cosine"] > 0.9995


def test_bf16_is_refused_where_the_cpu_would_emulate_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import optimize.backends.openvino as backend

    monkeypatch.setattr(backend, "native_bf16", lambda device="CPU": False)
    assert "bf16" not in backend.OpenVINOBackend().native_precisions()
    with pytest.raises(ConfigError, match="bf16 only on CPUs with native bf16"):
        optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e",
                         optimize.CompileConfig(backend="openvino", precision="bf16"))


def _tiny_bert_int8(tmp_path: Path, min_cosine: float, **options: object) -> optimize.Engine:
    from optimize.runtime.config import Tolerance
    from tests.optimize.hf_random import TINY_BERT, hf_dir

    config = optimize.CompileConfig(backend="openvino", precision="int8", max_batch=2, max_seq=16,
                                    backend_options=options,
                                    tolerance=Tolerance(max_abs_error=float("inf"), min_cosine=min_cosine))
    return optimize.compile(hf_dir("bert", 2, **TINY_BERT), tmp_path / "ov-int8", config)


def test_int8_keeps_the_costliest_matmuls_in_float_until_the_guard_is_met(tmp_path: Path):
    engine = _tiny_bert_int8(tmp_path, 0.99995)
    quantization = engine.manifest.build["quantization"]
    kept = quantization["kept_in_float"]
    assert quantization["calibration_cosine_all_int8"] < 0.99995, "all-int8 misses the guard, so layers are kept"
    assert kept["matmuls"] and kept["quantized"] > 0, "some MatMuls stay int8, the costliest go to float"
    assert kept["calibration_cosine"] >= 0.99995 and len(kept["steps"]) >= 1
    import openvino as ov

    model = ov.Core().read_model(str(tmp_path / "ov-int8" / "model.xml"))
    fake_quantized = {t.get_node().get_friendly_name() for op in model.get_ordered_ops()
                      if op.get_type_name() == "FakeQuantize" for t in op.output(0).get_target_inputs()}
    assert not fake_quantized & set(kept["matmuls"]), "kept MatMuls read no quantized activation"
    assert engine.manifest.accuracy["min_cosine"] >= 0.99995
    # what is not int8 computes in bf16 where the CPU has it natively, and the engine loads so
    expected = "bf16" if native_bf16() else "f32"
    assert quantization["float_compute"] == expected
    assert engine._whole.model.get_property("INFERENCE_PRECISION_HINT").to_string() == expected


def test_int8_is_refused_by_name_when_no_selection_reaches_the_guard(tmp_path: Path):
    from optimize.runtime.errors import AccuracyError

    with pytest.raises(AccuracyError, match="int8 cannot reach cosine 1.0 on the calibration texts"):
        _tiny_bert_int8(tmp_path, 1.0, int8_smooth_quant=0.8)
