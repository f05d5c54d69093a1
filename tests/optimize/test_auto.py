"""`--backend auto`: every candidate built and verified, timed in its own process, fastest kept."""

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import optimize
from optimize.auto import candidates, judged_accuracy, timing_shapes
from optimize.backends.base import cpu_has_native_bf16
from optimize.runtime.errors import ConfigError, OptimizeError
from tests.optimize.hf_random import TINY_BERT, hf_dir


def test_candidates_follow_the_precision_asked_for():
    fp32 = {(c.backend, c.precision) for c in candidates(optimize.CompileConfig(backend="auto"))}
    assert ("eager", "fp32") in fp32 and ("onnxruntime", "fp32") in fp32
    assert all(p == "fp32" for _, p in fp32), "an fp32 request admits fp32 engines only"
    if not torch.cuda.is_available():
        assert not any(b == "triton" for b, _ in fp32), "Triton kernels run as references on a CPU: never tried"
    int8 = {(c.backend, c.precision) for c in candidates(optimize.CompileConfig(backend="auto", precision="int8"))}
    assert {("onnxruntime", "int8"), ("onnxruntime", "int8-weight"), ("onnxruntime", "fp32")} <= int8
    from optimize.backends.inductor import cxx_compiler

    assert (("inductor", "int8") in int8) == (cxx_compiler() is not None), "Inductor's int8 is a candidate too"
    assert not any(p == "fp16" for _, p in int8), "a CPU only emulates fp16: slower, never a candidate"
    bf16 = {(c.backend, c.precision) for c in candidates(optimize.CompileConfig(backend="auto", precision="bf16"))}
    assert ("eager", "bf16") in bf16 if cpu_has_native_bf16() else not any(p == "bf16" for _, p in bf16)
    with pytest.raises(ConfigError, match="unknown backend.s. nope"):
        candidates(optimize.CompileConfig(backend="auto", backend_options={"backends": ["nope"]}))


def test_auto_keeps_the_fastest_accurate_engine_and_records_every_candidate(tmp_path: Path):
    config = optimize.CompileConfig(backend="auto", precision="int8-weight", max_batch=8,
                                    tolerance=optimize.Tolerance(max_abs_error=1e-4, min_cosine=0.99999),
                                    backend_options={"backends": ["eager", "onnxruntime"], "shapes": ["8x16", [1, 4]]})
    engine = optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e", config)
    auto = json.loads((tmp_path / "e" / "manifest.json").read_text())["build"]["auto"]
    table = {c["candidate"]: c for c in auto["candidates"] if c["status"] != "skipped"}
    skipped = {c["candidate"]: c["reason"] for c in auto["candidates"] if c["status"] == "skipped"}
    assert "natively" in skipped["onnxruntime/fp16"], "what was not tried is listed with the reason"
    assert set(table) == {"eager/fp32", "onnxruntime/fp32[ort_fusions=False]", "onnxruntime/fp32[ort_fusions=True]",
                          "onnxruntime/int8-weight[ort_fusions=False]", "onnxruntime/int8-weight[ort_fusions=True]",
                          *(["eager/bf16"] if cpu_has_native_bf16() else [])}, "bf16 is admitted: more accurate than int8"
    rejected = [c for c in table.values() if c["status"] == "rejected"]
    assert rejected and all(c["precision"] in ("int8-weight", "bf16") and "disagrees with fp32 eager" in c["reason"]
                            for c in rejected)
    timed = [c for c in table.values() if c["status"] in ("passed", "chosen")]
    chosen = next(c for c in timed if c["status"] == "chosen")
    assert chosen["time_ms"] == min(c["time_ms"] for c in timed) > 0
    assert auto["shapes"] == ["8x16", "1x4"] and all(set(c["times_ms"]) == {"8x16", "1x4"} for c in timed)
    for c in timed:  # ranked by the geometric mean over shapes of each shape's fastest run
        assert c["time_ms"] == pytest.approx((c["times_ms"]["8x16"] * c["times_ms"]["1x4"]) ** 0.5, rel=1e-3)
        assert c["median_ms"] >= c["time_ms"] and set(c["cpu_ms"]) == {"8x16", "1x4"} and c["runs"] > 0
    assert auto["confidence"]["verdict"].startswith(("sure", "unsure")) and "machine" in auto["confidence"]["verdict"]
    assert auto["machine"]["cpus"] >= 1
    assert auto["chosen"] == chosen["candidate"] and engine.backend == chosen["backend"]
    assert engine.manifest.config.backend == chosen["backend"], "the engine says how it was really made"
    assert not list(tmp_path.glob(".e.auto*")), "candidates are cleaned up"


