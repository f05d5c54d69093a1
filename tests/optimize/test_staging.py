from pathlib import Path

import pytest

from optimize.staging import staged_directory


def test_a_finished_block_replaces_the_directory_whole(tmp_path: Path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with staged_directory(out) as staging:
        assert staging.parent == out.parent and staging != out
        (staging / "new.bin").write_text("new")
        assert (out / "old.bin").exists(), "readers see the old engine until the block ends"
    assert sorted(p.name for p in out.iterdir()) == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"], "nothing is left beside it"


def test_a_failed_block_leaves_the_old_directory_and_no_staging(tmp_path: Path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with pytest.raises(RuntimeError, match="build failed"):
        with staged_directory(out) as staging:
            (staging / "half.bin").write_text("half")
            raise RuntimeError("build failed")
    assert sorted(p.name for p in out.iterdir()) == ["old.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_the_parent_is_created(tmp_path: Path):
    out = tmp_path / "a" / "b" / "engine"
    with staged_directory(out) as staging:
        (staging / "x").write_text("x")
    assert (out / "x").read_text() == "x"
