"""Assembling and running a server: `create_server(config) -> (server, port)`, then
`await server.start()`, `await server.stop()`.

One gRPC port carries the KServe v2 service, the standard health service (grpc.health.v1:
the server as "" and "inference.GRPCInferenceService", each model under its own name) and
server reflection, so `grpcurl` and load balancers' health checks work out of the box.
Optionally an HTTP port with KServe v2 REST and OpenAI's embeddings API over the same service
(`server.http`), TLS on both, a bearer token on every call but health checks, and Prometheus
metrics over HTTP on another port. Every gRPC service is registered through `server.handlers`,
so a request that is not even protobuf is answered like any other error, not with a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from optimize import runtime
from server.auth import bearer_token_matches
from server.config import ServerConfig
from server.errors import ConfigError, ServerError
from server.handlers import abort, add_service
from server.http import HttpServer
from server.logs import Throttled
from server.metrics import MetricsServer, registry_for
from server.models import LoadedModels
from server.proto import POOL, grpc_service_pb2
from server.repository import EngineLoader, Repository
from server.service import InferenceService

log = logging.getLogger(__name__)

SERVICE_NAME = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# After the drain deadline, time for the already answered requests to be written out before
# gRPC cancels what is left; stop() returns as soon as every RPC is done, so it costs nothing
# when the drain finishes early.
_RESPONSE_FLUSH_S = 5.0
# Anyone who can reach the port can be refused: a flood of refusals is a few lines.
_refusals = Throttled(log)


class Server:
    """A kiln server: the gRPC server, the HTTP server when configured, and one scheduler per
    model. Made by `create_server`."""

    def __init__(self, config: ServerConfig, grpc_server: grpc.aio.Server, service: InferenceService,
                 health: health_aio.HealthServicer, port: int, http: HttpServer | None = None) -> None:
        self.config = config
        self.port = port
        self.service = service
        self.metrics: MetricsServer | None = None
        self.http = http
        self._grpc = grpc_server
        self._health = health
        self._stopping: asyncio.Task[None] | None = None

    @property
    def repository(self) -> Repository:
        return self.service.models.repository

    @property
    def address(self) -> str:
        """`host:port` clients connect to (the bound port, also when the config asked for 0)."""
        return dataclasses.replace(self.config, port=self.port, tls_cert_file=None, tls_key_file=None,
                                   tls_client_ca_file=None).address

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port (also when the config asked for 0); None without HTTP."""
        return self.http.port if self.http is not None else None

    async def start(self) -> None:
        """Start the model schedulers and the metrics endpoint, then serve gRPC and HTTP.

        Raises `ServerError` when the metrics port cannot be bound or HTTP cannot start."""
        await self.service.models.start()
        if self.config.metrics_port is not None:
            self.metrics = _start_metrics(self.service, self.config.host, self.config.metrics_port)
            log.info("metrics on %s", self.metrics.url)
        await self._grpc.start()
        if self.http is not None:
            await self.http.start()
            log.info("HTTP on %s: KServe v2 REST at /v2, OpenAI API at /v1", self.http.url)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %d model(s) on %s%s: %s", len(self.service.schedulers), self.address,
                 " (TLS)" if self.config.tls else "", ", ".join(sorted(self.service.schedulers)) or "none")

    async def stop(self, grace_s: float | None = None) -> None:
        """Shut down gracefully: refuse new RPCs, let queued and running requests finish for up
        to `grace_s` seconds (default: the config's `shutdown_grace_s`), fail the rest with
        UNAVAILABLE, then stop. Safe to call more than once; later calls wait for the first."""
        if self._stopping is None:
            grace = self.config.shutdown_grace_s if grace_s is None else grace_s
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace_s: float) -> None:
        queued = self.service.models.queued()
        log.info("shutting down: %d request(s) queued, %.1f s grace period", queued, grace_s)
        self.service.accepting = False
        await self._health.enter_graceful_shutdown()
        # gRPC and HTTP stop taking calls at once and wait for the running ones, which the
        # schedulers answer (or fail) within the grace period.
        grpc_stopped = asyncio.ensure_future(self._grpc.stop(grace_s + _RESPONSE_FLUSH_S))
        http_stopped = asyncio.ensure_future(self.http.stop(grace_s + _RESPONSE_FLUSH_S)) if self.http else None
        await self.service.stop_models(grace_s)
        await grpc_stopped
        if http_stopped is not None:
            await http_stopped
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        log.info("server stopped")

    async def wait_for_termination(self) -> None:
        """Return when the gRPC server has stopped."""
        await self._grpc.wait_for_termination()


