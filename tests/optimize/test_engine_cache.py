"""The engines kept beside the tuning cache: restored only when they are the search's and
intact, and bounded in disk use (least recently used evicted first)."""

import json
import os
from pathlib import Path

from optimize.engine_cache import EngineCache


def fake_engine(root: Path, name: str, size: int) -> Path:
    engine = root / name
    engine.mkdir(parents=True)
    (engine / "manifest.json").write_text("{}")
    (engine / "model.bin").write_bytes(b"w" * size)
    return engine


def test_kept_engines_are_evicted_least_recently_used_first_and_never_the_new_one(tmp_path: Path):
    cache = EngineCache(tmp_path / "tuning-engines", max_bytes=3000)  # two of these engines with their records
    assert cache.keep("a", "onnxruntime/fp32", "t1", fake_engine(tmp_path, "ea", 1000))
    assert cache.keep("b", "openvino/bf16", "t2", fake_engine(tmp_path, "eb", 1000))
    os.utime(cache.root / "a" / "record.json", (1, 1))  # "a" used longest ago
    assert cache.keep("c", "openvino/bf16", "t3", fake_engine(tmp_path, "ec", 1000))
    assert sorted(p.name for p in cache.root.iterdir()) == ["b", "c"]
    assert not cache.keep("d", "eager/fp32", "t4", fake_engine(tmp_path, "ed", 5000)), "larger than the cache"
    assert sorted(p.name for p in cache.root.iterdir()) == ["b", "c"]


def test_an_engine_of_another_search_or_with_changed_files_is_not_restored(tmp_path: Path):
    cache = EngineCache(tmp_path / "tuning-engines")
    cache.keep("a", "openvino/bf16", "t1", fake_engine(tmp_path, "ea", 10))
    out = tmp_path / "out"
    assert cache.restore("b", "openvino/bf16", "t1", out) == (None, "no engine kept for it")
    assert cache.restore("a", "onnxruntime/fp32", "t1", out) == (None, "the kept engine is from another search")
    assert cache.restore("a", "openvino/bf16", "t0", out) == (None, "the kept engine is from another search")
    record = json.loads((cache.root / "a" / "record.json").read_text())
    (cache.root / "a" / "record.json").write_text(json.dumps({**record, "kiln": "an older kiln"}))
    assert cache.restore("a", "openvino/bf16", "t1", out) == (None, "the kept engine was built by another kiln")
    (cache.root / "a" / "record.json").write_text(json.dumps(record))
    (cache.root / "a" / "engine" / "model.bin").write_bytes(b"x" * 10)
    assert cache.restore("a", "openvino/bf16", "t1", out) == (None, "the kept engine's files changed: model.bin")
    (cache.root / "a" / "engine" / "model.bin").unlink()
    assert cache.restore("a", "openvino/bf16", "t1", out) == (None, "the kept engine's files changed: model.bin")
    (cache.root / "a" / "record.json").write_text("{")
    assert cache.restore("a", "openvino/bf16", "t1", out)[1].startswith("its record cannot be read")
    assert not out.exists(), "nothing is copied unless every check passes"
