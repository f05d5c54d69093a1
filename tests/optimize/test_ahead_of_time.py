"""A backend that cannot run on the build machine still builds, explicitly unverified."""

import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import optimize
from optimize.backends import register_backend
from optimize.backends.eager import EagerBackend
from optimize.runtime.engine import AheadOfTimeEngine
from optimize.runtime.errors import EngineError


@register_backend
class EagerElsewhere(EagerBackend):
    """The eager backend, pretending its engines need hardware this machine lacks."""

    name: ClassVar[str] = "eager_elsewhere"

    def can_run_here(self) -> tuple[bool, str]:
        return False, "needs the accelerator of another machine"


def test_unrunnable_backend_builds_without_verification_and_says_why(tmp_path: Path):
    engine = optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e",
                              optimize.CompileConfig(backend="eager_elsewhere", max_batch=4))
    assert isinstance(engine, AheadOfTimeEngine)
    accuracy = json.loads((tmp_path / "e" / "manifest.json").read_text())["accuracy"]
    assert accuracy["skipped"] == "not verified: needs the accelerator of another machine"
    assert "max_abs_error" not in accuracy, "no number pretends a check happened"
    with pytest.raises(EngineError, match="cannot run on this machine: needs the accelerator"):
        engine.run({"x": torch.randn(2, 16)})


def test_info_shows_an_unverified_engine_as_such(tmp_path: Path):
    optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e",
                     optimize.CompileConfig(backend="eager_elsewhere", max_batch=4))
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "optimize", "info", str(tmp_path / "e")], cwd=root,
                            env={"COLUMNS": "200", "PATH": ""}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "not verified: needs the accelerator of another machine" in result.stdout
