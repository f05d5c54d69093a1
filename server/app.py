"""Assembling and running a server: `create_server(config) -> (server, port)`, then
`await server.start()`, `await server.stop()`.

One gRPC port carries the KServe v2 service, the standard health service (grpc.health.v1)
and server reflection, so `grpcurl` and load balancers' health checks work out of the box.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from server.config import ServerConfig
from server.errors import ConfigError, ServerError
from server.proto import POOL, grpc_service_pb2, grpc_service_pb2_grpc
from server.repository import Repository
from server.scheduler import ModelScheduler
from server.service import InferenceService

log = logging.getLogger(__name__)

SERVICE_NAME = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# After the drain deadline, time for the already answered requests to be written out before
# gRPC cancels what is left; stop() returns as soon as every RPC is done, so it costs nothing
# when the drain finishes early.
_RESPONSE_FLUSH_S = 5.0


class Server:
    """A kiln server: the gRPC server plus one scheduler per model. Made by `create_server`."""

    def __init__(self, config: ServerConfig, grpc_server: grpc.aio.Server, service: InferenceService,
                 health: health_aio.HealthServicer, port: int) -> None:
        self.config = config
        self.port = port
        self.service = service
        self._grpc = grpc_server
        self._health = health
        self._stopping: asyncio.Task[None] | None = None

    @property
    def repository(self) -> Repository:
        return self.service.repository

    @property
    def address(self) -> str:
        """`host:port` clients connect to (the bound port, also when the config asked for 0)."""
        return dataclasses.replace(self.config, port=self.port).address

    async def start(self) -> None:
        """Start the model schedulers, then serve."""
        for scheduler in self.service.schedulers.values():
            await scheduler.start()
        await self._grpc.start()
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %d model(s) on %s: %s", len(self.service.schedulers), self.address,
                 ", ".join(sorted(self.service.schedulers)) or "none")

    async def stop(self, grace_s: float | None = None) -> None:
        """Shut down gracefully: refuse new RPCs, let queued and running requests finish for up
        to `grace_s` seconds (default: the config's `shutdown_grace_s`), fail the rest with
        UNAVAILABLE, then stop. Safe to call more than once; later calls wait for the first."""
        if self._stopping is None:
            grace = self.config.shutdown_grace_s if grace_s is None else grace_s
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace_s: float) -> None:
        queued = sum(len(s.batcher) for s in self.service.schedulers.values())
        log.info("shutting down: %d request(s) queued, %.1f s grace period", queued, grace_s)
        self.service.accepting = False
        await self._health.enter_graceful_shutdown()
        # gRPC stops taking RPCs at once and waits for the running ones, which the schedulers
        # answer (or fail) within the grace period.
        grpc_stopped = asyncio.ensure_future(self._grpc.stop(grace_s + _RESPONSE_FLUSH_S))
        await asyncio.gather(*(s.stop(grace_s) for s in self.service.schedulers.values()))
        await grpc_stopped
        log.info("server stopped")

    async def wait_for_termination(self) -> None:
        """Return when the gRPC server has stopped."""
        await self._grpc.wait_for_termination()


def create_server(config: ServerConfig, repository: Repository | None = None) -> tuple[Server, int]:
    """Build a server for `config` and bind its port; `port` 0 picks a free one, returned here.

    Loads `config.repository` unless a `repository` is given (tests pass one holding fake
    engines). Models that cannot be loaded are logged and skipped. Call it with an event loop
    running (grpc.aio binds to it); serve with `await server.start()`.

    Raises `ConfigError` without a repository, `ServerError` when the address cannot be bound.
    """
    if repository is None:
        if config.repository is None:
            raise ConfigError("repository is required: the model repository directory to serve")
        repository = Repository.load(config.repository)
    grpc_server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # gRPC sets SO_REUSEPORT by default, which lets a second server bind a port in use
            # and silently split traffic with the first; fail instead.
            ("grpc.so_reuseport", 0),
        ]
    )
    service = InferenceService(repository, {name: ModelScheduler(m) for name, m in repository.models.items()})
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, grpc_server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    # Reflection answers from kiln's private descriptor pool, so the health and reflection
    # services' own descriptors are added there too.
    for module in (health_pb2, reflection_pb2):
        POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        grpc_server, pool=POOL,
    )
    try:
        port = grpc_server.add_insecure_port(config.address)
    except RuntimeError as exc:
        raise ServerError(f"cannot listen on {config.address}: {exc}") from None
    if port == 0:  # older grpcio reports a failed bind this way
        raise ServerError(f"cannot listen on {config.address}")
    return Server(config, grpc_server, service, health, port), port
