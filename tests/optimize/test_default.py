"""The CLI's default: no --backend or --precision measures the candidates under the task's guard,
and a tuning cache makes the next build of the same model rebuild only the winner."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimize.runtime.config import CompileConfig, Tolerance
from optimize.guards import task_guard
from optimize.tuning import TuningCache, tuning_key
from optimize.verify import AccuracyReport, compare, judge
from tests.optimize.task_models import task_dir

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "optimize", *args], cwd=ROOT, env={**os.environ, "COLUMNS": "250"},
                          capture_output=True, text=True, timeout=600)


def test_default_compile_measures_under_the_task_guard_then_reuses_the_cached_choice(tmp_path: Path,
                                                                                      minilm_model_dir: Path):
    model = task_dir("classifier", tmp_path, minilm_model_dir)
    cache = tmp_path / "cache" / "tuning.json"
    # The default path with the search narrowed to two quick backends (CI time); nothing else given.
    common = ["--max-batch", "4", "--max-seq", "32", "--tuning-cache", str(cache),
              "--backend-option", 'backends=["eager", "onnxruntime"]']
    first = run_cli("compile", str(model), "-o", str(tmp_path / "e1"), *common)
    assert first.returncode == 0, first.stderr[-3000:]
    auto = json.loads((tmp_path / "e1" / "manifest.json").read_text())["build"]["auto"]
    assert auto["asked"] == {"precision": "auto", "tolerance": {"max_abs_error": None, "min_cosine": 0.9999,
                                                                "same_labels": True, "real_samples_only": True}}
    assert auto["shapes"] == ["4x32", "1x32"], "the opt shape and one short request"
    table = {c["candidate"]: c for c in auto["candidates"]}
    assert "onnxruntime/fp32[ort_fusions=True]" in table and "eager/fp32" in table
    skipped = {c["candidate"]: c["reason"] for c in table.values() if c["status"] == "skipped"}
    assert "int8 quantization noise" in skipped["onnxruntime/int8"], "int8 cannot keep cosine 0.9999: said, not built"
    assert "skipped:" in first.stdout, "the summary lists the skipped candidates with their reasons"
    chosen = table[auto["chosen"]]
    assert chosen["status"] == "chosen" and chosen["accuracy"]["judged_on"] == ["real samples"]
    assert auto["tuning"] == {"cache": str(cache), "hit": False}
    entry = next(iter(json.loads(cache.read_text())["entries"].values()))
    assert entry["chosen"] == auto["chosen"]
    assert entry["key"]["cpu"]["flags"] and entry["key"]["versions"]["torch"] == torch.__version__
    assert len(entry["key"]["model"]) >= 16, "the model's content digest"

    second = run_cli("compile", str(model), "-o", str(tmp_path / "e2"), *common)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "tuning cache" in second.stderr and "candidate 1/" not in second.stderr, "nothing is searched again"
    assert "build (" not in second.stderr, "the winner's kept engine is copied, not rebuilt"
    again = json.loads((tmp_path / "e2" / "manifest.json").read_text())
    assert again["build"]["auto"]["chosen"] == auto["chosen"] and again["build"]["auto"]["tuning"]["hit"] is True
    assert again["build"]["auto"]["tuning"]["engine"]["copied_from"].startswith(str(cache.parent / "tuning-engines"))
    assert f"{again['backend']}/{again['config']['precision']}" == auto["chosen"].split("[")[0]
    assert again["accuracy"]["samples"]["labels_compared"] > 0, "the copy carries its verification, labels included"


def test_guards_follow_the_task():
    assert task_guard("feature-extraction") == Tolerance(max_abs_error=math.inf, min_cosine=0.9999,
                                                         real_samples_only=True)
    assert task_guard("text-classification").same_labels and task_guard("token-classification").same_labels
    assert task_guard("sentence-pair").max_abs_error == 0.01, "one score has no cosine"
    assert task_guard(None) == task_guard("feature-extraction")


def test_a_classifier_that_changes_a_label_fails_its_guard_though_its_cosine_passes():
    logits = torch.tensor([[2.0, 1.999, -3.0], [0.1, 0.5, 4.0]])
    flipped = torch.tensor([[1.999, 2.0, -3.0], [0.1, 0.5, 4.0]])
    stats = compare({"logits": logits}, {"logits": flipped})
    assert stats["logits"]["labels_differ"] == 1 and stats["logits"]["min_cosine"] > 0.9999
    report = AccuracyReport()
    report.add(stats, "on sample batch")
    config = CompileConfig(backend="auto", precision="auto", tolerance=task_guard("text-classification"))
    entry, failure = judge(AccuracyReport(), report, config)
    assert "another label than fp32 eager on 1 of 2" in failure and entry["judged_on"] == ["real samples"]


def test_tuning_cache_keys_on_model_and_request_and_sets_aside_what_it_cannot_read(tmp_path: Path):
    cache = TuningCache(tmp_path / "tuning.json")
    key = tuning_key("digest-a", {"shapes": ["8x128"]})
    assert cache.lookup(key) is None
    cache.store(key, {"chosen": "openvino/bf16", "auto": {}})
    assert cache.lookup(key)["chosen"] == "openvino/bf16"
    assert cache.lookup(tuning_key("digest-b", {"shapes": ["8x128"]})) is None, "another model"
    assert cache.lookup(tuning_key("digest-a", {"shapes": ["1x32"]})) is None, "another request"
    assert TuningCache(cache.path, retune=True).lookup(key) is None
    cache.path.write_text("{not json")
    assert cache.lookup(key) is None and (tmp_path / "tuning.json.unreadable").exists()


def _store_many(path: str, writer: int, count: int, start) -> None:
    start.wait()
    cache = TuningCache(Path(path))
    for i in range(count):
        cache.store(tuning_key(f"model-{writer}-{i}", {"shapes": ["8x128"]}), {"chosen": f"writer-{writer}", "auto": {}})


def test_compiles_finishing_together_keep_every_entry(tmp_path: Path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    writers, count = 3, 15
    start = context.Barrier(writers)
    processes = [context.Process(target=_store_many, args=(str(tmp_path / "tuning.json"), w, count, start))
                 for w in range(writers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
        assert p.exitcode == 0
    cache = TuningCache(tmp_path / "tuning.json")
    missing = [(w, i) for w in range(writers) for i in range(count)
               if cache.lookup(tuning_key(f"model-{w}-{i}", {"shapes": ["8x128"]})) is None]
    assert not missing, f"{len(missing)} of {writers * count} entries lost to a concurrent writer"


def test_precision_auto_needs_backend_auto():
    from optimize.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="precision 'auto'.*needs backend 'auto'"):
        CompileConfig(backend="onnxruntime", precision="auto")
