"""`optimize.profile` end to end on CPU: latency, memory, roofline, NVML-absent path, JSON,
plots, chrome trace. No assertion depends on how fast this machine is."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch

import optimize
from optimize.profile import roofline
from optimize.profile.memory import weights_bytes
from optimize.profile.nvml import NvmlSampler
from optimize.profile.records import Ceilings, Profile
from optimize.runtime.errors import ConfigError

REPEATS = 4


@pytest.fixture(scope="module")
def ceilings_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kiln-cache")


@pytest.fixture(scope="module")
def minilm_profile(minilm_model_dir: Path, ceilings_dir: Path) -> Profile:
    """One full profile of the real all-MiniLM-L6-v2 source at batch 2 × seq 16."""
    return optimize.profile(str(minilm_model_dir), batch=2, seq=16, warmup=1, repeats=REPEATS, op_repeats=2,
                            ceilings_dir=ceilings_dir)


def _rendered(prof: Profile) -> str:
    from rich.console import Console

    buffer = io.StringIO()
    optimize.profile.render(prof, Console(file=buffer, width=220, color_system=None))
    return buffer.getvalue()


def test_profile_times_the_whole_model_every_op_and_every_layer(minilm_profile: Profile):
    p = minilm_profile
    assert p.mode == "source" and p.device.startswith("cpu")
    assert p.latency is not None and p.latency.n == REPEATS and len(p.latency.samples_s) == REPEATS
    assert 0 < p.latency.min_s <= p.latency.median_s <= p.latency.p90_s <= p.latency.max_s
    assert p.latency_method == "time.perf_counter"
    assert p.ops and all(op.latency is not None and op.latency.n == 2 for op in p.ops)
    layers = [m for m in p.modules if m.type == "BertLayer"]
    assert [m.path for m in layers] == [f"model.encoder.layer.{i}" for i in range(6)]
    assert all(m.latency is not None and m.latency.median_s > 0 for m in layers)
    # a module's time is the sum of its ops' times per run, so the encoder's fastest run is at
    # least the sum of its layers' fastest runs (min of sums >= sum of mins)
    encoder = p.module("model.encoder")
    assert encoder.latency.min_s >= sum(m.latency.min_s for m in layers) * (1 - 1e-9)
    assert p.totals.ops_latency_s == pytest.approx(sum(op.latency.median_s for op in p.ops))
    assert p.totals.outside_ops_s == pytest.approx(p.latency.median_s - p.totals.ops_latency_s)
    assert set(p.measures) >= {"flops", "latency", "op_latency", "module_latency", "memory"}


def test_profile_reports_memory_and_weights(minilm_profile: Profile):
    m = minilm_profile.memory
    assert m is not None
    # 22.7 M fp32 parameters (all-MiniLM-L6-v2) plus position-id buffers
    assert 90e6 < m.weights_bytes < 92e6
    assert m.peak_bytes is not None and m.peak_bytes >= m.weights_bytes
    assert "RSS" in m.method


def test_every_op_is_placed_on_the_roofline(minilm_profile: Profile, ceilings_dir: Path):
    p = minilm_profile
    c = p.ceilings
    assert c is not None and c.memory_bytes_per_s > 0 and c.matmul_flops_per_s["float32"] > 0
    assert list((ceilings_dir / "roofline").glob("*.json")), "ceilings were not cached"
    working = [op for op in p.ops if op.bytes or op.total_flops]
    assert working and all(op.bound in ("compute", "memory") and op.roofline_fraction > 0 for op in working)
    assert {op.bound for op in p.ops if op.kind == "matmul"} <= {"compute", "memory"}
    assert all(op.bound == "memory" for op in p.ops if op.kind in ("elementwise", "normalization"))
    assert p.totals.roofline_fraction == pytest.approx(p.totals.roofline_s / p.latency.median_s)


def test_place_classifies_the_bound_and_the_fraction():
    c = Ceilings(device="test", key="test", memory_bytes_per_s=1e11, matmul_flops_per_s={"float32": 1e12},
                 method="synthetic", torch=torch.__version__)
    # 1e9 FLOP, 1e6 B: compute 1 ms > memory 10 µs; measured 4 ms → 25% of the roof
    assert roofline.place(10**9, 10**6, 4e-3, "float32", c) == ("compute", pytest.approx(1e-3), pytest.approx(0.25))
    # an elementwise op: 1e6 FLOP, 1e8 B → memory bound at 1 ms
    assert roofline.place(10**6, 10**8, 2e-3, "float32", c)[0::2] == ("memory", pytest.approx(0.5))
    # a dtype without a measured ceiling falls back to float32's
    assert c.peak_flops("int64") == (1e12, "float32")
    assert roofline.place(0, 0, 1e-3, "float32", c) == (None, None, None)


def test_ceilings_are_measured_once_per_device_then_read_from_the_cache(tmp_path: Path, monkeypatch):
    first = roofline.ceilings_for("cpu", {"float32", "int64"}, directory=tmp_path)
    assert set(first.matmul_flops_per_s) == {"float32"}
    assert first.threads == torch.get_num_threads() and first.key == roofline.device_key(torch.device("cpu"))

    def must_not_run(*args, **kwargs):
        raise AssertionError("ceilings were re-measured despite the cache")

    monkeypatch.setattr(roofline, "measure_bandwidth", must_not_run)
    monkeypatch.setattr(roofline, "measure_matmul", must_not_run)
    assert roofline.ceilings_for("cpu", {"float32"}, directory=tmp_path) == first


def test_profile_round_trips_through_json(minilm_profile: Profile, tmp_path: Path):
    path = optimize.profile.save_json(minilm_profile, tmp_path / "p.json")
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    again = optimize.profile.load_json(path)
    assert again == minilm_profile
    assert again.ops[0].latency == minilm_profile.ops[0].latency and again.ceilings == minilm_profile.ceilings
    with pytest.raises(ValueError, match="format_version"):
        Profile.from_json({**json.loads(text), "format_version": 99})


def test_plots_are_written_and_not_empty(minilm_profile: Profile, tmp_path: Path):
    import matplotlib.image

    written, skipped = optimize.profile.write_plots(minilm_profile, tmp_path / "plots")
    assert skipped == []
    assert sorted(p.name for p in written) == ["model-latency.png", "model-layers.png", "model-roofline.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert float(pixels[..., :3].std()) > 0.01, f"{path.name} is blank"


def test_report_lists_layers_ops_convention_and_one_nvml_line(minilm_profile: Profile):
    text = _rendered(minilm_profile)
    assert "model.encoder.layer.5" in text and "aten.linear" in text and "aten.scaled_dot_product_attention" in text
    assert "uncounted ops" in text and "none: every op has a FLOP formula" in text
    nvml_lines = [line for line in text.splitlines() if "NVML" in line]
    assert len(nvml_lines) == 1 and "not sampled" in nvml_lines[0]
    assert "2·M·N·K" in text


def test_nvml_absent_summary_is_one_line_and_never_raises(minilm_profile: Profile, monkeypatch):
    summary = minilm_profile.nvml
    assert summary is not None and not summary.available and "\n" not in summary.reason
    assert "cpu" in summary.reason
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    with NvmlSampler("cuda:0") as sampler:
        pass
    missing = sampler.summary(inferences=3)
    assert not missing.available and "nvidia-ml-py is not installed" in missing.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_nvml_without_a_driver_says_so():
    pytest.importorskip("pynvml")
    with NvmlSampler("cuda:0") as sampler:
        torch.ones(3).sum()
    summary = sampler.summary(inferences=1)
    assert not summary.available and summary.reason.startswith("NVML not sampled")


def _fake_pynvml(energy_mj: list[float]) -> types.ModuleType:
    """Just enough of pynvml for the sampler: fixed counters, an energy counter that advances."""
    nvml = types.ModuleType("pynvml")
    nvml.NVML_CLOCK_SM = 1
    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    nvml.nvmlDeviceGetHandleByPciBusId = lambda bus: ("gpu", bus)
    nvml.nvmlDeviceGetName = lambda h: b"Fake GPU"
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=80, memory=40)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 << 30, total=80 << 30)
    nvml.nvmlDeviceGetPowerUsage = lambda h: 250_000  # mW
    nvml.nvmlDeviceGetClockInfo = lambda h, kind: 1755
    nvml.nvmlDeviceGetTotalEnergyConsumption = lambda h: energy_mj.pop(0)
    return nvml


def test_nvml_sampler_thread_summarizes_counters_and_energy_per_inference(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([10_000.0, 16_000.0]))
    sampler = NvmlSampler("cuda:0", interval_s=0.001)
    assert sampler.available
    with sampler:
        import time

        time.sleep(0.02)
    s = sampler.summary(inferences=4)
    assert s.available and s.device == "Fake GPU" and s.samples >= 2
    assert s.gpu_util_pct_mean == 80 and s.power_w_mean == 250 and s.sm_clock_mhz_max == 1755
    assert s.memory_used_bytes_max == 3 << 30
    assert s.energy_j == pytest.approx(6.0) and s.energy_per_inference_j == pytest.approx(1.5)


def test_chrome_trace_of_one_inference_on_request(tmp_path: Path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    prof = optimize.profile(model, (torch.randn(2, 8),), warmup=0, repeats=1, op_repeats=1, roofline=False,
                            trace=tmp_path / "trace.json")
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert any(e.get("name") == "aten::addmm" or e.get("name") == "aten::linear" for e in events)
    assert prof.ceilings is None and any("chrome trace" in n for n in prof.notes)


def test_bad_options_name_the_field():
    with pytest.raises(ConfigError, match="repeats"):
        optimize.profile(torch.nn.Linear(2, 2), (torch.randn(1, 2),), repeats=0)
    with pytest.raises(ConfigError, match="needs inputs"):
        optimize.profile(torch.nn.Linear(2, 2))


def test_weights_size_counts_shared_storage_once():
    shared = torch.nn.Linear(16, 16, bias=False)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    assert weights_bytes(model) == 16 * 16 * 4
