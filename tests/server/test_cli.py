"""`python -m server` as a process: starts despite unreadable models (and says so), serves,
exits 0 on SIGTERM; refuses to start without a repository."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with log.open("wb") as sink:  # a file, not a pipe: a chatty server never blocks on it
        return subprocess.Popen([sys.executable, "-m", "server", *args], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT)


def wait_for_port(process: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = re.search(r"serving \d+ model\(s\) on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    pytest.fail(f"server did not start within {START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture
def broken_repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)  # a version directory without an engine
    (repo / "misconfigured" / "1").mkdir(parents=True)
    (repo / "misconfigured" / "config.toml").write_text("max_batch_size = -4\n")
    return repo


def test_server_starts_despite_unreadable_models_reports_them_and_exits_0_on_sigterm(
        tmp_path: Path, broken_repository: Path):
    log = tmp_path / "server.log"
    process = start(["--repository", str(broken_repository), "--port", "0"], log)
    try:
        port = wait_for_port(process, log)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live()
        assert not client.is_model_ready("broken")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    text = log.read_text()
    assert "model 'broken' is not served:" in text and "manifest.json not found" in text
    assert "model 'misconfigured' is not served:" in text and "max_batch_size must be an integer" in text
    assert "SIGTERM received" in text and "server stopped" in text


def test_json_logs_carry_fields_as_keys(tmp_path: Path, broken_repository: Path):
    log = tmp_path / "server.log"
    process = start(["--repository", str(broken_repository), "--port", "0", "--log-format", "json"], log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "serving" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    skipped = [e for e in entries if "is not served" in e["message"]]
    assert {e["model"] for e in skipped} == {"broken", "misconfigured"}
    assert all(e["level"] == "ERROR" for e in skipped)


def test_a_missing_repository_exits_1_with_one_line(tmp_path: Path):
    log = tmp_path / "server.log"
    process = start(["--repository", str(tmp_path / "nope"), "--port", "0"], log)
    assert process.wait(timeout=60) == 1
    lines = log.read_text().strip().splitlines()
    assert lines[-1].startswith("python -m server: error:") and "is not a directory" in lines[-1]