def test_timing_shapes_come_from_the_option_or_the_opt_shape():
    assert timing_shapes(optimize.CompileConfig(backend="auto", max_batch=16, max_seq=64)) == [(8, 64)]
    config = optimize.CompileConfig(backend="auto", max_seq=128, backend_options={"shapes": ["1x32", [8, 128]]})
    assert timing_shapes(config) == [(1, 32), (8, 128)]
    with pytest.raises(ConfigError, match="8x512 lies outside"):
        timing_shapes(optimize.CompileConfig(backend="auto", max_seq=128, backend_options={"shapes": ["8x512"]}))
    with pytest.raises(ConfigError, match="is not BATCHxSEQ"):
        timing_shapes(optimize.CompileConfig(backend="auto", backend_options={"shapes": ["eight"]}))


def test_quantized_candidates_are_listed_with_the_accuracy_they_were_judged_on():
    accuracy = {"max_abs_error": 0.9, "min_cosine": 0.95, "judged_on": ["real samples"],
                "samples": {"max_abs_error": 0.2, "min_cosine": 0.995}}
    assert judged_accuracy(accuracy) == {"max_abs_error": 0.2, "min_cosine": 0.995, "judged_on": ["real samples"]}
    both = {**accuracy, "judged_on": ["random inputs", "real samples"]}
    assert judged_accuracy(both)["min_cosine"] == 0.95 and judged_accuracy(both)["max_abs_error"] == 0.9


@contextlib.contextmanager
def cpu_burner(seconds: int = 300) -> Iterator[None]:
    """Another process spinning on every core, as a second user of the machine would; each
    spinner also stops by itself after `seconds`, should the test be killed."""
    spin = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


