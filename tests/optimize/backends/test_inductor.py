"""Backend `inductor`: torch.compile's code generator ahead of time (an AOTInductor package),
dynamic in batch and sequence, loaded without tracing anything again."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optimize
from optimize.auto import survey
from optimize.backends.inductor import cxx_compiler
from optimize.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(cxx_compiler() is None, reason="AOTInductor needs a C++ compiler to build")


_GRAD_DURING_COMPILE: list[bool] = []


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inductor") / "tiny"
    compile_and_package = torch._inductor.aoti_compile_and_package

    def spy(*args: object, **kwargs: object) -> object:
        _GRAD_DURING_COMPILE.append(torch.is_grad_enabled())
        return compile_and_package(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch._inductor, "aoti_compile_and_package", spy)
        optimize.compile("tests.optimize.factories:tiny_tokens", out,
                         optimize.CompileConfig(backend="inductor", max_batch=4, max_seq=16))
    return out


def test_engine_is_one_aot_package_that_runs_every_shape_in_its_ranges(engine_dir: Path):
    from tests.optimize.factories import TinyTokenModel

    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert manifest["payload"] == ["model.pt2"] and manifest["build"]["inductor"]["freezing"] is True
    assert manifest["accuracy"]["max_abs_error"] < 1e-4
    engine = optimize.load(engine_dir)
    model = TinyTokenModel().eval()
    for batch, seq in ((1, 1), (4, 16), (3, 7)):  # the range's corners and a size never compiled for
        ids = torch.randint(0, 50, (batch, seq))
        with torch.inference_mode():
            expected = model(ids)[0]
        torch.testing.assert_close(engine.run({"ids": ids})["output_0"], expected, rtol=1e-4, atol=1e-4)


def test_loading_compiles_nothing_again(engine_dir: Path):
    """A fresh process loads and runs the package without Dynamo tracing a frame."""
    script = ("import sys, torch, torch._dynamo.utils as u, optimize\n"
              "e = optimize.load(sys.argv[1])\n"
              "out = e.run({'ids': torch.randint(0, 50, (2, 5))})['output_0']\n"
              "print(tuple(out.shape), sum(u.counters['frames'].values()))\n")
    done = subprocess.run([sys.executable, "-c", script, str(engine_dir)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[0] == "(2, 5, 32) 0"


def test_without_a_compiler_it_is_refused_and_auto_lists_it_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import optimize.backends.inductor as backend

    monkeypatch.setattr(backend, "cxx_compiler", lambda: None)
    with pytest.raises(ConfigError, match="AOTInductor needs a C.. compiler"):
        optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e",
                         optimize.CompileConfig(backend="inductor"))
    found, skipped = survey(optimize.CompileConfig(backend="auto"))
    assert not any(c.backend == "inductor" for c in found)
    assert any(c.backend == "inductor" and "C++ compiler" in c.reason for c in skipped)


def test_the_package_is_compiled_with_autograd_off_so_inductor_freezes(engine_dir: Path):
    """Inductor freezes (folds and pre-packs the weights, lowers int8) only with autograd off."""
    assert _GRAD_DURING_COMPILE == [False]


# --- int8 ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_two_layers(tmp_path_factory: pytest.TempPathFactory, minilm_model_dir: Path) -> Path:
    """all-MiniLM-L6-v2 cut to its first two layers: real weights (with their outlier channels)
    and its real tokenizer, so calibration and the guard see real sentences, at a third of the
    compile time."""
    import shutil

    import transformers

    out = tmp_path_factory.mktemp("minilm") / "two-layers"
    shutil.copytree(minilm_model_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "onnx", "openvino"))
    model = transformers.AutoModel.from_pretrained(minilm_model_dir)
    model.encoder.layer = model.encoder.layer[:2]
    model.config.num_hidden_layers = 2
    model.save_pretrained(out)
    return out


def _int8(source: Path, out: Path, min_cosine: float, **options: object) -> optimize.Engine:
    from optimize.runtime.config import Tolerance

    config = optimize.CompileConfig(backend="inductor", precision="int8", max_batch=2, max_seq=32,
                                    backend_options=options,
                                    tolerance=Tolerance(max_abs_error=float("inf"), min_cosine=min_cosine))
    return optimize.compile(source, out, config)


def test_int8_runs_int8_gemms_and_keeps_the_costliest_linears_in_float(tmp_path: Path, minilm_two_layers: Path):
    import re
    import zipfile

    import transformers

    from optimize.backends.base import cpu_has_native_bf16

    engine = _int8(minilm_two_layers, tmp_path / "int8", 0.999)
    quantization = engine.manifest.build["quantization"]
    kept = quantization["kept_in_float"]
    assert quantization["calibration_cosine_all_int8"] < kept["target"], "all-int8 misses the guard: linears are kept"
    assert kept["linears"] and kept["quantized"] > 0 and kept["calibration_cosine"] >= kept["target"] >= 0.999
    assert all(name.startswith("encoder.layer.") for name in kept["linears"]), kept["linears"]
    assert quantization["float_compute"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    with zipfile.ZipFile(tmp_path / "int8" / "model.pt2") as package:
        wrapper = next(n for n in package.namelist() if n.endswith(".wrapper.cpp"))
        code = package.read(wrapper).decode()
    gemms = re.findall(r"aoti_torch_cpu__qlinear_pointwise\w*\(", code)
    assert len(gemms) == kept["quantized"], "every linear left in int8 is a oneDNN int8 GEMM, no other is"
    assert engine.manifest.accuracy["min_cosine"] >= 0.999

    # sentences neither calibration nor verification saw, against transformers itself
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_two_layers)
    batch = tokenizer(["The ferry leaves the harbour at dawn, weather permitting.", "Refunds take five days."],
                      padding=True, return_tensors="pt")
    feeds = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.inference_mode():
        expected = transformers.AutoModel.from_pretrained(minilm_two_layers)(**feeds).last_hidden_state
    got = engine.run(feeds)["last_hidden_state"].float()
    real = batch["attention_mask"].bool()
    cosine = torch.nn.functional.cosine_similarity(got[real], expected[real], dim=-1)
    assert cosine.min() > 0.995, cosine.min()


def test_int8_is_refused_by_name_when_no_selection_reaches_the_guard(tmp_path: Path, minilm_two_layers: Path):
    from optimize.runtime.errors import AccuracyError

    with pytest.raises(AccuracyError, match="int8 cannot reach cosine 1 on the calibration texts"):
        _int8(minilm_two_layers, tmp_path / "int8", 1.0, int8_smooth_quant=0.8)
    assert not (tmp_path / "int8").exists()


def test_int8_of_a_model_without_linears_is_refused_by_name(tmp_path: Path):
    with pytest.raises(ConfigError, match="quantizes linears .* this model has none"):
        optimize.compile("tests.optimize.factories:upper_case_names", tmp_path / "e",
                         optimize.CompileConfig(backend="inductor", precision="int8"))


@pytest.mark.parametrize("alpha", ["high", True, None])
def test_a_smooth_quant_alpha_that_is_not_a_number_is_refused_by_name(tmp_path: Path, alpha: object):
    with pytest.raises(ConfigError, match="int8_smooth_quant must be 'auto' or a number"):
        optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e",
                         optimize.CompileConfig(backend="inductor", precision="int8",
                                                backend_options={"int8_smooth_quant": alpha}))
