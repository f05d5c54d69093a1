"""The ONNX pass manager: order, on/off by name, pass-by-pass verification."""

from pathlib import Path

import pytest

import optimize
from optimize.onnx import ONNX_PASSES, ort_verifier, run_onnx_passes
from optimize.runtime.config import CompileConfig, Tolerance
from optimize.runtime.errors import AccuracyError, ConfigError


def _context(pass_context, **config):
    ctx = pass_context("fp16")
    ctx.config = CompileConfig(max_batch=4, max_seq=32, precision="fp16", **config)
    return ctx


def test_each_pass_that_changed_something_is_verified(minilm_onnx, pass_context):
    ctx = _context(pass_context)
    _, results = run_onnx_passes(minilm_onnx, ctx, verifier=ort_verifier(ctx))
    by_name = {r.name: r for r in results}
    assert [r.name for r in results] == list(ONNX_PASSES), "pipeline order"
    assert by_name["onnx_ort_fusions"].skipped == "contrib ops run only on ONNX Runtime"
    assert by_name["onnx_fold_constants"].accuracy is None, "nothing changed, nothing to verify"
    for name in ("onnx_attention", "onnx_mixed_precision"):
        assert by_name[name].accuracy["min_cosine"] > 0.9999


def test_the_first_pass_that_breaks_accuracy_is_named(minilm_onnx, pass_context):
    ctx = _context(pass_context, tolerance=Tolerance(max_abs_error=0.0, min_cosine=1.0))
    with pytest.raises(AccuracyError, match="ONNX pass onnx_attention broke accuracy"):
        run_onnx_passes(minilm_onnx, ctx, verifier=ort_verifier(ctx))


def test_passes_turn_off_by_name_and_unknown_names_are_refused(minilm_onnx, pass_context):
    ctx = _context(pass_context, passes={"onnx_attention": False})
    model, results = run_onnx_passes(minilm_onnx, ctx, names=["onnx_fold_constants", "onnx_attention"])
    assert [(r.name, r.skipped) for r in results] == [("onnx_fold_constants", ""), ("onnx_attention", "disabled in config")]
    with pytest.raises(ConfigError, match="unknown ONNX pass.es. onnx_magic"):
        run_onnx_passes(model, ctx, names=["onnx_magic"])


def test_compile_accepts_onnx_pass_names_in_the_config(tmp_path: Path):
    config = optimize.CompileConfig(backend="onnxruntime", max_batch=4, passes={"onnx_fuse_gelu": False})
    engine = optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e", config)
    entry = next(p for p in engine.manifest.passes if p["pass"] == "onnx_fuse_gelu")
    assert entry["skipped"] == "disabled in config"
    with pytest.raises(ConfigError, match="unknown pass.es. no_such_pass"):
        optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "f",
                         optimize.CompileConfig(backend="onnxruntime", passes={"no_such_pass": False}))
