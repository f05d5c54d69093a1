"""Server options and per-model serving configuration (`<repo>/<model>/config.toml`).

Every field has a default and a validation that names the field on a bad value, so a typo in
a config file fails at startup with a message, not at the first request.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import ConfigError

INT32_MAX = 2**31 - 1
CONFIG_FILE = "config.toml"


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    # bool is an int in Python and in TOML's Python mapping; `true` is never a batch size.
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """How one model is served. Read from `<repo>/<model>/config.toml`; every key is optional.

    - `max_batch_size`: largest batch the dynamic batcher forms (requests are concatenated
      along dim 0 up to this many samples). 0 turns batching off: each request runs alone and
      its shape includes the batch dim. Default (None): the engine's own maximum. May not
      exceed it.
    - `max_queue_delay_us`: how long the oldest queued request may wait for others to join its
      batch, in microseconds. 0 (Triton's default) never waits on purpose; requests still
      batch when they queue behind a busy instance.
    - `instances`: concurrent executions of the engine (workers sharing the model's queue).
    """

    max_batch_size: int | None = None
    max_queue_delay_us: int = 0
    instances: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size is not None:
            _check_int("max_batch_size", self.max_batch_size, 0, INT32_MAX)
        _check_int("max_queue_delay_us", self.max_queue_delay_us, 0, 60_000_000)
        _check_int("instances", self.instances, 1, 64)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model config") -> ModelConfig:
        """Build from parsed TOML; unknown keys and bad values raise `ConfigError` naming `source`
        and the key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def read(cls, model_dir: Path) -> ModelConfig:
        """The config of the model in `model_dir`: its config.toml, or the defaults without one."""
        path = Path(model_dir) / CONFIG_FILE
        if not path.exists():
            return cls()
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: not readable TOML ({exc})") from None
        return cls.from_dict(data, source=str(path))

    def resolve(self, engine_max_batch_size: int, source: str = "model config") -> ModelConfig:
        """This config with `max_batch_size` made concrete for an engine whose largest batch is
        `engine_max_batch_size` (0: the engine has no batch dim). Raises `ConfigError` when the
        config asks for more than the engine accepts."""
        if self.max_batch_size is None:
            return dataclasses.replace(self, max_batch_size=engine_max_batch_size)
        if self.max_batch_size > engine_max_batch_size:
            what = (
                "has no batch dimension" if engine_max_batch_size == 0
                else f"accepts batches up to {engine_max_batch_size}"
            )
            raise ConfigError(f"{source}: max_batch_size = {self.max_batch_size} but the engine {what}")
        return self


@dataclass(frozen=True)
class ServerConfig:
    """Options of one server process.

    - `repository`: the model repository directory (`<repo>/<model>/<version>/`).
    - `host`, `port`: where to listen; port 0 picks a free port (`create_server` returns it).
    - `max_message_bytes`: the largest gRPC message received or sent. gRPC's default of 4 MiB
      is too small for batched embeddings; Triton uses INT32_MAX, the largest gRPC accepts.
    - `shutdown_grace_s`: on SIGTERM, how long queued and running requests may take to finish
      before the rest are failed with UNAVAILABLE.
    """

    repository: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8001
    max_message_bytes: int = INT32_MAX
    shutdown_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if self.repository is not None:
            object.__setattr__(self, "repository", Path(self.repository))
        _check_int("port", self.port, 0, 65535)
        _check_int("max_message_bytes", self.max_message_bytes, 1024, INT32_MAX)
        grace = self.shutdown_grace_s
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
            raise ConfigError(f"shutdown_grace_s must be a number >= 0, got {self.shutdown_grace_s!r}")
        if not self.host:
            raise ConfigError("host must not be empty")

    @property
    def address(self) -> str:
        """`host:port` as gRPC expects it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"