def _start_metrics(service: InferenceService, host: str, port: int) -> MetricsServer:
    def models() -> dict[str, tuple[Any, int, int]]:
        # Read from the HTTP thread: take a snapshot of the mapping the event loop changes.
        schedulers = dict(service.schedulers)
        return {name: (s.stats, len(s.batcher), s.model.max_batch_size) for name, s in schedulers.items()}

    try:
        return MetricsServer(registry_for(models), host, port)
    except OSError as exc:
        raise ServerError(f"cannot serve metrics on {host}:{port}: {exc}") from None


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Every RPC must carry `authorization: Bearer <token>`; others are answered
    UNAUTHENTICATED before their request is parsed or reaches the service. grpc.health.v1 stays
    open, because load balancers and Kubernetes probes cannot send credentials."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def _authorized(self, metadata: Any) -> bool:
        return any(key == "authorization" and bearer_token_matches(value, self._token) for key, value in metadata or ())

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if details.method.startswith(f"/{HEALTH_SERVICE}/") or self._authorized(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        return _refusing(handler, details.method) if handler is not None else handler


def _refusing(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED. It never parses the
    request (no deserializer: the bytes are dropped), so an unauthenticated client costs no
    parsing and, garbage or not, gets UNAUTHENTICATED."""
    message = f"{method} needs the metadata 'authorization: Bearer <token>' with this server's token"

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        _refusals.log("refused an unauthenticated call to %s", method, extra={"rpc": method, "code": "UNAUTHENTICATED"})
        await abort(context, grpc.StatusCode.UNAUTHENTICATED, message)

    serializers = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **serializers)
    return grpc.stream_stream_rpc_method_handler(refuse, **serializers)


def create_server(config: ServerConfig, repository: Repository | None = None,
                  loader: EngineLoader = runtime.load) -> tuple[Server, int]:
    """Build a server for `config` and bind its ports; `port` 0 picks a free one, returned here
    (likewise `http_port`, see `Server.http_port`).

    Loads `config.repository` unless a `repository` is given (tests pass one holding fake
    engines); with model control mode "explicit", only `config.startup_models`. `loader` turns
    a version directory into an Engine, at startup and for RepositoryModelLoad. Models that
    cannot be loaded are logged and skipped. Call it with an event loop running (grpc.aio
    binds to it); serve with `await server.start()`.

    Raises `ConfigError` without a repository, `ServerError` when the address cannot be bound.
    """
    if repository is None:
        if config.repository is None:
            raise ConfigError("repository is required: the model repository directory to serve")
        only = config.startup_models if config.model_control_mode == "explicit" else ("*",)
        repository = Repository.load(config.repository, loader=loader, only=only)
    interceptors = [BearerTokenAuth(config.auth_token)] if config.auth_token else []
    grpc_server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # gRPC sets SO_REUSEPORT by default, which lets a second server bind a port in use
            # and silently split traffic with the first; fail instead.
            ("grpc.so_reuseport", 0),
        ],
    )
    health = health_aio.HealthServicer()

    async def set_health(name: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await health.set(name, status)

    models = LoadedModels.serving(repository, set_health=set_health, unload_grace_s=config.shutdown_grace_s,
                                  loader=loader)
    service = InferenceService(models, control_mode=config.model_control_mode)
    add_service(grpc_server, grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"], service)
    add_service(grpc_server, health_pb2.DESCRIPTOR.services_by_name["Health"], health)
    # Reflection answers from kiln's private descriptor pool, so the health and reflection
    # services' own descriptors are added there too (once per process).
    for module in (health_pb2, reflection_pb2):
        try:
            POOL.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    add_service(grpc_server, reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
                reflection.aio.ReflectionServicer([SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME], pool=POOL))
    try:
        if config.tls:
            assert config.tls_cert_file is not None and config.tls_key_file is not None
            ca = config.tls_client_ca_file.read_bytes() if config.tls_client_ca_file else None
            credentials = grpc.ssl_server_credentials(
                [(config.tls_key_file.read_bytes(), config.tls_cert_file.read_bytes())],
                root_certificates=ca, require_client_auth=ca is not None,
            )
            port = grpc_server.add_secure_port(config.address, credentials)
        else:
            port = grpc_server.add_insecure_port(config.address)
    except RuntimeError as exc:
        raise ServerError(f"cannot listen on {config.address}: {exc}") from None
    if port == 0:  # older grpcio reports a failed bind this way
        raise ServerError(f"cannot listen on {config.address}")
    http = HttpServer(service, config) if config.http_port is not None else None
    return Server(config, grpc_server, service, health, port, http), port