class BurnWhileTiming:
    """A compile reporter that starts `cpu_burner` as auto starts timing its candidates (the
    builds before would only take longer beside it) and keeps it spinning to the end."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack, self.burning = stack, False

    def start(self, stage: str, total: int | None = None) -> None:
        if stage.startswith("time ") and not self.burning:
            self.stack.enter_context(cpu_burner())
            self.burning = True

    def advance(self, detail: str = "") -> None:
        pass

    def finish(self, stage: str, seconds: float) -> None:
        pass


@pytest.mark.slow
def test_auto_chooses_the_same_engine_while_a_cpu_burner_spins_on_every_core(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str],
                                                                            monkeypatch: pytest.MonkeyPatch):
    source = hf_dir("bert", 2, **TINY_BERT)
    # One sentence of 8 tokens: eager pays Python dispatch for every op (~1.3 ms), ONNX Runtime
    # runs the graph in ~0.1 ms. The burner slows both, eager's two spinning OpenMP threads most.
    config = optimize.CompileConfig(backend="auto", max_batch=4, max_seq=16,
                                    backend_options={"backends": ["eager", "onnxruntime"], "shapes": ["1x8"]})
    quiet = optimize.compile(source, tmp_path / "quiet", config)
    with contextlib.ExitStack() as stack:
        reporter = BurnWhileTiming(stack)
        busy = optimize.compile(source, tmp_path / "busy", config, reporter=reporter)
        assert reporter.burning
    # ONNX Runtime with or without its fusions are within noise of each other: either may win.
    assert quiet.backend == busy.backend == "onnxruntime"
    record = busy.manifest.build["auto"]
    times = {c["candidate"]: c["time_ms"] or c["reason"] for c in record["candidates"]}
    assert times["eager/fp32"] > 3 * times[record["chosen"]], times
    verdict = record["confidence"]["verdict"]
    assert record["confidence"]["busy"] and record["machine"]["others_cpu"] > 0.25, verdict
    assert verdict.startswith(("sure:", "unsure:")) and "machine busy: other processes used" in verdict

    from optimize.cli import main

    monkeypatch.setenv("COLUMNS", "250")
    assert main(["info", str(tmp_path / "busy")]) == 0
    table = " ".join(capsys.readouterr().out.split())  # the caption wraps at the table's width
    assert "cpu/run" in table and "spread" in table and "machine busy" in table, "the CLI table says how sure it is"


def test_a_second_build_copies_the_kept_engine_and_a_damaged_one_is_rebuilt(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    import optimize.auto as auto_module
    from optimize.tuning import TuningCache

    source = hf_dir("bert", 2, **TINY_BERT)
    config = optimize.CompileConfig(backend="auto", max_batch=2, max_seq=16,
                                    backend_options={"backends": ["eager"], "shapes": ["1x8"]})
    cache = TuningCache(tmp_path / "cache" / "tuning.json")
    first = optimize.compile(source, tmp_path / "e1", config, tuning=cache)
    assert first.manifest.build["auto"]["tuning"] == {"cache": str(cache.path), "hit": False}
    [kept] = [p for p in cache.engines.root.iterdir() if not p.name.startswith(".")]
    feeds = {s.name: torch.ones(1, 8, dtype=torch.long) for s in first.manifest.inputs}

    built: list[str] = []
    real_build = auto_module.build_engine

    def refuse_to_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not build")

    monkeypatch.setattr(auto_module, "build_engine", refuse_to_build)
    second = optimize.compile(source, tmp_path / "e2", config, tuning=cache, name="again")
    tuning = second.manifest.build["auto"]["tuning"]
    assert tuning["hit"] is True and tuning["engine"]["copied_from"] == str(kept), "the manifest says where it came from"
    assert second.manifest.name == "again" and second.manifest.accuracy == first.manifest.accuracy
    assert torch.equal(second.run(feeds)["last_hidden_state"], first.run(feeds)["last_hidden_state"])

    def counting_build(*args: object, **kwargs: object) -> object:
        built.append(str(args[1]))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(auto_module, "build_engine", counting_build)
    payload = next(kept / "engine" / rel for rel in first.manifest.payload)
    payload.write_bytes(payload.read_bytes() + b"damaged")
    third = optimize.compile(source, tmp_path / "e3", config, tuning=cache)
    assert built == [str(tmp_path / "e3")], "a damaged kept engine: only the winner is rebuilt"
    assert third.manifest.build["auto"]["tuning"]["hit"] is True and "engine" not in third.manifest.build["auto"]["tuning"]
    record, why = cache.engines.restore(kept.name, third.manifest.build["auto"]["chosen"],
                                        third.manifest.build["auto"]["tuning"]["recorded"], tmp_path / "e4")
    assert record is not None, f"the rebuilt engine is kept again: {why}"

    def record_and_fail(*args: object, **kwargs: object) -> None:
        built.append(str(args[1]))
        raise OptimizeError("not built in this test")

    built.clear()
    monkeypatch.setattr(auto_module, "build_engine", record_and_fail)
    with pytest.raises(OptimizeError, match="no candidate passed"):
        optimize.compile(source, tmp_path / "e5", config, tuning=TuningCache(cache.path, retune=True))
    assert built == [str(tmp_path / ".e5.auto" / "0")], "--retune searches again, the kept engine unused"
