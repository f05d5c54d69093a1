"""Every file an engine names stays inside the engine directory: manifest paths (payload,
pipeline tokenizer) and symlinks are resolved and refused when they lead outside."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import optimize
from optimize.runtime.errors import EngineError
from optimize.runtime.manifest import engine_file


@pytest.fixture(scope="module")
def clean_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("manifest") / "eager"
    optimize.compile("tests.optimize.factories:tiny_mlp", out, optimize.CompileConfig(backend="eager", max_batch=4))
    return out


@pytest.fixture
def engine(clean_engine: Path, tmp_path: Path) -> Path:
    """A copy of the clean engine, one level down so that `..` has somewhere to go."""
    copy = tmp_path / "repository" / "1"
    shutil.copytree(clean_engine, copy)
    return copy


def _edit_manifest(engine: Path, **changes: object) -> None:
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest.update(changes)
    (engine / "manifest.json").write_text(json.dumps(manifest))


def _refusal(engine: Path) -> str:
    with pytest.raises(EngineError) as info:
        optimize.load(engine)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_absolute_and_dot_dot_payload_paths_are_refused(engine: Path):
    outside = engine.parent / "secret.bin"
    outside.write_bytes(b"not the engine's")
    payload = json.loads((engine / "manifest.json").read_text())["payload"]
    for bad in (str(outside), "../secret.bin", "pipeline/../../secret.bin"):
        _edit_manifest(engine, payload=[*payload, bad])
        assert f"payload file {bad!r} is not a relative path inside the engine directory" in _refusal(engine)


def test_a_payload_file_linked_outside_the_engine_is_refused(engine: Path):
    outside = engine.parent / "weights.safetensors"
    (engine / "weights.safetensors").rename(outside)
    (engine / "weights.safetensors").symlink_to(outside)
    message = _refusal(engine)
    assert "'weights.safetensors' resolves to" in message and "outside the engine directory" in message


def test_a_pipeline_tokenizer_outside_the_engine_is_refused_at_load(engine: Path):
    for bad in ("../../../tokenizer.json", "/etc/hostname"):
        _edit_manifest(engine, pipeline={"tokenizer": bad, "max_length": 8, "output": "output"})
        assert f"pipeline tokenizer 'pipeline/{bad}' is not a relative path inside" in _refusal(engine)


def test_a_file_no_manifest_names_but_linked_outside_is_refused(engine: Path, tmp_path: Path):
    (tmp_path / "cache.bin").write_bytes(b"")
    (engine / "runtime.cache").symlink_to(tmp_path / "cache.bin")  # a backend opens (and writes) such files by name
    assert "link 'runtime.cache' resolves to" in _refusal(engine)


def test_links_that_stay_inside_the_engine_and_a_linked_engine_directory_load(engine: Path, tmp_path: Path):
    (engine / "store").mkdir()
    (engine / "weights.safetensors").rename(engine / "store" / "weights.safetensors")
    (engine / "weights.safetensors").symlink_to(Path("store") / "weights.safetensors")
    (tmp_path / "current").symlink_to(engine)
    assert optimize.load(tmp_path / "current").run({"x": __import__("torch").randn(2, 16)})["output"].shape == (2, 4)


def test_engine_file_is_the_one_check_for_every_name(tmp_path: Path):
    assert engine_file(tmp_path, "pipeline/tokenizer.json", "x") == tmp_path / "pipeline" / "tokenizer.json"
    for bad in ("", "/abs", "a/../../b", "..", "a//b", "./a", "a\\..\\b"):
        with pytest.raises(EngineError, match="is not a relative path inside the engine directory"):
            engine_file(tmp_path, bad, "payload file")
