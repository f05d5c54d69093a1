"""`python -m server` as a process: starts despite unreadable models (and says so), serves,
exits 0 on SIGTERM; refuses to start without a repository."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m server ARGS` on ephemeral ports only (the HTTP port would default to 8000)."""
    if "--http-port" not in args and "--no-http" not in args:
        args = [*args, "--http-port", "0"]
    with log.open("wb") as sink:  # a file, not a pipe: a chatty server never blocks on it
        return subprocess.Popen([sys.executable, "-m", "server", *args], cwd=ROOT,
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
    process = start(["--repository", str(broken_repository), "--port", "0", "--metrics-port", "0"], log)
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
    process = start(["--repository", str(broken_repository), "--port", "0", "--no-metrics", "--log-format", "json"],
                    log)
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


def test_sigterm_drains_every_accepted_request_then_exits_0(tmp_path: Path, minilm_engine_dir: Path):
    """No accepted request is lost: those queued and running when SIGTERM arrives are answered,
    and the process exits 0 within the grace period."""
    import numpy as np

    from tests.server.harness import make_repository

    # A long queue delay keeps requests that arrive together queued until the shutdown flushes them.
    repository = make_repository(tmp_path, minilm_engine_dir, max_batch_size=8, max_queue_delay_us=3_000_000)
    log = tmp_path / "server.log"
    process = start(["--repository", str(repository), "--port", "0", "--metrics-port", "0", "--shutdown-grace-s", "20"],
                    log)
    try:
        port = wait_for_port(process, log)
        metrics = re.search(r"metrics on (http://\S+)", log.read_text()).group(1)  # type: ignore[union-attr]
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        answers: list[object] = []

        def one(i: int) -> None:
            ids = np.full((1, 8), 1000 + i, dtype=np.int64)
            inputs = []
            for name, array in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
                tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            try:
                answers.append(client.infer("minilm", inputs, client_timeout=30).as_numpy("sentence_embedding").shape)
            except Exception as exc:  # collected and reported by the assertion below
                answers.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        sigterm_once_accepted(process, threads, lambda: len(answers) + pending(metrics), 6, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert answers == [(1, 384)] * 6, answers
    text = log.read_text()
    assert re.search(r"shutting down: [0-6] request\(s\) queued", text) and "server stopped" in text


def sigterm_once_accepted(process: subprocess.Popen, threads: list[threading.Thread],
                          accepted: Callable[[], float], expected: int, log: Path) -> None:
    """Send SIGTERM once `expected` requests are accepted (`accepted()`: answered, or waiting for
    company: a request that finds the model idle and nothing else queued runs at once, the
    others wait out the queue delay), then wait for every client thread and a clean exit."""
    deadline = time.monotonic() + 20
    while accepted() < expected:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(30)
    assert process.wait(timeout=30) == 0, log.read_text()


def pending(metrics_url: str) -> float:
    """nv_inference_pending_request_count of the model, from the server's metrics endpoint."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    match = re.search(r'^nv_inference_pending_request_count\{[^}]*\} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0
