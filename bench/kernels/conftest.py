"""Kernel benchmarks: GPU only, skipped cleanly elsewhere.

Run on a GPU machine (TRITON_INTERPRET unset) and keep the JSON::

    pytest bench/kernels --benchmark-json bench/results/kernels-$(date +%F).json

Benchmark files are named ``bench_<op>.py``; bench/conftest.py collects them (the test run
never does) and skips them without a GPU.
"""

from __future__ import annotations


import pytest
import torch



@pytest.fixture(scope="session")
def ceilings():
    """The device's measured copy bandwidth and bf16 matmul rate, once per session."""
    from bench.kernels.ceilings import measure_ceilings

    return measure_ceilings(torch.cuda.current_device())


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Add the measured ceilings to the machine description (bench/conftest.py has the rest)."""
    if torch.cuda.is_available():
        from bench.kernels.ceilings import measure_ceilings

        machine_info["ceilings"] = measure_ceilings(torch.cuda.current_device()).as_dict()
