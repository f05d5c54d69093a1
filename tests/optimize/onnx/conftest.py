"""Fixtures for the ONNX passes: all-MiniLM-L6-v2 exported once, real sentences, a runner."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch

from optimize.onnx import OnnxPassContext, export_program
from optimize.runtime.config import CompileConfig
from optimize.sources.base import Source
from tests.optimize.onnx.shapes import CONFIG



@pytest.fixture(scope="session")
def minilm_source(minilm_model_dir: Path) -> Source:
    from optimize.sources import load_source

    return load_source(minilm_model_dir, CONFIG)


@pytest.fixture(scope="session")
def minilm_export(minilm_source: Source) -> tuple[onnx.ModelProto, list]:
    """The exporter's MiniLM graph (before any ONNX pass) and its output specs."""
    from optimize.capture import capture, output_specs

    program = capture(minilm_source)
    outputs = output_specs(program, minilm_source.inputs)
    return export_program(program, minilm_source.inputs, outputs), outputs


@pytest.fixture
def minilm_onnx(minilm_export: tuple[onnx.ModelProto, list]) -> onnx.ModelProto:
    """A fresh copy per test: passes may edit the model in place."""
    return copy.deepcopy(minilm_export[0])


@pytest.fixture(scope="session")
def sentence_batches(minilm_source: Source) -> list[dict[str, torch.Tensor]]:
    from optimize.samples import verification_feeds

    return verification_feeds(minilm_source, CONFIG)


@pytest.fixture
def pass_context(minilm_source: Source, minilm_export, tmp_path: Path) -> Callable[..., OnnxPassContext]:
    """An `OnnxPassContext` for MiniLM at the given precision / backend options."""
    from optimize.samples import calibration_feeds

    def make(precision: str = "fp32", backend: str = "tensorrt", **options: object) -> OnnxPassContext:
        config = CompileConfig(max_batch=CONFIG.max_batch, max_seq=CONFIG.max_seq, precision=precision)
        return OnnxPassContext(config, minilm_source.inputs, minilm_export[1], backend, tmp_path,
                               samples=lambda: calibration_feeds(minilm_source, config),
                               reference=minilm_source.module, options=dict(options))

    return make
