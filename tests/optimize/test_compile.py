import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import optimize
from optimize.runtime.errors import AccuracyError, ConfigError, EngineError
from optimize.runtime.manifest import FORMAT_VERSION

SENTENCES = ["A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."]


def test_minilm_manifest_records_how_the_engine_was_made(minilm_engine_dir: Path):
    manifest = json.loads((minilm_engine_dir / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["backend"] == "onnxruntime"
    assert manifest["source"]["kind"] == "huggingface" and manifest["source"]["digest"].startswith("sha256:")
    assert manifest["config"]["max_batch"] == 8 and manifest["config"]["max_seq"] == 64
    assert [s["name"] for s in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert [s["name"] for s in manifest["outputs"]] == ["last_hidden_state", "sentence_embedding"]
    assert manifest["outputs"][0]["shape"][2] == 384
    accuracy = manifest["accuracy"]
    assert accuracy["max_abs_error"] <= accuracy["tolerance"]["max_abs_error"]
    assert accuracy["min_cosine"] >= accuracy["tolerance"]["min_cosine"]
    assert len(accuracy["shapes"]) >= 3
    assert {"batch": 8, "seq": 64} in accuracy["shapes"] and {"batch": 1, "seq": 1} in accuracy["shapes"]
    assert manifest["environment"]["torch"] == torch.__version__
    assert all((minilm_engine_dir / rel).is_file() for rel in manifest["payload"])


def test_minilm_engine_matches_sentence_transformers_on_real_sentences(minilm_engine_dir: Path, minilm_model_dir: Path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    engine = optimize.load(minilm_engine_dir)
    feeds = engine.pipeline.tokenize(SENTENCES)
    got = engine.run(feeds)["sentence_embedding"]
    reference = sentence_transformers.SentenceTransformer(str(minilm_model_dir), device="cpu").encode(SENTENCES)
    np.testing.assert_allclose(got, reference, atol=1e-5)
    sims = got @ got.T
    assert sims[0, 1] > 0.6 > 0.2 > max(sims[0, 2], sims[1, 2])


def test_engine_runs_on_torch_and_numpy_and_returns_the_same_kind(minilm_engine_dir: Path):
    engine = optimize.load(minilm_engine_dir)
    feeds = engine.pipeline.tokenize(SENTENCES[:2])
    out_np = engine.run(feeds)
    out_torch = engine.run({k: torch.from_numpy(v) for k, v in feeds.items()})
    assert isinstance(out_np["sentence_embedding"], np.ndarray)
    assert isinstance(out_torch["sentence_embedding"], torch.Tensor)
    np.testing.assert_array_equal(out_np["sentence_embedding"], out_torch["sentence_embedding"].numpy())


@pytest.mark.parametrize(
    "feeds, message",
    [
        (lambda f: {"input_ids": f["input_ids"]}, "missing input"),
        (lambda f: {**f, "input_ids": f["input_ids"].astype(np.int32)}, "dtype int32, expected int64"),
        (lambda f: {k: np.tile(v, (1, 40)) for k, v in f.items()}, "allowed range is [1, 64]"),
        (lambda f: {**f, "input_ids": f["input_ids"] + 40000}, "outside the allowed range [0, 30521]"),
        (lambda f: {**f, "attention_mask": f["attention_mask"][:1]}, "batch size 1"),
    ],
    ids=["missing", "dtype", "too-long", "out-of-vocab", "batch-mismatch"],
)
def test_engine_rejects_inputs_outside_its_specs(minilm_engine_dir: Path, feeds, message):
    engine = optimize.load(minilm_engine_dir)
    good = engine.pipeline.tokenize(SENTENCES[:2])
    with pytest.raises(EngineError) as info:
        engine.run(feeds(good))
    assert message in str(info.value)


def test_eager_engine_keeps_weights_in_safetensors_not_the_archive(tmp_path: Path):
    engine = optimize.compile("tests.optimize.factories:tiny_tokens", tmp_path / "e",
                              optimize.CompileConfig(backend="eager", max_batch=4, max_seq=16))
    names = zipfile.ZipFile(tmp_path / "e" / "program.pt2").namelist()
    archive = zipfile.ZipFile(tmp_path / "e" / "program.pt2")
    weight_bytes = sum(archive.getinfo(n).file_size for n in names if "/weights/weight_" in n)
    assert weight_bytes == 0, "the archive holds only meta placeholders for the weights"
    pickled = [n for n in names if n.endswith((".pt", ".pkl", ".pickle")) and archive.getinfo(n).file_size > 0]
    assert not pickled, "nothing in the archive is pickled (torch.export would pickle the example inputs)"
    with safe_open(str(tmp_path / "e" / "weights.safetensors"), "pt") as f:
        assert "embed.weight" in set(f.keys()) or any(k.endswith("embed.weight") for k in f.keys())
    ids = torch.randint(0, 50, (3, 11))
    from tests.optimize.factories import TinyTokenModel

    expected = TinyTokenModel().eval()(ids)
    got = engine.run({"ids": ids})
    torch.testing.assert_close(got["output_0"], expected[0])
    torch.testing.assert_close(got["output_1"], expected[1])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_eager_reduced_precision_stays_within_tolerance_with_fp32_outputs(tmp_path: Path, precision: str):
    engine = optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / precision,
                              optimize.CompileConfig(backend="eager", precision=precision, max_batch=8))
    assert engine.outputs[0].dtype == "float32"
    out = engine.run({"x": torch.randn(5, 16)})["output"]
    assert out.dtype == torch.float32 and out.shape == (5, 4)
    assert engine.manifest.accuracy["max_abs_error"] > 0, "a reduced precision really ran"


def test_onnxruntime_engine_of_a_factory_accepts_every_batch_in_range(tmp_path: Path):
    engine = optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "ort",
                              optimize.CompileConfig(backend="onnxruntime", max_batch=8))
    import onnx

    model = onnx.load(str(tmp_path / "ort" / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    from tests.optimize.factories import tiny_mlp

    reference = tiny_mlp()[0].eval()  # same seed, same weights as the compiled model
    for batch in (1, 5, 8):
        x = torch.randn(batch, 16)
        torch.testing.assert_close(engine.run({"x": x})["output"], reference(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(EngineError, match=r"allowed range is \[1, 8\]"):
        engine.run({"x": torch.randn(9, 16)})


def test_accuracy_outside_tolerance_fails_and_leaves_no_engine(tmp_path: Path):
    impossible = optimize.Tolerance(max_abs_error=0.0, min_cosine=1.0)
    config = optimize.CompileConfig(backend="eager", precision="bf16", max_batch=4, tolerance=impossible)
    with pytest.raises(AccuracyError, match="disagrees with fp32 eager"):
        optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e", config)
    assert not (tmp_path / "e").exists()
    assert [p.name for p in tmp_path.iterdir()] == [], "the staging directory was removed"


def test_unsupported_precision_for_backend_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"supports precision fp16, fp32, int8, int8-weight; got .bf16."):
        optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e",
                         optimize.CompileConfig(backend="onnxruntime", precision="bf16"))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "triton"])
def test_fp8_on_a_backend_without_it_says_it_needs_tensorrt_on_sm89(tmp_path: Path, backend: str):
    with pytest.raises(ConfigError, match=r"got 'fp8': fp8 \(E4M3\) needs backend tensorrt and an SM89\+ GPU") as info:
        optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e",
                         optimize.CompileConfig(backend=backend, precision="fp8"))
    assert "\n" not in str(info.value) and not (tmp_path / "e").exists()


def test_compile_refuses_to_overwrite_a_non_engine_directory(tmp_path: Path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="not an engine directory"):
        optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path, optimize.CompileConfig(backend="eager"))
    assert (tmp_path / "keep.txt").exists()


def test_load_explains_what_is_wrong_with_a_directory(tmp_path: Path, minilm_engine_dir: Path):
    with pytest.raises(EngineError, match="manifest.json not found"):
        optimize.load(tmp_path)
    manifest = json.loads((minilm_engine_dir / "manifest.json").read_text())
    broken = tmp_path / "old"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(EngineError, match="format_version 0"):
        optimize.load(broken)
    # format 1 engines called kernel ops by their old names: refused with the reason and the fix
    (broken / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(EngineError, match=r"torch\.ops\.kiln.*recompile the engine with `python -m optimize compile`"):
        optimize.load(broken)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="payload file model.onnx is missing"):
        optimize.load(broken)


def test_input_and_output_names_keep_their_case(tmp_path: Path):
    engine = optimize.compile("tests.optimize.factories:upper_case_names", tmp_path / "e",
                              optimize.CompileConfig(backend="eager", max_batch=4))
    assert [s.name for s in engine.inputs] == ["INPUT0"] and [s.name for s in engine.outputs] == ["OUTPUT0"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(engine.run({"INPUT0": x})["OUTPUT0"], x * 2)
