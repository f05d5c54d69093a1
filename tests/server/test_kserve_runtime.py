"""KServe deployment: deploy/kserve/*.yaml checked against KServe's and Kubernetes' own models,
deploy/docker/* against the manifests, and server/kserve_runtime.py run exactly as the container
runs it (the image's ENTRYPOINT and ENV, the ServingRuntime's args and env, a model directory
laid out like /mnt/models), probed, queried and stopped as the kubelet would."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server import kserve_runtime
from server.app import _RESPONSE_FLUSH_S

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kserve").glob("*.yaml"))
DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.cuda"]
KSERVE_MISSING = "needs the kserve extra: pip install 'kiln[kserve]'"


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents() if doc["kind"] == kind]


def runtime(name: str) -> dict[str, Any]:
    (found,) = [doc for doc in of_kind("ServingRuntime") if doc["metadata"]["name"] == name]
    return found


def container_of(serving_runtime: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in serving_runtime["spec"]["containers"] if c["name"] == "kserve-container"]
    return container


def arg(container: dict[str, Any], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{name}=")]
    return value


# -- the manifests, against KServe's models ---------------------------------------------------------

@pytest.fixture(scope="module")
def model_check() -> dict[str, list[str]]:
    """Each manifest document's problems as KServe's models see them (tests/server/kserve_models.py),
    checked in a process of its own: KServe's SDK registers the KServe v2 protos (package
    `inference`) in protobuf's default pool, as tritonclient.grpc does, and the two cannot be
    imported into one process (the second fails with "duplicate symbol
    'inference.ServerLiveRequest'")."""
    if importlib.util.find_spec("kserve") is None:
        pytest.skip(KSERVE_MISSING)
    done = subprocess.run([sys.executable, "-m", "tests.server.kserve_models", *map(str, MANIFESTS)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_every_manifest_is_a_valid_kserve_object_with_no_unknown_field(doc: dict[str, Any],
                                                                       model_check: dict[str, list[str]]):
    assert model_check[f"{doc['kind']}/{doc['metadata']['name']}"] == []


def test_every_inference_service_names_a_runtime_of_its_model_format():
    runtimes = {doc["metadata"]["name"]: doc for doc in of_kind("ServingRuntime")}
    services = of_kind("InferenceService")
    assert services
    for service in services:
        model = service["spec"]["predictor"]["model"]
        assert model["storageUri"]
        serving = runtimes[model["runtime"]]
        formats = {(f["name"], f.get("version")) for f in serving["spec"]["supportedModelFormats"]}
        assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
        assert model["protocolVersion"] in serving["spec"]["protocolVersions"]


@pytest.mark.parametrize("name", ["kiln", "kiln-gpu"])
def test_the_runtime_probes_ports_and_metrics_agree_with_the_server(name: str):
    serving = runtime(name)
    container = container_of(serving)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["ports"][0]["name"] == "http1", "KServe routes its Service's port 80 to the first port"
    assert ports["http1"] == int(arg(container, "http_port"))
    assert ports["h2c"] == int(arg(container, "grpc_port")), "gRPC is the port named h2c"
    assert ports["metrics"] == int(arg(container, "metrics_port"))
    assert arg(container, "model_dir") == "/mnt/models" and arg(container, "model_name") == "{{.Name}}"
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live"),
                        ("startupProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": ports["http1"]}, probe
    annotations = serving["spec"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == int(annotations["prometheus.kserve.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == annotations["prometheus.kserve.io/path"] == "/metrics"
    kserve_runtime.parse_args([a.replace("{{.Name}}", "m") for a in container["args"]])  # the entry point takes them


def test_the_grace_period_outlasts_the_prestop_hook_and_the_drain():
    for service in of_kind("InferenceService"):
        predictor = service["spec"]["predictor"]
        container = container_of(runtime(predictor["model"]["runtime"]))
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        needed = float(command[1]) + float(arg(container, "shutdown_grace_s")) + _RESPONSE_FLUSH_S
        assert predictor["terminationGracePeriodSeconds"] > needed, service["metadata"]["name"]


# -- the images ---------------------------------------------------------------------------------------

def instructions(dockerfile: Path, stage: int = -1) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of one build stage (default: the last, the image), continuation
    lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word.upper(), rest.strip()))
    return stages[stage]


def image_entrypoint(dockerfile: Path) -> list[str]:
    (entrypoint,) = [json.loads(rest) for word, rest in instructions(dockerfile) if word == "ENTRYPOINT"]
    return entrypoint


def image_env(dockerfile: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions(dockerfile):
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_matches_the_runtime_and_installs_the_lock_with_torch_first(dockerfile: Path):
    serving = runtime("kiln-gpu" if dockerfile.suffix == ".cuda" else "kiln")
    container = container_of(serving)
    assert image_entrypoint(dockerfile) == ["python", "-m", "server.kserve_runtime"]
    exposed = {int(p) for word, rest in instructions(dockerfile) if word == "EXPOSE" for p in rest.split()}
    assert exposed == {p["containerPort"] for p in container["ports"]}
    (user,) = [rest for word, rest in instructions(dockerfile) if word == "USER"]
    assert int(user) == container["securityContext"]["runAsUser"]
    build = instructions(dockerfile, stage=0)
    runs = [rest for word, rest in build if word == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "TORCH_SPEC" in r)
    lock_at = next(i for i, r in enumerate(runs) if "--constraint requirements.lock ." in r or
                   '--constraint requirements.lock ".' in r)
    assert torch_at < lock_at, "torch must be installed before anything that depends on it"
    for word, rest in build:
        if word == "COPY" and "--from" not in rest:
            for source in shlex.split(rest)[:-1]:
                assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
    (arg_line,) = [rest for word, rest in build if word == "ARG" and rest.startswith("TORCH_SPEC=")]
    assert arg_line.split("=", 1)[1] in (ROOT / "kiln").read_text(), "the image and ./kiln pin the same torch"


# -- the entry point, as the container runs it ------------------------------------------------------

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.slow
def test_the_container_command_serves_mnt_models_and_drains_on_sigterm(minilm_engine_dir: Path, tmp_path: Path):
    (service,) = [s for s in of_kind("InferenceService") if s["spec"]["predictor"]["model"]["runtime"] == "kiln"]
    predictor = service["spec"]["predictor"]
    container = container_of(runtime("kiln"))
    name = service["metadata"]["name"]
    # What the storage initializer leaves for a storageUri naming one engine directory, read-only.
    mnt_models = tmp_path / "mnt" / "models"
    shutil.copytree(minilm_engine_dir, mnt_models)
    for path in [mnt_models, *mnt_models.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    # The only differences from the pod: this Python for the image's, a free port for each
    # container port (this machine is shared), the directory above for /mnt/models.
    ports = {p["containerPort"]: free for p, free in zip(container["ports"], free_ports(len(container["ports"])),
                                                         strict=True)}

    def local(text: str) -> str:
        text = text.replace("{{.Name}}", name).replace("/mnt/models", str(mnt_models))
        return re.sub(r"(?<==)(\d+)$", lambda m: str(ports.get(int(m[1]), m[1])), text)

    entrypoint = image_entrypoint(DOCKERFILES[0])
    command = [sys.executable, *entrypoint[1:], *(local(a) for a in container["args"])]
    env = {k: v for k, v in image_env(DOCKERFILES[0]).items() if k != "PATH"}  # PATH names the image's venv
    env.update({e["name"]: e["value"] for e in container["env"]})
    # cwd: the checkout, whose `server` the image would have installed
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env, "HOME": str(tmp_path)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        http = f"http://127.0.0.1:{ports[container['readinessProbe']['httpGet']['port']]}"
        deadline = time.monotonic() + 120
        while get_or_none(http + container["readinessProbe"]["httpGet"]["path"]) != 200:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "not ready in time"
            time.sleep(0.2)
        assert get(http + container["livenessProbe"]["httpGet"]["path"])[0] == 200
        body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 1],
                                       "data": ["A man is playing a guitar.", "Kittens sleep in the sun."]}]})
        request = urllib.request.Request(f"{http}/v2/models/{name}/infer", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            outputs = {o["name"]: o for o in json.loads(answer.read())["outputs"]}
        embedding = np.array(outputs["sentence_embedding"]["data"], dtype=np.float32).reshape(2, 384)
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-4)
        grpc = pytest.importorskip("tritonclient.grpc")
        client = grpc.InferenceServerClient(f"127.0.0.1:{ports[8081]}")
        assert client.is_model_ready(name), "gRPC (the h2c port) serves the model too"
        annotations = runtime("kiln")["spec"]["annotations"]
        status, metrics = get(f"http://127.0.0.1:{ports[int(annotations['prometheus.io/port'])]}"
                              f"{annotations['prometheus.io/path']}")
        assert status == 200 and f'model="{name}"'.encode() in metrics
        process.send_signal(signal.SIGTERM)  # what the kubelet sends after preStop
        grace = predictor["terminationGracePeriodSeconds"] - float(container["lifecycle"]["preStop"]["exec"]["command"][1])
        out, _ = process.communicate(timeout=grace)
        assert process.returncode == 0, out[-3000:]
        assert "SIGTERM received" in out and "server stopped" in out
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def get_or_none(url: str) -> int | None:
    try:
        return get(url)[0]
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def test_the_model_directory_may_hold_an_engine_a_model_or_a_repository(minilm_engine_dir: Path, tmp_path: Path):
    assert kserve_runtime.layout_of(minilm_engine_dir) == "engine"
    assert kserve_runtime.layout_of(minilm_engine_dir.parent) == "model"
    assert kserve_runtime.layout_of(minilm_engine_dir.parent.parent) == "repository"
    scratch = tmp_path / "view"
    scratch.mkdir()
    view = kserve_runtime.repository_view(minilm_engine_dir, "embedder", scratch)
    assert (view / "embedder" / "1" / "manifest.json").is_file()
    with pytest.raises(ValueError, match="is not a directory"):
        kserve_runtime.layout_of(tmp_path / "missing")
