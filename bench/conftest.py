"""Shared by the benchmark suites: collection of `bench_*.py` files (so the test run never
collects them), a clean skip of the GPU suites (bench/kernels, bench/models: marked `gpu`)
without a GPU, and the machine description every result JSON carries."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
import torch

CAN_RUN = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CAN_RUN:
        return
    skip = pytest.mark.skip(reason="GPU benchmarks need a CUDA GPU (and TRITON_INTERPRET unset)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Record what the numbers were measured on: versions and the device."""
    import triton

    machine_info["python"] = platform.python_version()
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["cpu_count"] = os.cpu_count()
    if CAN_RUN:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        machine_info["gpu"] = props.name
        machine_info["gpu_capability"] = f"{props.major}.{props.minor}"
        machine_info["gpu_sms"] = props.multi_processor_count
        machine_info["cuda"] = torch.version.cuda
