"""A fake Engine for server tests: real Engine API (specs, validation, numpy in/out), a
trivial `_run` whose outputs reveal which rows it saw, and a record of every call."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from optimize.runtime.config import CompileConfig
from optimize.runtime.engine import Engine
from optimize.runtime.manifest import Manifest
from optimize.runtime.pipeline import Encoded, Pipeline
from optimize.runtime.specs import Dim, TensorSpec

VOCAB = 100
WIDTH = 4


def token_manifest(name: str = "fake", max_batch: int = 8, max_seq: int = 16) -> Manifest:
    """Inputs `input_ids` / `attention_mask` int64 [batch, seq] (ids < VOCAB); output
    `features` float32 [batch, 4]."""
    config = CompileConfig(backend="eager", max_batch=max_batch, max_seq=max_seq)
    batch, seq = config.dims["batch"], config.dims["seq"]
    return Manifest(
        name=name,
        backend="fake",
        config=config,
        inputs=[
            TensorSpec("input_ids", "int64", (batch, seq), value_range=(0, VOCAB - 1)),
            TensorSpec("attention_mask", "int64", (batch, seq), value_range=(0, 1)),
        ],
        outputs=[
            TensorSpec("features", "float32", (batch, WIDTH)),
            TensorSpec("lengths", "int64", (batch,)),
        ],
        source={"kind": "test"},
        payload=[],
    )


def expected_features(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What FakeEngine returns for each row: sum of ids, first id, last id, masked sum."""
    return np.stack([ids.sum(1), ids[:, 0], ids[:, -1], (ids * mask).sum(1)], axis=1).astype(np.float32)


class FakeEngine(Engine):
    """Per-row features of its inputs, so a test can tell whether a batch was split back in the
    right order. `calls` records the batch size of every run; `delay_s` makes each run take
    that long (so concurrent requests queue and batch); `fail_with` makes runs raise."""

    def __init__(self, manifest: Manifest | None = None, delay_s: float = 0.0) -> None:
        super().__init__(Path("fake-engine"), manifest or token_manifest())
        self.delay_s = delay_s
        self.fail_with: Exception | None = None
        self.calls: list[int] = []
        self._lock = threading.Lock()
        self.running = 0
        self.max_running = 0

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        with self._lock:
            self.calls.append(int(ids.shape[0]))
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.fail_with is not None:
                raise self.fail_with
            features = torch.from_numpy(expected_features(ids.numpy(), mask.numpy()))
            return {"features": features, "lengths": mask.sum(1)}
        finally:
            with self._lock:
                self.running -= 1


def echo_manifest(name: str = "echo", max_batch: int = 4, max_width: int = 4 * 1024 * 1024) -> Manifest:
    """Input `x` float32 [batch, width] with width up to 4 Mi elements (16 MiB per sample);
    output `y` = 2x."""
    config = CompileConfig(backend="eager", max_batch=max_batch, max_seq=max_width)
    batch = config.dims["batch"]
    width = Dim("width", 1, 1, max_width)
    return Manifest(
        name=name, backend="fake", config=config,
        inputs=[TensorSpec("x", "float32", (batch, width))],
        outputs=[TensorSpec("y", "float32", (batch, width))],
        source={"kind": "test"}, payload=[],
    )


class EchoEngine(Engine):
    """Doubles its input: big messages in, big messages out."""

    def __init__(self) -> None:
        super().__init__(Path("echo-engine"), echo_manifest())

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": inputs["x"] * 2}


class FakePipeline(Pipeline):
    """optimize's Pipeline with a tokenizer of its own (one token per word: its length, capped
    below VOCAB; at most `max_length`, the engine's longest sequence): a feature-extraction
    pipeline whose text requests get `output`. `calls` records the texts of every tokenize
    call; `delay_s` makes each call take that long."""

    def __init__(self, output: str = "features", delay_s: float = 0.0) -> None:  # no tokenizer file to load
        self.tokenizer_path, self.max_length, self.pad_id, self.output = Path("fake-tokenizer"), 16, 0, output
        self.pooling, self.normalize, self.task, self.labels = None, False, "feature-extraction", ()
        self.activation, self.pair, self.token_types, self.unk_id = None, False, False, None
        self.delay_s = delay_s
        self.calls: list[list[str]] = []

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        self.calls.append(list(texts))
        if self.delay_s:
            time.sleep(self.delay_s)
        words = [[min(len(w), VOCAB - 1) for w in t.split()][:self.max_length] or [1] for t in texts]
        longest = max(len(w) for w in words)
        ids = np.zeros((len(texts), longest), np.int64)
        mask = np.zeros_like(ids)
        for row, w in enumerate(words):
            ids[row, :len(w)], mask[row, :len(w)] = w, 1
        return {"input_ids": ids, "attention_mask": mask}

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> Encoded:
        feeds = self.tokenize(list(texts))
        mask = feeds["attention_mask"]
        return Encoded(feeds, tuple(texts), None, np.zeros((*mask.shape, 2), np.int64), mask == 0)


class FakeTextEngine(FakeEngine):
    """A FakeEngine with a text pipeline, as engines compiled from a tokenizer directory have."""

    def __init__(self, delay_s: float = 0.0, tokenize_delay_s: float = 0.0) -> None:
        super().__init__(delay_s=delay_s)
        self.fake_pipeline = FakePipeline(delay_s=tokenize_delay_s)

    @property
    def pipeline(self) -> FakePipeline:  # type: ignore[override]
        return self.fake_pipeline


class SlowOnZeroEngine(FakeEngine):
    """Takes `slow_s` for a batch whose first token id is 0, no time otherwise: lets a later
    batch finish before an earlier one on another instance."""

    def __init__(self, slow_s: float) -> None:
        super().__init__()
        self.slow_s = slow_s

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if int(inputs["input_ids"][0, 0]) == 0:
            time.sleep(self.slow_s)
        return super()._run(inputs)
