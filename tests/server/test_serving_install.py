"""A serving-only install (requirements-serve.txt): the server and optimize's engine runtime
import, load an engine and run it with the build side of optimize and the build-time libraries
absent, so serving never needs them (ARCHITECTURE.md, "Packages and their imports")."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np

import optimize

ROOT = Path(__file__).resolve().parents[2]
# What a serving-only install lacks: kiln's build-time dependencies and optimize's build side.
BUILD_ONLY = ("onnx", "onnxscript", "transformers", "ml_dtypes", "matplotlib", "pynvml", "nncf",
              "optimize.build", "optimize.compiler", "optimize.auto", "optimize.backends", "optimize.passes",
              "optimize.onnx", "optimize.sources", "optimize.capture", "optimize.verify", "optimize.samples",
              "optimize.timing", "optimize.profile", "optimize.cli")
SENTENCES = ["The kiln fires the clay.", "A short one."]

# Run in a fresh interpreter: a finder ahead of every other one makes the build-only modules
# unimportable, as they are where they are not installed.
_PROBE = """
import importlib.abc, importlib.metadata, json, sys

blocked = tuple(json.loads(sys.argv[1]))


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in blocked):
            raise ModuleNotFoundError(f"No module named {name!r} (not in a serving-only install)", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
import server, server.__main__, server.app, server.http
from optimize import runtime

engine = runtime.load(sys.argv[2])
feeds = engine.pipeline.tokenize(json.loads(sys.argv[3]))
outputs = engine.run({spec.name: feeds[spec.name] for spec in engine.inputs})
distributions = importlib.metadata.packages_distributions()
imported = sorted({d for m in list(sys.modules) for d in distributions.get(m.split(".")[0], [])})
print(json.dumps({"outputs": {k: v.tolist() for k, v in outputs.items()}, "distributions": imported,
                  "leaked": sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in blocked))}))
"""


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def serve_requirements() -> dict[str, str]:
    lines = (ROOT / "requirements-serve.txt").read_text().splitlines()
    return {_name(line): line.strip() for line in lines if line.strip() and not line.startswith("#")}


def test_serve_requirements_are_kilns_own_ranges():
    declared = {_name(r): r.strip() for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    serve = serve_requirements()
    assert {n: declared.get(n) for n in serve} == serve, "requirements-serve.txt must repeat pyproject's ranges"
    assert {"transformers", "onnx", "onnxscript"}.isdisjoint(serve)


def test_the_server_loads_and_runs_an_engine_without_the_build_side(minilm_engine_dir: Path):
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(BUILD_ONLY), str(minilm_engine_dir),
                           json.dumps(SENTENCES)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["leaked"] == []

    engine = optimize.load(minilm_engine_dir)  # here, with everything installed
    feeds = engine.pipeline.tokenize(SENTENCES)
    expected = engine.run({spec.name: feeds[spec.name] for spec in engine.inputs})
    assert set(got["outputs"]) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(got["outputs"][name]), value, rtol=1e-5, atol=1e-5)

    declared = {_name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    used = {_name(d) for d in got["distributions"]} & declared
    assert used <= set(serve_requirements()), f"serving imports kiln dependencies outside the serve set: {used}"
