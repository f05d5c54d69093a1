"""kiln engines on Ray Serve: kiln's HTTP routes, Serve's batching and autoscaling.

    serve run deploy/ray/serve.yaml          # from the repository root; see the file for the knobs

`build_app` (the YAML's `import_path: server.ray_serve:build_app`) makes one deployment,
`KilnDeployment`. Each replica loads the model repository (the latest version of every model,
as `python -m server` does) and serves kiln's own Starlette app through `serve.ingress`:
KServe v2 REST at /v2 and OpenAI's embeddings API at /v1 (`server.http.create_app`), so
`tritonclient.http` and the `openai` SDK talk to Serve's proxy exactly as to kiln's HTTP port.
Requests take the same path through `InferenceService` (validation, tokenizing texts with the
engine's pipeline, statistics), except that batches are formed by Serve: `@serve.batch` with
the model's `max_batch_size` counted in rows, waiting at most `batch_wait_timeout_s` for a
batch to fill, and `instances` (config.toml) batches running at once. Serve scales the
replicas from their ongoing requests (`autoscaling_config`, `target_ongoing_requests`).

What kiln's own server does that a replica does not: priorities and queue policies
(config.toml's `priority_levels`, `max_queue_size`, ...; Serve's batch queue is first come,
first served; a request's `timeout` parameter still fails it with UNAVAILABLE/503 when it
waited longer for its batch), sequence buckets across batches, the gRPC port, /metrics (Serve
exports its own, per deployment and replica), model control. Statistics are per replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.applications import Starlette

from server.config import DEFAULT_MAX_MESSAGE_BYTES, ServerConfig
from server.errors import ConfigError, DeadlineExceeded, Internal, Rejected, ServerError, Unavailable
from server.http import create_app
from server.layout import Layout
from server.models import LoadedModels
from server.repository import Model, Repository
from server.scheduler import ModelScheduler
from server.service import InferenceService
from server.stats import Timings

log = logging.getLogger("server.ray_serve")

Tensors = dict[str, np.ndarray]
# How long a replica waits for a batch to fill after its first request (Serve's default is 10
# ms). kiln's own batcher defaults to no wait; a small one lets concurrent requests that arrive
# through Serve's proxy one by one share a batch.
DEFAULT_BATCH_WAIT_S = 0.002


@dataclass(eq=False)
class _Request:
    """One request queued in Serve's batch queue: validated (and tokenized) inputs, how they
    batch (`layout`), its size in rows, where its time goes, its queue timeout (0: none)."""

    inputs: Mapping[str, np.ndarray]
    layout: Layout
    size: int
    timings: Timings
    timeout_us: int = 0
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)


def _rows(requests: list[_Request]) -> int:
    return sum(r.size for r in requests)


def _execute(engine: Any, group: list[_Request]) -> tuple[list[Tensors], tuple[int, int, int]]:
    """In a thread: one engine call for requests of one layout key; their outputs and the time
    assembling, running and splitting took (ns)."""
    layout = group[0].layout
    t0 = time.perf_counter_ns()
    inputs, plan = layout.assemble([r.inputs for r in group])
    t1 = time.perf_counter_ns()
    outputs = layout.execute(engine, inputs)
    t2 = time.perf_counter_ns()
    parts = layout.disassemble(outputs, plan)
    return parts, (t1 - t0, t2 - t1, time.perf_counter_ns() - t2)


class ServeBatchScheduler(ModelScheduler):
    """One model's scheduler inside a Serve replica: the `ModelScheduler` interface the service
    calls, with Serve's `@serve.batch` forming the batches instead of kiln's `Batcher`.

    A Serve batch holds at most the model's `max_batch_size` rows (1 request for models that do
    not batch); its requests are grouped by layout key (texts of any length together, token
    requests by shape, as kiln's batcher keys them) and each group is one engine call in a
    thread of the model's own pool. `instances` batches run at once. Only usable inside a Serve
    replica (Serve's batch queue reads the replica's context)."""

    def __init__(self, model: Model, batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S) -> None:
        super().__init__(model)
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._pool: ThreadPoolExecutor | None = None
        self._running = self._draining = False
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._batched = serve.batch(max_batch_size=max(model.max_batch_size, 1), batch_wait_timeout_s=batch_wait_timeout_s,
                                    max_concurrent_batches=model.config.instances, batch_size_fn=_rows)(self._run)

    @property
    def accepting(self) -> bool:
        return self._running and not self._draining

    async def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.model.config.instances, thread_name_prefix=f"kiln-{self.model.name}")
            self._running = True

    async def infer(self, inputs: Mapping[str, np.ndarray], size: int, request_id: str = "", *, text: bool = False,
                    outputs: Sequence[str] | None = None, priority: int = 0, timeout_us: int = 0,
                    deadline_in_s: float | None = None, timings: Timings | None = None) -> Tensors:
        """Queue one validated request in Serve's batch queue and return its outputs
        (`priority` is not applied: the queue is first come, first served; `outputs` is not
        looked at: Serve batches whole requests). Raises as `ModelScheduler.infer` does."""
        if not self.accepting:
            raise Unavailable(f"model '{self.model.name}' is not accepting requests: the replica is shutting down")
        layout = self.model.text_layout if text else self.model.layout
        assert layout is not None, "text requests are only queued for models with a text input"
        request = _Request(inputs, layout, size, timings or Timings(), timeout_us)
        self._in_flight += 1
        try:
            async with asyncio.timeout(deadline_in_s):
                answer = await self._batched(request)
        except TimeoutError:
            raise DeadlineExceeded(f"deadline exceeded before model '{self.model.name}' answered") from None
        finally:
            self._in_flight -= 1
            if self._draining and not self._in_flight:
                self._drained.set()
        if isinstance(answer, ServerError):
            raise answer
        return answer

    async def _run(self, requests: list[_Request]) -> list[Tensors | ServerError]:
        """One Serve batch: an answer (outputs, or the error to raise) per request, in order."""
        started = time.perf_counter_ns()
        answers: list[Tensors | ServerError | None] = [None] * len(requests)
        groups: dict[Any, list[int]] = {}
        for i, request in enumerate(requests):
            waited_ns = started - request.enqueued_ns
            if request.timeout_us and waited_ns > request.timeout_us * 1000:
                answers[i] = Rejected(f"Request timeout expired: model '{self.model.name}' did not start the "
                                      "request in time")
                continue
            request.timings.queue_ns = waited_ns
            groups.setdefault((id(request.layout), request.layout.key(request.inputs)), []).append(i)
        loop = asyncio.get_running_loop()
        for members in groups.values():
            group = [requests[i] for i in members]
            try:
                parts, durations = await loop.run_in_executor(self._pool, _execute, self.model.engine, group)
            except Exception as exc:  # the engine's failure is its requests' answer
                log.error("model '%s' failed on a batch of %d request(s)", self.model.name, len(group), exc_info=exc,
                          extra={"model": self.model.name})
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                for i in members:
                    answers[i] = Internal(f"model '{self.model.name}' failed: {reason}")
                continue
            self.stats.record_execution(_rows(group), *durations)
            for i, part in zip(members, parts, strict=True):
                requests[i].timings.compute_input_ns, requests[i].timings.compute_infer_ns, \
                    requests[i].timings.compute_output_ns = durations
                answers[i] = part
        return answers  # type: ignore[return-value]

    async def stop(self, grace_s: float) -> None:
        """Stop accepting; wait up to `grace_s` for the requests in flight (Serve has usually
        drained the replica before it stops it)."""
        if not self._running or self._draining:
            return
        self._draining = True
        if self._in_flight:
            try:
                async with asyncio.timeout(grace_s):
                    await self._drained.wait()
            except TimeoutError:
                log.warning("model '%s': %d request(s) still running after the %.1f s grace period",
                            self.model.name, self._in_flight, grace_s, extra={"model": self.model.name})
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


@serve.deployment(
    # Defaults; the YAML's `deployments:` entry overrides any of them.
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
    ray_actor_options={"num_cpus": 1},
    graceful_shutdown_timeout_s=30,
    health_check_period_s=10,
)
@serve.ingress()
class KilnDeployment:
    """A Serve replica serving a kiln model repository over kiln's HTTP routes."""

    async def __init__(self, repository: str, batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S,
                       max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, shutdown_grace_s: float = 30.0) -> None:
        self.config = ServerConfig(repository=repository, max_message_bytes=max_message_bytes,
                                   shutdown_grace_s=shutdown_grace_s)
        repo = await asyncio.to_thread(Repository.load, repository)
        if not repo.models:
            failures = "; ".join(f"{name}: {reason}" for name, reason in sorted(repo.failures.items()))
            raise RuntimeError(f"model repository {repository} has no servable model ({failures or 'it is empty'})")
        schedulers = {name: ServeBatchScheduler(model, batch_wait_timeout_s) for name, model in repo.models.items()}
        self.service = InferenceService(LoadedModels(repo, schedulers, unload_grace_s=shutdown_grace_s))
        await self.service.models.start()
        log.info("replica serving %s", ", ".join(f"{n} (max_batch_size {m.max_batch_size})"
                                                 for n, m in sorted(repo.models.items())))

    def __serve_build_asgi_app__(self) -> Starlette:
        """kiln's HTTP app around this replica's service (Serve calls this after __init__)."""
        return create_app(self.service, self.config)

    async def check_health(self) -> None:
        """Serve's periodic health check: a replica whose models stopped accepting is unhealthy
        and replaced."""
        stopped = [name for name, s in self.service.schedulers.items() if not s.accepting]
        if stopped:
            raise RuntimeError(f"model(s) not accepting requests: {', '.join(stopped)}")

    async def __del__(self) -> None:
        self.service.accepting = False
        await self.service.stop_models(self.config.shutdown_grace_s)


class KilnServeArgs(BaseModel):
    """The application's `args` in the Serve config; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    repository: str = Field(description="model repository: <repository>/<model>/<version>/ (a path every node sees)")
    batch_wait_timeout_s: float = Field(DEFAULT_BATCH_WAIT_S, ge=0, description="longest wait for a batch to fill")
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=1024, description="largest request body")
    shutdown_grace_s: float = Field(30.0, ge=0, description="time for requests in flight when a replica stops")


def build_app(args: dict[str, Any] | KilnServeArgs) -> serve.Application:
    """The Serve application for the config's `args` (`import_path: server.ray_serve:build_app`).
    A relative `repository` is taken from the directory `serve run` was started in. Raises
    pydantic's `ValidationError` for unknown or bad args, `ConfigError` (a ValueError) for a
    repository that is not a directory."""
    if not isinstance(args, KilnServeArgs):  # Serve passes the dict: the annotation is a string here
        args = KilnServeArgs.model_validate(args)
    path = Path(args.repository).resolve()
    ServerConfig(repository=path, max_message_bytes=args.max_message_bytes, shutdown_grace_s=args.shutdown_grace_s)
    if not path.is_dir():
        raise ConfigError(f"model repository {path} is not a directory")
    return KilnDeployment.bind(str(path), args.batch_wait_timeout_s, args.max_message_bytes, args.shutdown_grace_s)
