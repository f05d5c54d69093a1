"""Backend `tensorrt`: real all-MiniLM-L6-v2 engines built with TensorRT-RTX on the CPU-only CI
machine (ahead of time: no GPU needed to build); running them is tested where a GPU exists."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import optimize
from optimize.runtime.engine import AheadOfTimeEngine
from optimize.runtime.errors import ConfigError, EngineError

trt_backend = pytest.importorskip("optimize.backends.tensorrt")
if trt_backend.library() is None:
    pytest.skip("neither tensorrt nor tensorrt_rtx is installed (pip install 'kiln[tensorrt]')", allow_module_level=True)

CONFIG = dict(backend="tensorrt", max_batch=4, max_seq=32)
SENTENCES = ["A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."]


@pytest.fixture(scope="module")
def fp16_engine(tmp_path_factory, minilm_model_dir: Path) -> Path:
    """A MiniLM fp16 engine (fp32 islands) with dynamic batch 1..4 × seq 1..32."""
    out = tmp_path_factory.mktemp("trt") / "minilm" / "1"
    optimize.compile(minilm_model_dir, out, optimize.CompileConfig(precision="fp16", **CONFIG), name="minilm")
    return out


def test_minilm_fp16_engine_builds_with_dynamic_profiles_and_fp32_islands(fp16_engine):
    path = fp16_engine
    manifest = json.loads((path / "manifest.json").read_text())
    record = manifest["build"]["tensorrt"]
    assert record["library"] in ("tensorrt", "tensorrt_rtx") and record["plan_bytes"] > 10 << 20
    assert (path / "engine.plan").stat().st_size == record["plan_bytes"]
    assert record["profile"]["input_ids"] == {"min": [1, 1], "opt": [4, 32], "max": [4, 32]}
    assert record["profile"]["attention_mask"] == record["profile"]["input_ids"]
    if record["library"] == "tensorrt_rtx" and not torch.cuda.is_available():
        assert "SM90" not in record["compute_capabilities"] and {"SM75", "SM89", "SM120"} <= set(record["compute_capabilities"])
        assert record["timing_cache"].startswith("off")
    islands = manifest["build"]["fp32_nodes"]
    assert len([n for n in islands["op"] if "layer_norm" in n]) == 13 and len(islands["overflow"]) == 7
    passes = {p["pass"]: p for p in manifest["passes"]}
    assert passes["onnx_attention"]["matches"]["scales_folded"] == 12
    assert passes["onnx_mixed_precision"]["matches"]["low_precision_nodes"] > 100
    assert "onnx_ort_fusions" not in passes, "contrib ops are for ONNX Runtime only"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the ahead-of-time path of a machine without a GPU")
def test_without_a_gpu_verification_is_skipped_with_the_reason_recorded(fp16_engine):
    path = fp16_engine
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["accuracy"]["skipped"].startswith("not verified: no CUDA GPU on this machine")
    check = manifest["build"]["tensorrt"]["prepared_onnx_check"]
    assert check["min_cosine"] > 0.9999, "the graph TensorRT built from is right (run by ONNX Runtime)"
    with pytest.raises(EngineError, match="needs a CUDA GPU"):
        optimize.load(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the ahead-of-time path of a machine without a GPU")
def test_compile_returns_an_engine_that_explains_it_cannot_run_here(tmp_path, minilm_model_dir):
    engine = optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "mlp",
                              optimize.CompileConfig(backend="tensorrt", max_batch=4))
    assert isinstance(engine, AheadOfTimeEngine) and engine.outputs[0].dtype == "float32"
    with pytest.raises(EngineError, match="cannot run on this machine: no CUDA GPU"):
        engine.run({"x": torch.randn(2, 16)})


def test_loading_an_engine_built_by_another_tensorrt_version_names_both(fp16_engine, tmp_path):
    path = fp16_engine
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    built = manifest["build"]["tensorrt"]
    manifest["build"]["tensorrt"]["version"] = "0.9.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError) as info:
        optimize.load(copy)
    text = str(info.value)
    assert f"built with {built['library']} 0.9.0" in text and built["version"] in text and "rebuild" in text


def test_int8_engine_builds_from_explicit_qdq_with_fp16_elsewhere(tmp_path, minilm_model_dir):
    config = optimize.CompileConfig(precision="int8", backend_options={"int8_keep_sensitive": False}, **CONFIG)
    engine = optimize.compile(minilm_model_dir, tmp_path / "int8", config)
    passes = {p["pass"]: p for p in engine.manifest.passes}
    assert passes["onnx_quantize"]["matches"]["matmuls_quantized"] == 36
    assert passes["onnx_mixed_precision"]["matches"]["low_precision_nodes"] > 100, "unquantized ops run in fp16"
    quantization = engine.manifest.build["quantization"]
    assert quantization["activations"] == "int8 symmetric" and quantization["calibration"] == "percentile"
    assert engine.manifest.build["tensorrt"]["plan_bytes"] < 60 << 20


def test_fp8_engine_builds_from_e4m3_qdq_for_sm89_and_newer(tmp_path, minilm_model_dir):
    config = optimize.CompileConfig(backend="tensorrt", precision="fp8", max_batch=4, max_seq=64)
    engine = optimize.compile(minilm_model_dir, tmp_path / "fp8", config)
    manifest = json.loads((tmp_path / "fp8" / "manifest.json").read_text())
    record = manifest["build"]["tensorrt"]
    assert manifest["config"]["precision"] == "fp8"
    assert (tmp_path / "fp8" / "engine.plan").stat().st_size == record["plan_bytes"] > 10 << 20
    targets = record["compute_capabilities"]
    if record["library"] == "tensorrt_rtx" and not torch.cuda.is_available():
        assert targets and all(int(t[2:]) >= 89 for t in targets) and "SM89" in targets, targets
    passes = {p["pass"]: p for p in engine.manifest.passes}
    assert passes["onnx_quantize"]["matches"]["matmuls_quantized"] == 36
    assert passes["onnx_quantize"]["matches"]["quantize_nodes"] == 24
    assert passes["onnx_mixed_precision"]["matches"]["low_precision_nodes"] > 100, "unquantized ops run in fp16"
    quantization = manifest["build"]["quantization"]
    assert quantization["mode"] == "fp8" and quantization["format"] == "FLOAT8E4M3FN"
    if "prepared_onnx_check" in record:  # no GPU: ONNX Runtime ran the fp8 Q/DQ graph TensorRT built from
        assert record["prepared_onnx_check"]["min_cosine"] >= config.tolerance.min_cosine  # 0.997 measured


def test_fp8_for_sm80_is_refused_before_anything_is_built(tmp_path, minilm_model_dir, monkeypatch):
    if trt_backend.library()[1] != "tensorrt_rtx":
        pytest.skip("compute capabilities are a TensorRT-RTX build option")
    import optimize.build

    def no_capture(*args, **kwargs):
        raise AssertionError("the model was captured before the targets were checked")

    monkeypatch.setattr(optimize.build, "capture", no_capture)
    config = optimize.CompileConfig(backend="tensorrt", precision="fp8", max_batch=4, max_seq=64,
                                    backend_options={"compute_capabilities": ["sm80"]})
    with pytest.raises(ConfigError, match="^precision fp8 needs SM89 or newer; SM80 was asked for$"):
        optimize.compile(minilm_model_dir, tmp_path / "fp8", config)
    assert not (tmp_path / "fp8").exists()


def test_targets_follow_precision_and_library_support():
    trt, flavour = trt_backend.library()
    if flavour != "tensorrt_rtx":
        pytest.skip("compute capabilities are a TensorRT-RTX build option")
    if not torch.cuda.is_available():
        assert "SM75" not in trt_backend.resolve_targets(trt, flavour, "auto", "bf16"), "bf16 needs SM80+"
        fp8 = trt_backend.resolve_targets(trt, flavour, "auto", "fp8", "fp16")
        assert fp8 and all(int(t[2:]) >= 89 for t in fp8), "fp8 needs SM89+ whatever the fallback type"
    with pytest.raises(ConfigError, match="precision fp8 needs SM89 or newer; SM86"):
        trt_backend.resolve_targets(trt, flavour, ["sm89", "sm86"], "fp8", "fp32")
    with pytest.raises(ConfigError, match="precision bf16 needs SM80 or newer; SM75"):
        trt_backend.resolve_targets(trt, flavour, ["sm75"], "int8", "bf16")
    assert trt_backend.resolve_targets(trt, flavour, ["sm89", "SM120"], "fp16") == ["SM89", "SM120"]
    with pytest.raises(ConfigError, match="cannot target SM90"):
        trt_backend.resolve_targets(trt, flavour, ["sm90"], "fp16")
    with pytest.raises(ConfigError, match="needs SM80 or newer; SM75"):
        trt_backend.resolve_targets(trt, flavour, "sm75", "bf16")


def test_unknown_backend_option_is_a_config_error_naming_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="has no option.s. speed; its options: compute_capabilities"):
        optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e",
                         optimize.CompileConfig(backend="tensorrt", backend_options={"speed": 11}))


# --- on a GPU -------------------------------------------------------------------------------

@pytest.mark.gpu
def test_fp16_engine_matches_eager_on_real_sentences_on_cuda(fp16_engine, minilm_model_dir):
    path = fp16_engine
    engine = optimize.load(path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["accuracy"]["min_cosine"] >= manifest["accuracy"]["tolerance"]["min_cosine"]
    feeds = {k: torch.from_numpy(v).cuda() for k, v in engine.pipeline.tokenize(SENTENCES).items()}
    out = engine.run(feeds)["sentence_embedding"]
    assert out.is_cuda and out.dtype == torch.float32
    reference = optimize.compile(minilm_model_dir, path.parent / "eager", optimize.CompileConfig(backend="eager", max_batch=4, max_seq=32))
    want = reference.run({k: v.cpu() for k, v in feeds.items()})["sentence_embedding"]
    cos = torch.nn.functional.cosine_similarity(out.cpu(), want)
    assert cos.min() > 0.999
    sims = out @ out.T
    assert sims[0, 1] > 0.6 > 0.2 > max(sims[0, 2], sims[1, 2])


@pytest.mark.gpu
def test_every_shape_in_the_profile_runs_and_others_are_rejected(fp16_engine):
    engine = optimize.load(fp16_engine)
    for batch, seq in ((1, 1), (3, 17), (4, 32)):
        ids = torch.randint(1000, 2000, (batch, seq), device="cuda")
        out = engine.run({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        assert out["last_hidden_state"].shape == (batch, seq, 384)
        assert torch.isfinite(out["last_hidden_state"]).all()
    with pytest.raises(EngineError, match="allowed range is"):
        engine.run({"input_ids": torch.ones(5, 8, dtype=torch.long), "attention_mask": torch.ones(5, 8, dtype=torch.long)})


@pytest.mark.gpu
def test_runtime_cache_is_saved_next_to_the_plan(fp16_engine, tmp_path):
    if trt_backend.library()[1] != "tensorrt_rtx":
        pytest.skip("the runtime (JIT) cache is TensorRT-RTX's")
    copy = tmp_path / "engine"
    shutil.copytree(fp16_engine, copy)
    engine = optimize.load(copy)
    engine.run({"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)})
    assert (copy / "runtime.cache").stat().st_size > 0


@pytest.mark.gpu
def test_engine_for_another_gpu_is_refused_with_both_named(fp16_engine, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(fp16_engine, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    major, minor = torch.cuda.get_device_capability()
    other = "SM75" if major * 10 + minor != 75 else "SM120"
    manifest["build"]["tensorrt"]["compute_capabilities"] = [other]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=f"built for {other}; this GPU .* is SM{major}{minor}"):
        optimize.load(copy)


@pytest.mark.gpu
def test_rebuild_reuses_the_timing_cache_of_the_engine_it_replaces(tmp_path):
    config = optimize.CompileConfig(backend="tensorrt", max_batch=4)
    first = optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "mlp", config)
    assert (tmp_path / "mlp" / "timing.cache").is_file() and first.manifest.build["tensorrt"]["timing_cache"] == "new"
    second = optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "mlp", config)
    assert second.manifest.build["tensorrt"]["timing_cache"] == "reused from the previous engine"
    x = torch.randn(3, 16, device="cuda")
    np.testing.assert_allclose(first.run({"x": x})["output"].cpu(), second.run({"x": x})["output"].cpu(), atol=1e-5)
