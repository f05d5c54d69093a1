"""Server test helpers: a real server on 127.0.0.1 (port 0) in a background event loop,
always stopped when its context ends, and model repositories laid out on disk."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from server import Model, ModelConfig, Repository, ServerConfig, create_server
from server.app import Server
from tests.server.fakes import FakeEngine

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
TEST_TIMEOUT_S = 180.0


class RunningServer:
    """A started server and the loop it runs on (a daemon thread)."""

    def __init__(self, server: Server, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.port = port
        self.loop = loop
        self.url = f"127.0.0.1:{port}"

    def call(self, coro: Any, timeout_s: float = STOP_TIMEOUT_S) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout_s)

    def client(self) -> Any:
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.url)


@contextlib.contextmanager
def running_server(repository: Repository | Path, loader: Any = None, **options: Any) -> Iterator[RunningServer]:
    """Start a server for `repository` (a Repository, or a directory to load with `loader`,
    default optimize.load) on a free port with ServerConfig `options`; stop it (5 s grace)
    when the block exits, whatever happened inside."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server-loop", daemon=True)
    thread.start()
    running: RunningServer | None = None
    try:
        async def start() -> tuple[Server, int]:
            if isinstance(repository, Repository):
                config = ServerConfig(host="127.0.0.1", port=0, **options)
                server, port = create_server(config, repository=repository)
            else:
                config = ServerConfig(repository=repository, host="127.0.0.1", port=0, **options)
                server, port = create_server(config, **({"loader": loader} if loader else {}))
            await server.start()
            return server, port

        server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=START_TIMEOUT_S)
        running = RunningServer(server, port, loop)
        yield running
    finally:
        if running is not None:
            running.call(running.server.stop(grace_s=5.0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=STOP_TIMEOUT_S)
        if not thread.is_alive():
            loop.close()


def int64_inputs(feeds: dict[str, Any]) -> list[Any]:
    """tritonclient INT64 inputs carrying `feeds` (name → int array), in order."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, array in feeds.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(np.asarray(array, dtype=np.int64))
        inputs.append(tensor)
    return inputs


def fake_repository(engine: FakeEngine, name: str = "fake", **config: Any) -> Repository:
    """A repository serving `engine` as model `name` (version 1) with serving `config`."""
    return Repository(models={name: Model(name=name, version=1, engine=engine, config=ModelConfig.from_dict(config))})


def make_repository(tmp_path: Path, engine_dir: Path, name: str = "minilm", version: int = 1, **config: Any) -> Path:
    """Lay out `<tmp_path>/repository/<name>/<version>/` (a symlink to `engine_dir`) and
    `<name>/config.toml` holding `config` (omitted when empty). Returns the repository path."""
    root = tmp_path / "repository"
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    os.symlink(Path(engine_dir).resolve(), model_dir / str(version), target_is_directory=True)
    if config:
        lines = [f"{key} = {toml_value(value)}\n" for key, value in config.items()]
        (model_dir / "config.toml").write_text("".join(lines))
    return root


def toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
