"""Profiling engines and `--compare A B` on real engines compiled here (tiny ones: the
`tiny_tokens` factory, eager fp32 / eager bf16 / onnxruntime), in-process and through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import optimize
from optimize.profile.compare import compare
from optimize.profile.records import Profile
from optimize.profile.runner import ProfileOptions, profile_target
from optimize.profile.target import resolve

ROOT = Path(__file__).resolve().parents[2]
FACTORY = "tests.optimize.factories:tiny_tokens"
SIZES = {"batch": 2, "seq": 8}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("profile-engines")
    built = {}
    for name, backend, precision in [("eager", "eager", "fp32"), ("eager_bf16", "eager", "bf16"),
                                     ("ort", "onnxruntime", "fp32")]:
        config = optimize.CompileConfig(backend=backend, precision=precision, max_batch=4, max_seq=16, verify_samples=1)
        optimize.compile(FACTORY, root / name, config, name=name)
        built[name] = root / name
    return built


@pytest.fixture(scope="module")
def profiles(engines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Profile]:
    """Each engine profiled on the very same inputs (made once, by the first)."""
    opts = ProfileOptions(warmup=1, repeats=3, op_repeats=2, ceilings_dir=tmp_path_factory.mktemp("kiln-cache"))
    first = resolve(engines["eager"], **SIZES)
    targets = {"eager": first, **{k: resolve(engines[k], first.inputs) for k in ("eager_bf16", "ort")}}
    return {k: profile_target(t, opts) for k, t in targets.items()}


def test_eager_engine_is_profiled_on_its_own_program_with_module_hierarchy(profiles: dict[str, Profile]):
    p = profiles["eager"]
    assert p.mode == "engine:eager" and "program.pt2" in p.measures["flops"]
    assert p.has_hierarchy
    attn = next(m for m in p.modules if m.path.endswith("model.attn"))
    assert attn.type == "MultiheadAttention" and attn.latency is not None and attn.flops > 0
    # 2 × 8 tokens, width 32: in/out projections 2·16·32·(3·32 + 32) plus attention 4·2·8·8·32
    assert p.totals.flops == 2 * 16 * 32 * 128 + 4 * 2 * 8 * 8 * 32


def test_onnxruntime_engine_has_whole_engine_latency_and_source_equivalent_flops(profiles: dict[str, Profile],
                                                                                 engines: dict[str, Path]):
    p = profiles["ort"]
    assert p.mode == "engine:onnxruntime"
    assert p.latency is not None and p.latency.n == 3
    assert "source-equivalent" in p.measures["flops"] and "no per-op timing" in p.measures["op_latency"]
    assert not p.has_hierarchy and all(op.latency is None for op in p.ops)
    # the same math as the eager engine's program, counted from the source model
    assert p.totals.flops == profiles["eager"].totals.flops
    assert p.memory is not None and p.memory.weights_bytes == (engines["ort"] / "model.onnx").stat().st_size


def test_compare_eager_engines_gives_per_layer_speedups(profiles: dict[str, Profile]):
    result = compare(profiles["eager"], profiles["eager_bf16"])
    assert result.per_layer and result.reason == ""
    paths = [row.path for row in result.layers]
    assert any(p.endswith("model.attn") for p in paths) and any(p.endswith("model.norm") for p in paths)
    for row in result.layers:
        assert row.speedup == pytest.approx(row.a_s / row.b_s)
    assert result.speedup == pytest.approx(profiles["eager"].latency.median_s / profiles["eager_bf16"].latency.median_s)


def test_compare_with_onnxruntime_is_whole_model_only_and_says_so(profiles: dict[str, Profile]):
    result = compare(profiles["eager"], profiles["ort"])
    assert not result.per_layer and result.layers == []
    assert "onnxruntime" in result.reason and "whole-model latency compared only" in result.reason
    assert result.speedup == pytest.approx(result.a_s / result.b_s)


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "KILN_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "optimize", "profile", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_compare_two_engines_writes_json_and_plots(engines: dict[str, Path], tmp_path: Path):
    out = tmp_path / "cmp.json"
    result = _cli("--compare", str(engines["eager"]), str(engines["eager_bf16"]), "--batch", "2", "--seq", "8",
                  "--warmup", "1", "--repeats", "3", "--op-repeats", "1", "--json", str(out),
                  "--plot", str(tmp_path / "plots"), cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "speed-up of B" in result.stdout and "whole model" in result.stdout
    data = json.loads(out.read_text())
    assert data["comparison"]["per_layer"] is True and data["comparison"]["layers"]
    assert Profile.from_json(data["b"]).mode == "engine:eager"
    assert (tmp_path / "plots" / "a" / "eager-layers.png").stat().st_size > 5000
    assert (tmp_path / "plots" / "b" / "eager_bf16-roofline.png").stat().st_size > 5000


def test_cli_profile_of_an_onnxruntime_engine_says_what_it_measures(engines: dict[str, Path], tmp_path: Path):
    result = _cli(str(engines["ort"]), "--batch", "2", "--seq", "8", "--repeats", "3", "--no-roofline",
                  "--json", str(tmp_path / "p.json"), cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "engine:onnxruntime" in result.stdout and "no module hierarchy" in result.stdout.replace("\n", " ")
    assert "NVML not sampled" in result.stdout
    assert Profile.from_json(json.loads((tmp_path / "p.json").read_text())).latency.n == 3


def test_cli_without_target_or_compare_is_a_one_line_error(tmp_path: Path):
    result = _cli("--batch", "2", cache=tmp_path)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: give either a TARGET or --compare A B"]


def test_a_graph_re_exported_from_a_flat_module_is_recognised_as_having_no_hierarchy():
    import torch

    from optimize.profile.recorder import has_module_hierarchy

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = (torch.randn(2, 4),)
    exported = torch.export.export(model, x).module()
    assert has_module_hierarchy(exported)
    class Wrapper(torch.nn.Module):  # how the compiler re-exports a graph after passes
        def __init__(self) -> None:
            super().__init__()
            self.inner = exported

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    flat = torch.export.export(Wrapper(), x).module()
    assert not has_module_hierarchy(flat)
    prof = optimize.profile.count(exported, x)
    assert [m.path for m in prof.modules if m.depth == 1] == ["0", "1", "2"]
