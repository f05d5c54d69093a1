"""The served models and their lifecycle, in one owner: `LoadedModels`.

A model is served when it has a scheduler here; the repository (`server.repository`) says what
is on disk and why a model is not served. Models may come and go while serving (explicit model
control): loading swaps a new scheduler in before the old one drains, unloading takes it out
and drains it; a drained engine's memory goes back to the OS (`memory`). One lock per model
name keeps a model's loads and unloads in order, so the repository's index, the schedulers and
the health service never disagree about it.

The gRPC service, the HTTP front end (through the service) and the Ray Serve replica all read
and change the served models only through this class.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from optimize import runtime
from server import memory
from server.errors import ModelLoadFailed, NotFound, Unavailable
from server.repository import Model, Repository, load_failure_reason
from server.scheduler import ModelScheduler

log = logging.getLogger(__name__)

HealthSetter = Callable[[str, bool], Awaitable[None]]


@dataclass(frozen=True)
class ModelState:
    """One model directory's state, as RepositoryIndex reports it: served (`version` set) or
    not, with the `reason`."""

    name: str
    version: int | None
    reason: str = ""

    @property
    def ready(self) -> bool:
        return self.version is not None


class LoadedModels:
    """The repository's served models, each with its scheduler: loading, reloading (the old
    version answers until the new one is ready, then drains for up to `unload_grace_s`),
    unloading and stopping them. `set_health(name, serving)` reports each model's state (to
    grpc.health.v1); `loader` turns a version directory into an Engine."""

    def __init__(self, repository: Repository, schedulers: Mapping[str, ModelScheduler], *,
                 set_health: HealthSetter | None = None, unload_grace_s: float = 30.0,
                 loader: Callable[[Any], runtime.Engine] = runtime.load) -> None:
        self.repository = repository
        self.schedulers = dict(schedulers)
        self._set_health = set_health
        self._unload_grace_s = unload_grace_s
        self._loader = loader
        self._locks: dict[str, asyncio.Lock] = {}
        self._retired: set[ModelScheduler] = set()  # unloaded or replaced, still draining

    @classmethod
    def serving(cls, repository: Repository, **options: Any) -> LoadedModels:
        """The repository's loaded models, each with a new `ModelScheduler` (not started)."""
        return cls(repository, {name: ModelScheduler(m) for name, m in repository.models.items()}, **options)

    def get(self, name: str, version: str = "") -> Model:
        """The model `name` of the repository. Raises `InvalidArgument` for a bad name,
        `NotFound` (with the reason) for one that is not served."""
        return self.repository.get(name, version)

    def loaded(self) -> list[Model]:
        """The repository's loaded models, by name."""
        return [model for _, model in sorted(self.repository.models.items())]

    def served(self, name: str, version: str = "") -> ModelScheduler:
        """The scheduler of the served model `name` (and `version`, "" for the served one).
        Raises `NotFound` (Triton's wording) or `Unavailable` while it is being unloaded."""
        model = self.repository.get(name, version)
        scheduler = self.schedulers.get(model.name)
        if scheduler is None or scheduler.model is not model:
            raise Unavailable(f"model '{name}' is being loaded or unloaded; try again")
        return scheduler

    def states(self, ready_only: bool = False) -> list[ModelState]:
        """Every model directory, served or not (with the reason), and every served model, by name."""
        names = set(self.repository.names_on_disk()) | set(self.schedulers) | set(self.repository.failures)
        states = []
        for name in sorted(names):
            scheduler = self.schedulers.get(name)
            if scheduler is not None:
                states.append(ModelState(name, scheduler.model.version))
            elif not ready_only:
                states.append(ModelState(name, None, self.repository.failures.get(name, "not loaded")))
        return states

    def queued(self) -> int:
        """Requests waiting in the served models' queues."""
        return sum(len(s.batcher) for s in self.schedulers.values())

    async def start(self) -> None:
        """Start the schedulers of the models loaded at startup and report them serving."""
        for name, scheduler in self.schedulers.items():
            await scheduler.start()
            await self._health(name, True)

    async def load(self, name: str) -> Model:
        """(Re)load model `name` from the repository directory and serve it; a model already
        served keeps answering until the new version is ready, then drains. Raises
        `InvalidArgument`/`NotFound` for a bad name, `ModelLoadFailed` (Triton's "load failed
        for model ...") whatever keeps the model from loading; the reason also goes to
        RepositoryIndex. A model already served stays served."""
        self.repository.model_dir(name)  # a bad name never reaches the disk or the lock table
        async with self._locks.setdefault(name, asyncio.Lock()):
            try:
                model = await asyncio.to_thread(self.repository.read_model, name, self._loader)
            except NotFound:  # its directory went away meanwhile
                raise
            except Exception as exc:  # whatever the engine's loader raises is this model's failure
                reason = load_failure_reason(exc)
                if name not in self.schedulers:  # a served model keeps serving its loaded version
                    self.repository.failures[name] = reason
                raise ModelLoadFailed(f"load failed for model '{name}': {reason}") from None
            scheduler = ModelScheduler(model)
            await scheduler.start()
            old = self.schedulers.get(name)
            self.repository.models[name] = model
            self.repository.failures.pop(name, None)
            self.schedulers[name] = scheduler
            await self._health(name, True)
            log.info("model '%s' version %d loaded%s", name, model.version,
                     " (replacing the served one)" if old else "", extra={"model": name})
            if old is not None:
                await self._retire(old)
            return model

    async def unload(self, name: str) -> None:
        """Stop serving model `name`: new requests answer NOT_FOUND at once, queued and running
        ones finish (for up to the unload grace period). Unloading a model that is not loaded
        succeeds, as in Triton. Raises `InvalidArgument`/`NotFound` for a bad or unknown name."""
        if name not in self.schedulers:
            self.repository.model_dir(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            scheduler = self.schedulers.pop(name, None)
            self.repository.models.pop(name, None)
            self.repository.failures[name] = "unloaded"
            await self._health(name, False)
            if scheduler is not None:
                log.info("model '%s' unloading: %d request(s) queued", name, len(scheduler.batcher),
                         extra={"model": name})
                await self._retire(scheduler)
                log.info("model '%s' unloaded", name, extra={"model": name})

    async def stop(self, grace_s: float) -> None:
        """Drain every model's scheduler, the retiring ones included (shutdown)."""
        schedulers = list(self.schedulers.values()) + list(self._retired)
        await asyncio.gather(*(s.stop(grace_s) for s in schedulers))

    async def _retire(self, scheduler: ModelScheduler) -> None:
        """Drain an unloaded or replaced model's scheduler; once the last request holding its
        engine is answered and the engine freed, its memory goes back to the OS."""
        memory.release_heap_when_freed(scheduler.model.engine, asyncio.get_running_loop())
        self._retired.add(scheduler)
        try:
            await scheduler.stop(self._unload_grace_s)
        finally:
            self._retired.discard(scheduler)
            # On the next turn of the loop, once the callers' frames no longer hold the scheduler.
            asyncio.get_running_loop().call_soon(memory.refreeze_heap)

    async def _health(self, name: str, serving: bool) -> None:
        if self._set_health is not None:
            await self._set_health(name, serving)
