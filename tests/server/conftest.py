"""Server test fixtures: every test bounded in time, a fake engine and a server around it
(the helpers themselves live in tests/server/harness.py)."""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator

import pytest

from tests.server.fakes import FakeEngine
from tests.server.harness import TEST_TIMEOUT_S, RunningServer, fake_repository, running_server


@pytest.fixture(autouse=True)
def bounded_in_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """No server test may hang CI: without pytest-timeout, a test still running after
    TEST_TIMEOUT_S dumps every thread's stack and ends the run."""
    if request.config.pluginmanager.hasplugin("timeout"):
        yield
        return
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def fake_server(fake_engine: FakeEngine) -> Iterator[RunningServer]:
    """The fake engine served as model "fake" with batching (max 8, 20 ms delay, 1 instance)."""
    with running_server(fake_repository(fake_engine, max_batch_size=8, max_queue_delay_us=20_000)) as running:
        yield running
