"""Repository layout: numeric versions, the latest served, broken models skipped and reported."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from optimize.runtime.errors import EngineError
from server.errors import ConfigError, NotFound
from server.repository import Repository
from tests.server.fakes import FakeEngine, token_manifest


def fake_loader(loaded: list[Path]):  # type: ignore[no-untyped-def]
    """Loads a FakeEngine from any directory holding a file `engine`; fails like optimize.load otherwise."""

    def load(path: Path) -> FakeEngine:
        loaded.append(path)
        if not (path / "engine").exists():
            raise EngineError(f"{path} is not an engine directory: manifest.json not found")
        return FakeEngine(token_manifest(name=path.parent.name))

    return load


def layout(root: Path, model: str, versions: list[str], config: str | None = None) -> None:
    for version in versions:
        (root / model / version).mkdir(parents=True)
        (root / model / version / "engine").write_text("")
    (root / model).mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / model / "config.toml").write_text(config)


def test_the_latest_numeric_version_is_served(tmp_path: Path):
    layout(tmp_path, "m", ["1", "3", "20", "latest", "0"])
    loaded: list[Path] = []
    repo = Repository.load(tmp_path, loader=fake_loader(loaded))
    assert repo.models["m"].version == 20
    assert loaded == [tmp_path / "m" / "20"]  # older versions are not even loaded


def test_config_toml_is_applied_to_the_model(tmp_path: Path):
    layout(tmp_path, "m", ["1"], config="max_batch_size = 4\nmax_queue_delay_us = 500\ninstances = 2\n")
    model = Repository.load(tmp_path, loader=fake_loader([])).models["m"]
    assert (model.max_batch_size, model.config.max_queue_delay_us, model.config.instances) == (4, 500, 2)


def test_max_batch_size_defaults_to_the_engine_maximum(tmp_path: Path):
    layout(tmp_path, "m", ["1"])
    assert Repository.load(tmp_path, loader=fake_loader([])).models["m"].max_batch_size == 8


def test_unreadable_models_are_skipped_and_reported_while_the_rest_is_served(tmp_path: Path, caplog):
    layout(tmp_path, "good", ["1"])
    layout(tmp_path, "no_versions", [])
    layout(tmp_path, "bad_config", ["1"], config="instances = 0\n")
    layout(tmp_path, "too_big", ["1"], config="max_batch_size = 64\n")
    (tmp_path / "not_an_engine" / "1").mkdir(parents=True)
    with caplog.at_level(logging.ERROR, logger="server.repository"):
        repo = Repository.load(tmp_path, loader=fake_loader([]))
    assert list(repo.models) == ["good"]
    assert set(repo.failures) == {"no_versions", "bad_config", "too_big", "not_an_engine"}
    assert "no version directory" in repo.failures["no_versions"]
    assert "instances must be an integer" in repo.failures["bad_config"]
    assert "max_batch_size = 64 but the engine accepts batches up to 8" in repo.failures["too_big"]
    assert "manifest.json not found" in repo.failures["not_an_engine"]
    for name in repo.failures:
        assert any(f"model '{name}' is not served" in r.getMessage() for r in caplog.records)


def test_an_unexpected_loader_crash_only_skips_that_model(tmp_path: Path):
    layout(tmp_path, "a", ["1"])
    layout(tmp_path, "b", ["1"])

    def load(path: Path) -> FakeEngine:
        if path.parent.name == "a":
            raise RuntimeError("onnxruntime exploded")
        return FakeEngine()

    repo = Repository.load(tmp_path, loader=load)
    assert list(repo.models) == ["b"]
    assert repo.failures["a"] == "RuntimeError: onnxruntime exploded"


def test_a_missing_repository_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="is not a directory"):
        Repository.load(tmp_path / "nope")


def test_unknown_models_and_versions_answer_not_found_in_tritons_words(tmp_path: Path):
    layout(tmp_path, "m", ["2"])
    layout(tmp_path, "broken", [])
    repo = Repository.load(tmp_path, loader=fake_loader([]))
    assert repo.get("m").version == 2 and repo.get("m", "2").version == 2
    with pytest.raises(NotFound, match=r"Request for unknown model: 'x' is not found \(served models: m\)"):
        repo.get("x")
    with pytest.raises(NotFound, match="'m' version 1 is not found"):
        repo.get("m", "1")
    with pytest.raises(NotFound, match="'broken' is not available: .*no version directory"):
        repo.get("broken")
