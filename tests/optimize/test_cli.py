import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "optimize", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "make_source, fragment",
    [
        (lambda tmp: str(tmp / "does-not-exist"), "no such file or directory"),
        (lambda tmp: (tmp / "model.ckpt").write_bytes(b"x") and str(tmp / "model.ckpt"), "unsupported file type '.ckpt'"),
        (lambda tmp: str(tmp), "directory without config.json"),
    ],
    ids=["bad-path", "unsupported-file", "not-a-model-dir"],
)
def test_compile_bad_source_exits_nonzero_with_one_line(tmp_path: Path, make_source, fragment: str):
    result = run_cli("compile", make_source(tmp_path), "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and fragment in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_compile_then_info_on_a_factory(tmp_path: Path):
    out = tmp_path / "engine"
    result = run_cli("compile", "tests.optimize.factories:tiny_mlp", "-o", str(out), "--backend", "eager",
                     "--max-batch", "4", "--opt-batch", "2", "--min-cosine", "0.99999")
    assert result.returncode == 0, result.stderr
    assert "✓ verify" in result.stderr
    assert "accuracy vs fp32 eager" in result.stdout and "[batch, 16]" in result.stdout
    info = run_cli("info", str(out), "--json")
    assert info.returncode == 0
    manifest = json.loads(info.stdout)
    assert manifest["backend"] == "eager" and manifest["config"]["max_batch"] == 4
    assert manifest["config"]["opt_batch"] == 2
    # --min-cosine replaces the precision's cosine guard and keeps its error bound
    assert manifest["config"]["tolerance"] == {"max_abs_error": 1e-3, "min_cosine": 0.99999, "same_labels": False,
                                              "real_samples_only": False}


@pytest.mark.parametrize("args, fragment", [
    (["--min-cosine", "1.5"], "min_cosine must lie in (0, 1]; got 1.5"),
    (["--max-abs-error", "-1"], "max_abs_error must not be negative; got -1.0"),
    (["--opt-batch", "64"], "opt_batch must lie in [1, 32]; got 64"),
], ids=["cosine", "error", "opt-batch"])
def test_compile_rejects_a_bad_guard_or_shape_in_one_line(tmp_path: Path, args: list[str], fragment: str):
    result = run_cli("compile", "tests.optimize.factories:tiny_mlp", "-o", str(tmp_path / "e"), *args)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [f"error: {fragment}"], result.stderr


def test_info_on_a_non_engine_directory_is_one_line(tmp_path: Path):
    result = run_cli("info", str(tmp_path))
    assert result.returncode == 1
    assert error_lines(result.stderr) == [f"error: {tmp_path} is not an engine directory: manifest.json not found"]


def test_the_summary_says_how_a_quantized_engine_was_made():
    """One line from each backend's quantization record: scheme, alpha, what stayed in float."""
    from optimize.cli import quantization_text

    searched = {"mode": "static", "weights": "int8 per channel (symmetric)", "activations": "uint8 per tensor",
                "smooth_quant_alpha": 0.8,
                "kept_in_float": {"linears": ["encoder.layer.0.output.dense.weight"], "quantized": 35,
                                  "calibration_cosine": 0.995503, "target": 0.995, "steps": []}}
    assert quantization_text(searched) == ("static; weights int8 per channel (symmetric); activations uint8 per "
                                           "tensor; SmoothQuant alpha 0.8; 35 int8, 1 kept in float (calibration "
                                           "cosine 0.99550, aimed at 0.995)")
    openvino = {"mode": "static", "kept_in_float": {"matmuls": ["a", "b"], "quantized": 46,
                                                   "calibration_cosine": 0.9991, "target": 0.999}}
    assert quantization_text(openvino).endswith("46 int8, 2 kept in float (calibration cosine 0.99910, aimed at 0.999)")
    assert quantization_text({"mode": "static", "kept_float": ["m1", "m2", "m3"]}) == "static; 3 MatMuls kept in float"
    weight_only = {"mode": "weight_only", "weights": "int8 asymmetric"}
    assert quantization_text(weight_only) == "weight_only; weights int8 asymmetric"
