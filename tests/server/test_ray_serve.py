"""server/ray_serve.py with deploy/ray/serve.yaml: `serve run` of the repository's own config on a
local Ray (2 CPUs), queried with the openai SDK and tritonclient.http through Serve's proxy."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.server.ray_cluster import RAY_MISSING, joining_env, local_ray

pytest.importorskip("ray.serve", reason=RAY_MISSING)
yaml = pytest.importorskip("yaml", reason=RAY_MISSING)
openai = pytest.importorskip("openai")
httpclient = pytest.importorskip("tritonclient.http")

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "ray" / "serve.yaml"
TEXTS = [f"Sentence {i}: {t}" for i, t in enumerate(
    ["A man is playing a guitar.", "The bank raised interest rates.", "Kittens sleep in the sun.", "Où est la gare ?"]
    * 6)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"serve run exited:\n{process.stdout.read()[-4000:]}"
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise AssertionError("the Serve application did not become ready in time")


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory: pytest.TempPathFactory, minilm_engine_dir: Path) -> Iterator[str]:
    """`serve run deploy/ray/serve.yaml` against a local Ray, with only the repository path and
    the proxy's address changed."""
    work = tmp_path_factory.mktemp("ray-serve")
    (work / "engines" / "minilm").mkdir(parents=True)
    (work / "engines" / "minilm" / "1").symlink_to(minilm_engine_dir)
    config = yaml.safe_load(CONFIG.read_text())
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)
    config["applications"][0]["args"]["repository"] = str(work / "engines")
    (work / "serve.yaml").write_text(yaml.safe_dump(config))
    with local_ray(num_cpus=2) as address:
        process = subprocess.Popen([str(Path(sys.executable).with_name("serve")), "run", "--address", address,
                                    str(work / "serve.yaml")], cwd=ROOT, env=joining_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, process)
            yield url
        finally:
            process.send_signal(signal.SIGINT)  # serve run shuts the application down on Ctrl-C
            try:
                process.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


def reference(engine_dir: Path, texts: list[str]) -> np.ndarray:
    import optimize

    engine = optimize.load(engine_dir)
    return np.stack([engine.run(engine.pipeline.tokenize([t]))["sentence_embedding"][0] for t in texts])


def test_the_config_autoscales_on_ongoing_requests():
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    assert app["import_path"] == "server.ray_serve:build_app"
    (deployment,) = app["deployments"]
    assert deployment["name"] == "KilnDeployment"
    scaling = deployment["autoscaling_config"]
    assert scaling["min_replicas"] >= 1 and scaling["max_replicas"] > scaling["min_replicas"]
    assert 0 < scaling["target_ongoing_requests"] <= deployment["max_ongoing_requests"]
    assert deployment["graceful_shutdown_timeout_s"] > app["args"]["shutdown_grace_s"]


@pytest.mark.slow
def test_serve_answers_the_openai_sdk_with_requests_batched_by_serve(serve_url: str, minilm_engine_dir: Path):
    async def scenario() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0) as client:
            with pytest.raises(openai.NotFoundError, match="unknown model"):  # kiln's own routes and errors
                await client.embeddings.create(model="nope", input="x")
            # concurrent single-text requests: Serve batches them
            return await asyncio.gather(*(client.embeddings.create(model="minilm", input=t) for t in TEXTS))

    answers = asyncio.run(scenario())
    got = np.array([a.data[0].embedding for a in answers], dtype=np.float32)
    np.testing.assert_allclose(got, reference(minilm_engine_dir, TEXTS), atol=2e-5)
    stats = urllib.request.urlopen(f"{serve_url}/v2/models/minilm/stats", timeout=30).read()
    sizes = [b["batch_size"] for b in json.loads(stats)["model_stats"][0]["batch_stats"]]
    assert max(sizes) > 1, f"every batch held one row: {sizes}"


@pytest.mark.slow
def test_serve_answers_tritonclient_http_over_kserve_v2(serve_url: str, minilm_engine_dir: Path):
    client = httpclient.InferenceServerClient(serve_url.removeprefix("http://"))
    assert client.is_server_ready() and client.is_model_ready("minilm")
    texts = TEXTS[:3]
    text = httpclient.InferInput("text", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    result = client.infer("minilm", [text], outputs=[httpclient.InferRequestedOutput("sentence_embedding")])
    np.testing.assert_allclose(result.as_numpy("sentence_embedding"), reference(minilm_engine_dir, texts), atol=2e-5)


@pytest.mark.slow
def test_token_requests_of_different_lengths_in_one_serve_batch_each_get_their_own_answer(serve_url: str,
                                                                                         minilm_engine_dir: Path):
    import optimize

    engine = optimize.load(minilm_engine_dir)
    requests = [engine.pipeline.tokenize([t]) for t in TEXTS[:12]]  # lengths differ: one layout key each
    client = httpclient.InferenceServerClient(serve_url.removeprefix("http://"), concurrency=12)

    def send(feeds: dict[str, np.ndarray]) -> Any:
        inputs = []
        for name, array in feeds.items():
            tensor = httpclient.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return client.async_infer("minilm", inputs, outputs=[httpclient.InferRequestedOutput("sentence_embedding")])

    pending = [send(feeds) for feeds in requests]  # concurrently: Serve batches them together
    for feeds, answer in zip(requests, pending, strict=True):
        np.testing.assert_allclose(answer.get_result().as_numpy("sentence_embedding"),
                                   engine.run(feeds)["sentence_embedding"], atol=2e-5)
