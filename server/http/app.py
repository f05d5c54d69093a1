"""The HTTP port: one Starlette app with KServe v2 REST (`server.http.kserve`) and OpenAI's
embeddings API (`server.http.openai`) over the server's `InferenceService`, served by uvicorn
on the server's own event loop, beside grpc.aio.

The socket is bound when the `HttpServer` is made (so a port in use fails `create_server`, as
for gRPC); uvicorn's signal handlers are left out, since `python -m server` stops HTTP and gRPC
together on SIGINT/SIGTERM (`Server.stop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.auth import bearer_token_matches
from server.config import ServerConfig
from server.errors import ServerError, Unauthenticated
from server.http import kserve, openai, tasks
from server.http.common import api_of, error_body, error_response, json_response
from server.service import InferenceService

log = logging.getLogger("server.http")

# Load balancers and Kubernetes probes cannot send credentials (grpc.health.v1 is open likewise).
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


class BearerToken:
    """ASGI middleware: every request but the health routes carries `Authorization: Bearer
    <token>`, or is answered 401 in its API's error shape."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            path = scope["path"]
            log.info("refused an unauthenticated request to %s", path, extra={"rpc": "HTTP", "code": 401})
            refusal = Unauthenticated(f"{path} needs the header 'Authorization: Bearer <token>' with this server's "
                                      "token")
            await error_response(api_of(path), refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        return any(key == b"authorization" and bearer_token_matches(value, self._token)
                   for key, value in scope["headers"])


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route, method not allowed) as JSON in the API's shape."""
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return json_response(error_body(api_of(request.url.path), exc.status_code, message), exc.status_code,
                         dict(exc.headers or {}))


def create_app(service: InferenceService, config: ServerConfig) -> Starlette:
    """The ASGI app of the HTTP port: request bodies up to `config.max_message_bytes`, and the
    bearer token when `config.auth_token` is set."""
    limit = config.max_message_bytes
    middleware = [Middleware(BearerToken, token=config.auth_token)] if config.auth_token else []
    routes = [*kserve.routes(service, limit), *openai.routes(service, limit), *tasks.routes(service, limit)]
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: _http_error})


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the server's owner stops HTTP with gRPC."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """The HTTP port of a server. `port` is the bound port (also when the config asked for 0)."""

    def __init__(self, service: InferenceService, config: ServerConfig) -> None:
        assert config.http_port is not None
        self.host, self.tls = config.host, config.tls
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        # The protocol named: asyncio sets TCP_NODELAY only on sockets that say IPPROTO_TCP, and
        # without it a response's headers and body wait out the client's delayed ACK (40 ms).
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT: see gRPC's
            self._socket.bind((config.host.strip("[]"), config.http_port))
        except OSError as exc:
            self._socket.close()
            raise ServerError(f"cannot serve HTTP on {config.host}:{config.http_port}: {exc.strerror or exc}") from None
        self.port: int = self._socket.getsockname()[1]
        options: dict[str, object] = {}
        if config.tls:
            options.update(ssl_certfile=str(config.tls_cert_file), ssl_keyfile=str(config.tls_key_file))
            if config.tls_client_ca_file is not None:
                options.update(ssl_ca_certs=str(config.tls_client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
        # No access log (failures are logged by the routes, successes at DEBUG by the service),
        # and uvicorn's own lines only from WARNING: the server logs its own startup line.
        self._uvicorn = _Uvicorn(uvicorn.Config(
            create_app(service, config), lifespan="off", log_config=None, log_level="warning", access_log=False,
            server_header=False, **options))  # type: ignore[arg-type]
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def start(self) -> None:
        """Serve on the bound socket. Raises `ServerError` when uvicorn cannot start (e.g. an
        unreadable TLS key)."""
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[self._socket]), name="kiln-http")
        while not self._uvicorn.started:
            if self._task.done():
                try:
                    self._task.result()
                except Exception as exc:
                    raise ServerError(f"cannot serve HTTP on {self.url}: {exc}") from None
                raise ServerError(f"cannot serve HTTP on {self.url}: uvicorn stopped while starting")
            await asyncio.sleep(0.005)  # uvicorn says it started by a flag only

    async def stop(self, timeout_s: float) -> None:
        """Stop taking connections, let the requests in flight finish for up to `timeout_s`,
        then cancel what is left. Idle keep-alive connections are closed at once."""
        if self._task is None:
            self._socket.close()
            return
        self._uvicorn.config.timeout_graceful_shutdown = timeout_s  # type: ignore[assignment]
        self._uvicorn.should_exit = True
        await self._task
