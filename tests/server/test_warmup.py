"""Warm-up at load (`warmup` in config.toml, `server.warmup`): the shapes it runs, what it
refuses, and that a model is served only after it, or not at all when it fails."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from optimize.runtime.config import CompileConfig
from optimize.runtime.errors import EngineError
from optimize.runtime.specs import TensorSpec
from server.errors import ConfigError
from server.model_config import model_config
from server.repository import Repository
from server.warmup import warmup_inputs
from tests.server.fakes import VOCAB, FakeEngine, token_manifest


class RecordingEngine(FakeEngine):
    """A FakeEngine that records the inputs of every call, and whether it was a warm-up."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.seen: list[dict[str, torch.Tensor]] = []
        self.warmed: list[tuple[int, ...]] = []

    def warm(self, inputs):  # type: ignore[no-untyped-def]
        self.warmed.append(tuple(next(iter(inputs.values())).shape))
        super().warm(inputs)

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.seen.append({k: v.clone() for k, v in inputs.items()})
        return super()._run(inputs)


def _repository(root: Path, config: str, engine: FakeEngine) -> Repository:
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "config.toml").write_text(config)
    return Repository.load(root, loader=lambda path: engine)


def test_each_warmup_shape_runs_once_at_load_before_the_model_is_served(tmp_path: Path):
    engine = RecordingEngine(token_manifest(max_batch=8, max_seq=16))
    repo = _repository(tmp_path, "warmup = [[8, 16], [1, 4], [8, 16]]\n", engine)
    assert "m" in repo.models and not repo.failures
    assert engine.warmed == [(8, 16), (1, 4)], "in the order given, a repeated shape once"
    assert [tuple(s["input_ids"].shape) for s in engine.seen] == [(8, 16), (1, 4)]
    ids = engine.seen[0]["input_ids"]
    assert ids.dtype == torch.int64 and int(ids.min()) == int(ids.max()) == 0, "the lowest valid id, as zero_data"
    assert model_config(repo.models["m"]).parameters["warmup"].string_value == "8x16,1x4"


def test_no_warmup_by_default(tmp_path: Path):
    engine = RecordingEngine()
    _repository(tmp_path, "", engine)
    assert engine.seen == []


@pytest.mark.parametrize("config, reason", [
    ("warmup = [[4, 64]]", "tokens 64 is outside the engine's range 1..16 for input 'input_ids'"),
    ("warmup = [[16, 8]]", "batch 16 exceeds max_batch_size 8"),
])
def test_a_shape_the_engine_refuses_fails_the_load_and_says_why(tmp_path: Path, config: str, reason: str):
    engine = RecordingEngine(token_manifest(max_batch=8, max_seq=16))
    repo = _repository(tmp_path, config + "\n", engine)
    assert "m" not in repo.models
    assert reason in repo.failures["m"] and "config.toml" in repo.failures["m"]
    assert engine.seen == []


def test_a_warmup_call_that_fails_fails_the_load(tmp_path: Path):
    engine = RecordingEngine()
    engine.fail_with = EngineError("out of memory at this shape")
    repo = _repository(tmp_path, "warmup = [[2, 8]]\n", engine)
    assert "m" not in repo.models
    assert "warmup [2, 8] failed: out of memory at this shape" in repo.failures["m"]


def test_inputs_take_the_bottom_of_their_value_range_and_the_packed_mask_ones():
    manifest = token_manifest(max_batch=4, max_seq=8)
    shifted = [replace(manifest.inputs[0], value_range=(3, VOCAB - 1)), manifest.inputs[1]]
    engine = FakeEngine(replace(manifest, inputs=shifted, build={"packed_batches": {"mask_input": "attention_mask"}}))
    inputs = warmup_inputs(engine, 3, 5)
    assert {k: tuple(v.shape) for k, v in inputs.items()} == {"input_ids": (3, 5), "attention_mask": (3, 5)}
    assert bool((inputs["input_ids"] == 3).all()) and bool((inputs["attention_mask"] == 1).all())
    assert engine.check_inputs(inputs) is None


def test_an_engine_without_a_batch_dim_takes_batch_one_only():
    config = CompileConfig(backend="eager", max_batch=4, max_seq=8)
    seq = config.dims["seq"]
    manifest = replace(token_manifest(), inputs=[TensorSpec("input_ids", "int64", (seq,), value_range=(0, VOCAB - 1))])
    engine = FakeEngine(manifest)
    assert engine.max_batch_size == 0
    assert tuple(warmup_inputs(engine, 1, 6)["input_ids"].shape) == (6,)
    with pytest.raises(ConfigError, match=r"warmup \[2, 6\]: the engine has no batch dimension"):
        warmup_inputs(engine, 2, 6)
