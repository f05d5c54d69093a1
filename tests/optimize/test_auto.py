"""`--backend auto`: every candidate built and verified, timed in its own process, fastest kept."""

import json
from pathlib import Path

import pytest
import torch

import optimize
from optimize.auto import candidates, judged_accuracy, timing_shapes
from optimize.backends.base import cpu_has_native_bf16
from optimize.errors import ConfigError


def test_candidates_follow_the_precision_asked_for():
    fp32 = {(c.backend, c.precision) for c in candidates(optimize.CompileConfig(backend="auto"))}
    assert ("eager", "fp32") in fp32 and ("onnxruntime", "fp32") in fp32
    assert all(p == "fp32" for _, p in fp32), "an fp32 request admits fp32 engines only"
    if not torch.cuda.is_available():
        assert not any(b == "triton" for b, _ in fp32), "Triton kernels run as references on a CPU: never tried"
    int8 = {(c.backend, c.precision) for c in candidates(optimize.CompileConfig(backend="auto", precision="int8"))}
    assert {("onnxruntime", "int8"), ("onnxruntime", "int8-weight"), ("onnxruntime", "fp32")} <= int8
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
    table = {c["candidate"]: c for c in auto["candidates"]}
    assert set(table) == {"eager/fp32", "onnxruntime/fp32[ort_fusions=False]", "onnxruntime/fp32[ort_fusions=True]",
                          "onnxruntime/int8-weight[ort_fusions=False]", "onnxruntime/int8-weight[ort_fusions=True]",
                          *(["eager/bf16"] if cpu_has_native_bf16() else [])}, "bf16 is admitted: more accurate than int8"
    rejected = [c for c in table.values() if c["status"] == "rejected"]
    assert rejected and all(c["precision"] in ("int8-weight", "bf16") and "disagrees with fp32 eager" in c["reason"]
                            for c in rejected)
    timed = [c for c in table.values() if c["status"] in ("passed", "chosen")]
    chosen = next(c for c in timed if c["status"] == "chosen")
    assert chosen["median_ms"] == min(c["median_ms"] for c in timed) > 0
    assert auto["shapes"] == ["8x16", "1x4"] and all(set(c["times_ms"]) == {"8x16", "1x4"} for c in timed)
    for c in timed:  # ranked by the geometric mean of the per-shape medians
        assert c["median_ms"] == pytest.approx((c["times_ms"]["8x16"] * c["times_ms"]["1x4"]) ** 0.5)
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
