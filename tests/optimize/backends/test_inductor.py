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


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inductor") / "tiny"
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
