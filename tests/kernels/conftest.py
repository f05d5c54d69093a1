"""Shared fixtures for the kernel tests.

Every numerical test takes the ``device`` fixture: ``cpu`` runs the Triton kernels under the
interpreter (``TRITON_INTERPRET=1``, what CI does), ``cuda`` runs them compiled on a GPU and
carries the ``gpu`` marker. Each side skips itself where it cannot run.
"""

from __future__ import annotations

import os
import zlib

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before `kiln_kernels`
# is imported; the root conftest does the same, this keeps `pytest tests/kernels` standalone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kiln_kernels._util import INTERPRET  # noqa: E402

# Tolerances against a float64 reference: about two output ulps at |y| ~ 1 for the half types
# (fp16 ulp 2**-10, bf16 ulp 2**-7), fp32 allows for reduction-order differences.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),  # (atol, rtol)
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")


@pytest.fixture(
    params=[
        pytest.param("cpu", id="interpreter"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    ]
)
def device(request: pytest.FixtureRequest) -> str:
    """Where the Triton path runs: the interpreter on CPU, or a GPU compiled."""
    if request.param == "cpu" and not INTERPRET:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    if request.param == "cuda" and (INTERPRET or not torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU and TRITON_INTERPRET unset")
    return request.param


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """Fresh inputs per test, reproducible per test id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Compare in float64 on CPU with the tolerance of ``dtype`` (default: ``actual.dtype``).
    NaN anywhere in ``actual`` fails, so unwritten elements of a NaN-poisoned buffer show."""
    default_atol, default_rtol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.detach().cpu().double(),
        expected.detach().cpu().double(),
        atol=default_atol if atol is None else atol,
        rtol=default_rtol if rtol is None else rtol,
    )


@pytest.fixture
def assert_close():
    """``assert_close(actual, expected, dtype=None, atol=None, rtol=None)``."""
    return _assert_close


def _poisoned(shape, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def poisoned():
    """``poisoned(shape, dtype, device)``: an output buffer full of NaN."""
    return _poisoned


@pytest.fixture(
    params=[
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    ]
)
def op_device(request: pytest.FixtureRequest) -> str:
    """Where a ``torch.ops.kiln.*`` call runs: CPU dispatches to the reference, CUDA to
    Triton. Needs no interpreter."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return request.param
