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

from server.batch_policy import TIMEOUT_ACTIONS, BatchPolicy, QueuePolicy
from server.errors import ConfigError
from server.text import default_max_text_bytes

INT32_MAX = 2**31 - 1
CONFIG_FILE = "config.toml"
# gRPC messages received or sent, at most. Large enough for MiniLM-class token outputs at any
# batch (8 x 64 tokens x 384 floats are 0.8 MB; 64 x 512 x 384 are 48 MiB); small enough that
# clients cannot make the server buffer gigabytes: gRPC holds a whole message in memory before
# the service sees it, and with INT32_MAX (Triton's) one client could take the host down.
# Raise it (`--max-message-bytes`) for wider models' token outputs.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Token lengths a text batch is padded up to, by default, per backend: for engines that pay for
# a shape they have not run recently. OpenVINO's CPU plugin re-plans its kernels when an input
# shape changes: all-MiniLM-L6-v2 at batch 1 x 56 tokens took 3.1 ms repeated and 9.0 ms when
# lengths alternated. Batches of many texts change shape at nearly every call anyway, and there
# padding costs more: the same engine on 1024 sentences of 8-128 tokens sorted by length, in
# batches of 32, ran 9% slower padded up to (16, 32, 48, 64, 96, 128) than to each batch's
# longest; the batches the batcher forms from 512 queued texts ran 13% faster with boundaries
# every 16 tokens up to 128 (from 64 queued texts: within the noise). Hence steps of 16 tokens to 128, 32 to 256, 64 to 512 (a text is
# padded by at most a quarter of its length past 64); the other backends plan for dynamic
# shapes once and run any length at its own cost.
SHAPE_BUCKETS: dict[str, tuple[int, ...]] = {
    "openvino": (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512),
}


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    # bool is an int in Python and in TOML's Python mapping; `true` is never a batch size.
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")


INTERFACES = ("tokens", "text")
_QUEUE_POLICY_KEYS = ("max_queue_size", "default_timeout_us", "allow_timeout_override", "timeout_action")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def _check_sizes(name: str, value: Any, maximum: int) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name} must be a list of integers, got {value!r}")
    for item in value:
        _check_int(f"{name} entries", item, 1, maximum)
    return tuple(sorted(set(value)))


