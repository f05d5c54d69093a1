"""The ONNX-pass interface: one rewrite of an `onnx.ModelProto` that reports what it matched."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
import time

import onnx
import torch

from optimize.runtime.config import CompileConfig
from optimize.runtime.specs import TensorSpec

if TYPE_CHECKING:
    from optimize.reporter import Reporter

Feeds = dict[str, torch.Tensor]


@dataclass
class OnnxPassContext:
    """What an ONNX pass may consult.

    `samples` returns calibration batches (real sentences for text models; computed once, on
    first use, because only calibrated passes need them). `reference` is the fp32 eager model,
    for passes verified one by one. `record` collects details for the manifest's `build` entry
    (e.g. which nodes stayed in fp32 and why). `workdir` is scratch space for tools that only
    read files (ONNX Runtime's calibrators and quantizer).
    """

    config: CompileConfig
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    backend: str
    workdir: Path
    samples: Callable[[], list[Feeds]] | None = None
    reference: Callable[..., dict[str, torch.Tensor]] | None = None
    reporter: Reporter | None = None
    options: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.samples is not None:
            self.samples = functools.cache(self.samples)

    def progress(self, stage: str, total: int | None = None) -> StageProgress:
        """A progress handle for a long step inside a pass (a bar in the CLI)."""
        return StageProgress(self.reporter, stage, total)


class StageProgress:
    """A stage of the compile's progress display, used as a context manager; `advance` steps it."""

    def __init__(self, reporter: Reporter | None, stage: str, total: int | None) -> None:
        self.reporter, self.stage, self.total = reporter, stage, total

    def __enter__(self) -> StageProgress:
        self._t0 = time.perf_counter()
        if self.reporter is not None:
            self.reporter.start(self.stage, self.total)
        return self

    def advance(self, detail: str = "") -> None:
        if self.reporter is not None:
            self.reporter.advance(detail)

    def __exit__(self, *exc: object) -> None:
        if self.reporter is not None:
            self.reporter.finish(self.stage, round(time.perf_counter() - self._t0, 3))


class OnnxPass(ABC):
    """A named rewrite of an ONNX model. `run` may edit `model` in place or return a new one;
    it returns the model to continue with and its match counts by kind."""

    name: ClassVar[str]
    description: ClassVar[str]

    def applies(self, ctx: OnnxPassContext) -> str:
        """Empty when the pass should run in `ctx`, else the reason it is skipped."""
        return ""

    @abstractmethod
    def run(self, model: onnx.ModelProto, ctx: OnnxPassContext) -> tuple[onnx.ModelProto, dict[str, int]]:
        """Rewrite `model`; return the result and match counts (e.g. {"layernorm": 13})."""
