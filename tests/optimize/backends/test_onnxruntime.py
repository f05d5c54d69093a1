"""Backend `onnxruntime`: execution providers, ORT fusions, int8 judged on real sentences."""

import json
from pathlib import Path

import numpy as np
import pytest

import optimize
from optimize.runtime.backends.onnxruntime import session_providers
from optimize.runtime.errors import EngineError


def test_providers_are_preferred_tensorrt_then_cuda_then_cpu(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"])
    assert session_providers() == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert session_providers(["CUDAExecutionProvider"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert session_providers() == ["CPUExecutionProvider"]
    with pytest.raises(EngineError, match="has no CUDAExecutionProvider; available: CPUExecutionProvider"):
        session_providers(["CUDAExecutionProvider"])


def test_fp32_engine_runs_ort_fusions_and_is_judged_on_random_inputs_and_sentences(minilm_engine_dir: Path):
    manifest = json.loads((minilm_engine_dir / "manifest.json").read_text())
    fusions = next(p for p in manifest["passes"] if p["pass"] == "onnx_ort_fusions")
    assert fusions["matches"]["attention"] == 6 and fusions["matches"]["skip_layer_normalization"] == 12
    accuracy = manifest["accuracy"]
    assert accuracy["judged_on"] == ["random inputs", "real samples"]
    assert accuracy["samples"]["min_cosine"] > 0.9999 and len(accuracy["samples"]["shapes"]) >= 2


@pytest.fixture(scope="module")
def int8_dynamic(tmp_path_factory, minilm_model_dir: Path):
    # all-MiniLM-L6-v2 under dynamic int8: real sentences ≥ 0.99 but "Good morning!" 0.983 (see
    # tests/optimize/onnx/test_quantize.py), hence a tolerance of 0.98 here.
    config = optimize.CompileConfig(backend="onnxruntime", precision="int8-weight", max_batch=4, max_seq=32,
                                    tolerance=optimize.Tolerance(max_abs_error=1.0, min_cosine=0.98))
    return optimize.compile(minilm_model_dir, tmp_path_factory.mktemp("int8") / "e", config)


def test_int8_is_judged_on_real_sentences_not_random_ids(int8_dynamic):
    accuracy = int8_dynamic.manifest.accuracy
    assert accuracy["judged_on"] == ["real samples"]
    assert accuracy["samples"]["per_output"]["sentence_embedding"]["min_cosine"] > 0.98
    assert accuracy["min_cosine"] < accuracy["samples"]["min_cosine"], "random ids exaggerate int8 error"
    assert int8_dynamic.manifest.build["quantization"]["mode"] == "dynamic"
    sims = int8_dynamic.run(int8_dynamic.pipeline.tokenize(
        ["A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."]
    ))["sentence_embedding"]
    sims = sims @ sims.T
    assert sims[0, 1] > 0.6 > 0.2 > max(sims[0, 2], sims[1, 2])


def test_quantized_precisions_are_judged_on_samples_and_others_on_both():
    from optimize.verify import AccuracyReport, judge

    random = AccuracyReport(max_abs_error=0.9, min_cosine=0.95, worst="output 'x' at {'batch': 2}")
    samples = AccuracyReport(max_abs_error=0.1, min_cosine=0.995)
    entry, failure = judge(random, samples, optimize.CompileConfig(precision="int8"))
    assert failure == "" and entry["judged_on"] == ["real samples"] and entry["min_cosine"] == 0.95
    _, failure = judge(random, samples, optimize.CompileConfig(precision="fp16"))
    assert failure.startswith("engine disagrees with fp32 eager on random inputs")
    bad = AccuracyReport(max_abs_error=0.1, min_cosine=0.9, worst="output 'y' on sample batch {'batch': 1}")
    _, failure = judge(samples, bad, optimize.CompileConfig(precision="int8-weight"))
    assert failure.startswith("engine disagrees with fp32 eager on real samples") and "output 'y'" in failure


def test_an_engine_loaded_with_threads_computes_with_that_many_and_the_same_answer(minilm_engine_dir: Path):
    # a Ray actor holding half of the machine loads its engine with threads=1
    own, one = optimize.runtime.load(minilm_engine_dir), optimize.runtime.load(minilm_engine_dir, threads=1)
    assert one._session.get_session_options().intra_op_num_threads == 1
    assert own._session.get_session_options().intra_op_num_threads == 0, "the engine's own choice: every core"
    feeds = one.pipeline.tokenize(["threads change the speed, not the answer"])
    ours, theirs = (np.asarray(e.run(feeds)["sentence_embedding"]) for e in (one, own))
    assert np.abs(ours - theirs).max() < 1e-5
    for bad in (0, -2, 1.5, True):
        with pytest.raises(EngineError, match="threads must be a whole number of at least 1"):
            optimize.runtime.load(minilm_engine_dir, threads=bad)