def _check_shapes(name: str, value: Any) -> tuple[tuple[int, int], ...]:
    """`[[batch, tokens], ...]`, each a positive integer; kept in order, repeats dropped."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
        raise ConfigError(f"{name} must be a list of [batch, tokens] pairs, e.g. [[8, 128], [1, 32]]; got {value!r}")
    for batch, tokens in value:
        _check_int(f"{name} batch", batch, 1, INT32_MAX)
        _check_int(f"{name} tokens", tokens, 1, INT32_MAX)
    return tuple(dict.fromkeys((int(b), int(t)) for b, t in value))


def _queue_policy(name: str, data: Any) -> QueuePolicy:
    """A QueuePolicy from a TOML table (or the model's top-level keys), fields named on error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must be a table of {', '.join(_QUEUE_POLICY_KEYS)}, got {data!r}")
    unknown = sorted(set(data) - set(_QUEUE_POLICY_KEYS))
    if unknown:
        raise ConfigError(f"{name}: unknown key {unknown[0]!r} (known keys: {', '.join(_QUEUE_POLICY_KEYS)})")
    prefix = f"{name}." if name != "queue policy" else ""
    if "max_queue_size" in data:
        _check_int(f"{prefix}max_queue_size", data["max_queue_size"], 0, INT32_MAX)
    if "default_timeout_us" in data:
        _check_int(f"{prefix}default_timeout_us", data["default_timeout_us"], 0, 2**63 - 1)
    if "allow_timeout_override" in data:
        _check_bool(f"{prefix}allow_timeout_override", data["allow_timeout_override"])
    if "timeout_action" in data and data["timeout_action"] not in TIMEOUT_ACTIONS:
        raise ConfigError(f"{prefix}timeout_action must be one of {', '.join(repr(a) for a in TIMEOUT_ACTIONS)}, "
                          f"got {data['timeout_action']!r}")
    return QueuePolicy(**data)


@dataclass(frozen=True)
class ModelConfig:
    """How one model is served. Read from `<repo>/<model>/config.toml`; every key is optional.

    Batching (Triton's `dynamic_batching`):
    - `max_batch_size`: largest batch the dynamic batcher forms (requests are concatenated
      along dim 0 up to this many samples). 0 turns batching off: each request runs alone and
      its shape includes the batch dim. Default (None): the engine's own maximum. May not
      exceed it.
    - `max_queue_delay_us`: how long the oldest queued request may wait for others to join its
      batch, in microseconds. 0 (Triton's default) never waits on purpose; requests still
      batch when they queue behind a busy instance.
    - `preferred_batch_sizes`: batch sizes dispatched as soon as the queue can form one, without
      waiting for the delay.
    - `max_batch_tokens`: largest batch in padded tokens (rows × the token length of its
      longest row, the way text-embeddings-inference bounds it), beside `max_batch_size`; a
      request of tokens whose rows exceed it runs in slices that fit, a single text longer than
      it runs alone. 0 (default): bounded by `max_batch_size` only.
    - `sequence_buckets`: boundaries (e.g. [16, 32, 64]). For requests of tokens, the dynamic
      non-batch dims of requests are zero-padded up to the longest of their batch within one
      bucket, so requests of different lengths in one bucket share a batch (only for models
      where zero padding is neutral, masked by an attention mask; engines that accept packed
      batches ignore it). For text requests, a batch is padded to the boundary above its
      longest text, so the engine sees only these lengths. Default (None): none for requests
      of tokens; for text, `SHAPE_BUCKETS` of the engine's backend (OpenVINO's), else none
      (`[]` turns them off).
    - `preserve_ordering`: answer requests in the order they arrived.
    - `instances`: concurrent executions of the engine (workers sharing the model's queue).
    - `inline_below_us`: batches whose recent average time is below this run on the event
      loop instead of an instance thread (the thread hand-off costs more than a tiny engine
      computes); 0 always uses threads.
    - `interface`: which inputs ModelMetadata and ModelConfig list for an engine with a text
      pipeline: "tokens" (default: the engine's own inputs and outputs) or "text" (the BYTES
      inputs and the outputs of its task's text interface: `text` → `label` and `score` for a
      classifier, ...). Both kinds of request are always accepted; one is listed so that tools
      which send every listed input (perf_analyzer) send a valid request.
    - `max_text_bytes`: largest text (UTF-8 bytes) a request may send; larger ones are refused,
      or cut to it when the request sets the parameter `truncate`. Default (None): the
      pipeline's maximum tokens × `server.text.BYTES_PER_TOKEN` (32).
    - `max_request_text_bytes`: largest sum of a request's texts (after truncation). Default
      (None): `max_text_bytes` × the most texts a request may hold, both texts of a pair
      counted (never binding).

    Warm-up (Triton's `model_warmup`):
    - `warmup`: engine shapes, `[[batch, tokens], ...]` (e.g. `[[8, 128], [1, 32]]`), run once
      each at load, before the model is ready, so that no request pays for an engine's first
      call at a shape (an OpenVINO engine compiles its static copies for them then;
      `server.warmup`). `tokens` is every dynamic dim after the batch dim; for text requests,
      name bucket lengths (`sequence_buckets`), the only ones the engine sees. A shape the
      engine refuses, or a call that fails, fails the load. Default: none.

    Priorities and queue policy (Triton's `priority_levels` and `ModelQueuePolicy`):
    - `priority_levels` (0: none), `default_priority_level` (0: the lowest level) for requests
      without a valid `priority` parameter.
    - `max_queue_size` (0: unbounded; beyond → UNAVAILABLE "Exceeds maximum queue size"),
      `default_timeout_us` (0: none), `allow_timeout_override` (requests' `timeout` parameter
      may shorten it; default true), `timeout_action` ("reject" or "delay"): the policy of
      every priority level, overridden per level by `[priority_queue_policy.N]` tables with the
      same keys.
    """

    max_batch_size: int | None = None
    max_queue_delay_us: int = 0
    max_batch_tokens: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    sequence_buckets: tuple[int, ...] | None = None
    preserve_ordering: bool = False
    instances: int = 1
    inline_below_us: int = 100
    interface: str = "tokens"
    max_text_bytes: int | None = None
    max_request_text_bytes: int | None = None
    priority_levels: int = 0
    default_priority_level: int = 0
    queue_policy: QueuePolicy = QueuePolicy()
    priority_queue_policy: dict[int, QueuePolicy] = dataclasses.field(default_factory=dict)
    warmup: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "warmup", _check_shapes("warmup", self.warmup))
        if self.max_batch_size is not None:
            _check_int("max_batch_size", self.max_batch_size, 0, INT32_MAX)
        _check_int("max_queue_delay_us", self.max_queue_delay_us, 0, 60_000_000)
        _check_int("max_batch_tokens", self.max_batch_tokens, 0, INT32_MAX)
        _check_int("instances", self.instances, 1, 64)
        _check_int("inline_below_us", self.inline_below_us, 0, 1_000_000)
        for name in ("max_text_bytes", "max_request_text_bytes"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1, INT32_MAX)
        object.__setattr__(self, "preferred_batch_sizes",
                           _check_sizes("preferred_batch_sizes", self.preferred_batch_sizes, INT32_MAX))
        if self.sequence_buckets is not None:
            object.__setattr__(self, "sequence_buckets",
                               _check_sizes("sequence_buckets", self.sequence_buckets, INT32_MAX))
        _check_bool("preserve_ordering", self.preserve_ordering)
        if self.interface not in INTERFACES:
            allowed = ", ".join(repr(i) for i in INTERFACES)
            raise ConfigError(f"interface must be one of {allowed}, got {self.interface!r}")
        _check_int("priority_levels", self.priority_levels, 0, 1_000_000)
        levels = max(1, self.priority_levels)
        _check_int("default_priority_level", self.default_priority_level, 0, levels)
        for level in self.priority_queue_policy:
            _check_int("priority_queue_policy level", level, 1, levels)
        if self.max_batch_size is not None:
            for size in self.preferred_batch_sizes:
                if size > self.max_batch_size:
                    raise ConfigError(
                        f"preferred_batch_sizes entry {size} exceeds max_batch_size {self.max_batch_size}")
            self._check_warmup_batches(self.max_batch_size)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model config") -> ModelConfig:
        """Build from parsed TOML; unknown keys and bad values raise `ConfigError` naming `source`
        and the key."""
        known = ({f.name for f in dataclasses.fields(cls)} - {"queue_policy"}) | set(_QUEUE_POLICY_KEYS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
        try:
            fields = {k: v for k, v in data.items() if k not in _QUEUE_POLICY_KEYS}
            top = {k: data[k] for k in _QUEUE_POLICY_KEYS if k in data}
            fields["queue_policy"] = _queue_policy("queue policy", top)
            per_level = fields.get("priority_queue_policy", {})
            if not isinstance(per_level, dict):
                raise ConfigError(f"priority_queue_policy must be tables [priority_queue_policy.N], got {per_level!r}")
            policies = {}
            for level, table in per_level.items():
                if not str(level).isdigit():
                    raise ConfigError(f"priority_queue_policy.{level}: the level must be an integer")
                if not isinstance(table, dict):
                    raise ConfigError(f"priority_queue_policy.{level} must be a table, got {table!r}")
                # A level's table inherits the top-level policy keys it does not set.
                policies[int(level)] = _queue_policy(f"priority_queue_policy.{level}", {**top, **table})
            fields["priority_queue_policy"] = policies
            return cls(**fields)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except ValueError as exc:  # a QueuePolicy/BatchPolicy rule
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

    def resolve(self, engine_max_batch_size: int, source: str = "model config",
                max_tokens: int | None = None, text_inputs: int = 1) -> ModelConfig:
        """This config with `max_batch_size` made concrete for an engine whose largest batch is
        `engine_max_batch_size` (0: the engine has no batch dim), and, for an engine with a text
        pipeline that keeps `max_tokens` tokens and takes `text_inputs` texts per sample (2 for
        sentence pairs), the text byte limits. Raises `ConfigError` when the config asks for
        more than the engine accepts."""
        if self.max_batch_size is None:
            try:  # the engine's maximum is checked against the rest of the config here
                resolved = dataclasses.replace(self, max_batch_size=engine_max_batch_size)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        elif self.max_batch_size > engine_max_batch_size:
            what = (
                "has no batch dimension" if engine_max_batch_size == 0
                else f"accepts batches up to {engine_max_batch_size}"
            )
            raise ConfigError(f"{source}: max_batch_size = {self.max_batch_size} but the engine {what}")
        else:
            resolved = self
        if resolved.max_batch_size and resolved.preferred_batch_sizes and \
                resolved.preferred_batch_sizes[-1] > resolved.max_batch_size:
            raise ConfigError(f"{source}: preferred_batch_sizes entry {resolved.preferred_batch_sizes[-1]} "
                              f"exceeds max_batch_size {resolved.max_batch_size}")
        if max_tokens is not None:
            per_text = resolved.max_text_bytes or default_max_text_bytes(max_tokens)
            texts = resolved.max_texts(engine_max_batch_size)
            resolved = dataclasses.replace(resolved, max_text_bytes=per_text,
                                           max_request_text_bytes=resolved.max_request_text_bytes
                                           or per_text * texts * text_inputs)
        return resolved

    def _check_warmup_batches(self, max_batch_size: int) -> None:
        """A warm-up batch larger than the batcher ever forms warms nothing it runs (0: no batching,
        the engine's own shapes)."""
        for batch, tokens in self.warmup:
            if max_batch_size and batch > max_batch_size:
                raise ConfigError(f"warmup [{batch}, {tokens}]: batch {batch} exceeds max_batch_size {max_batch_size}")

    def max_texts(self, engine_max_batch_size: int) -> int:
        """The most texts one request may send: a batch's worth (one when nothing batches)."""
        return self.max_batch_size or engine_max_batch_size or 1

    def text_buckets(self, backend: str) -> tuple[int, ...]:
        """The token lengths text batches of an engine of `backend` are padded up to."""
        if self.sequence_buckets is not None:
            return self.sequence_buckets
        return SHAPE_BUCKETS.get(backend, ())

    def batch_policy(self) -> BatchPolicy:
        """The batcher's policy for this (resolved) config."""
        assert self.max_batch_size is not None, "resolve() the config first"
        return BatchPolicy(
            max_batch_size=self.max_batch_size,
            max_queue_delay_us=self.max_queue_delay_us,
            max_batch_tokens=self.max_batch_tokens,
            preferred_batch_sizes=self.preferred_batch_sizes if self.max_batch_size else (),
            priority_levels=self.priority_levels,
            default_priority_level=self.default_priority_level,
            queue_policy=self.queue_policy,
            priority_queue_policy=dict(self.priority_queue_policy),
        )


CONTROL_MODES = ("none", "explicit")


@dataclass(frozen=True)
class ServerConfig:
    """Options of one server process.

    - `repository`: the model repository directory (`<repo>/<model>/<version>/`).
    - `host`, `port`: where to listen; port 0 picks a free port (`create_server` returns it).
    - `http_port`: KServe v2 REST and OpenAI's embeddings API over HTTP on this port of `host`
      (0 picks a free port; `Server.http_port` tells which); None serves no HTTP.
    - `max_message_bytes`: the largest gRPC message received or sent, and the largest HTTP
      request body; gRPC refuses larger ones with RESOURCE_EXHAUSTED, HTTP with 413. Default
      64 MiB: gRPC's 4 MiB is too small for batched outputs, and Triton's INT32_MAX lets one
      client make the server buffer 2 GiB per request.
    - `shutdown_grace_s`: on SIGTERM, how long queued and running requests may take to finish
      before the rest are failed with UNAVAILABLE.
    - `metrics_port`: Prometheus metrics over HTTP at `http://host:metrics_port/metrics`
      (0 picks a free port); None serves none.
    - `tls_cert_file`, `tls_key_file`: PEM files; with both, the gRPC and HTTP ports speak TLS
      only (HTTPS).
      `tls_client_ca_file` additionally requires client certificates signed by that CA.
    - `auth_token`: when set, every RPC except grpc.health.v1 needs the metadata
      `authorization: Bearer <token>`; others are answered UNAUTHENTICATED. Over HTTP every
      request but the health routes needs that header; others are answered 401.
    - `model_control_mode`: "none" serves what the repository holds at startup; "explicit"
      (Triton's) lets clients load and unload models with RepositoryModelLoad/Unload and, at
      startup, loads only `startup_models` ("*": all).
    """

    repository: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8001
    http_port: int | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    shutdown_grace_s: float = 30.0
    metrics_port: int | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    auth_token: str | None = None
    model_control_mode: str = "none"
    startup_models: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        for name in ("repository", "tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        _check_int("port", self.port, 0, 65535)
        if self.metrics_port is not None:
            _check_int("metrics_port", self.metrics_port, 0, 65535)
        if self.http_port is not None:
            _check_int("http_port", self.http_port, 0, 65535)
        _check_int("max_message_bytes", self.max_message_bytes, 1024, INT32_MAX)
        grace = self.shutdown_grace_s
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
            raise ConfigError(f"shutdown_grace_s must be a number >= 0, got {self.shutdown_grace_s!r}")
        if not self.host:
            raise ConfigError("host must not be empty")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ConfigError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"{name} {path} is not a readable file")
        if self.auth_token is not None and (not self.auth_token or any(c.isspace() for c in self.auth_token)):
            raise ConfigError("auth_token must be a non-empty string without whitespace")
        if self.model_control_mode not in CONTROL_MODES:
            raise ConfigError(f"model_control_mode must be one of {', '.join(CONTROL_MODES)}, "
                              f"got {self.model_control_mode!r}")
        object.__setattr__(self, "startup_models", tuple(self.startup_models))

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def address(self) -> str:
        """`host:port` as gRPC expects it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"
