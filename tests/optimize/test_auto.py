"""`--backend auto`: every candidate built and verified, timed in its own process, fastest kept."""

import json
from pathlib import Path

import pytest

import optimize
from optimize.auto import candidates
from optimize.errors import ConfigError


def test_candidates_follow_the_precision_asked_for():
    fp32 = {(c.backend, c.precision) for c in candidates(optimize.CompileConfig(backend="auto"))}
    assert ("eager", "fp32") in fp32 and ("onnxruntime", "fp32") in fp32
    assert all(p == "fp32" for _, p in fp32), "an fp32 request admits fp32 engines only"
    int8 = {(c.backend, c.precision) for c in candidates(optimize.CompileConfig(backend="auto", precision="int8"))}
    assert {("onnxruntime", "int8"), ("onnxruntime", "int8-weight"), ("onnxruntime", "fp32")} <= int8
    assert not any(p in ("fp16", "bf16") and b != "tensorrt" for b, p in int8), "CPUs only emulate fp16"
    with pytest.raises(ConfigError, match="unknown backend.s. nope"):
        candidates(optimize.CompileConfig(backend="auto", backend_options={"backends": ["nope"]}))


def test_auto_keeps_the_fastest_accurate_engine_and_records_every_candidate(tmp_path: Path):
    config = optimize.CompileConfig(backend="auto", precision="int8-weight", max_batch=8,
                                    tolerance=optimize.Tolerance(max_abs_error=1e-4, min_cosine=0.99999),
                                    backend_options={"backends": ["eager", "onnxruntime"]})
    engine = optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e", config)
    auto = json.loads((tmp_path / "e" / "manifest.json").read_text())["build"]["auto"]
    table = {c["candidate"]: c for c in auto["candidates"]}
    assert set(table) == {"eager/fp32", "onnxruntime/fp32[ort_fusions=False]", "onnxruntime/fp32[ort_fusions=True]",
                          "onnxruntime/int8-weight[ort_fusions=False]", "onnxruntime/int8-weight[ort_fusions=True]"}
    rejected = [c for c in table.values() if c["status"] == "rejected"]
    assert rejected and all(c["precision"] == "int8-weight" and "disagrees with fp32 eager" in c["reason"] for c in rejected)
    timed = [c for c in table.values() if c["status"] in ("passed", "chosen")]
    chosen = next(c for c in timed if c["status"] == "chosen")
    assert chosen["median_ms"] == min(c["median_ms"] for c in timed) > 0
    assert auto["chosen"] == chosen["candidate"] and engine.backend == chosen["backend"]
    assert engine.manifest.config.backend == chosen["backend"], "the engine says how it was really made"
    assert not list(tmp_path.glob(".e.auto*")), "candidates are cleaned up"
