"""Helpers for the HTTP port's tests: a server with an ephemeral HTTP port, and plain HTTP
requests (urllib) that return the status, headers and body whatever the status."""

from __future__ import annotations

import contextlib
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tests.server.harness import RunningServer, running_server

HTTP_TIMEOUT_S = 30.0


@contextlib.contextmanager
def http_server(repository: Any, **options: Any) -> Iterator[RunningServer]:
    """`running_server` with the HTTP port on a free port as well."""
    with running_server(repository, http_port=0, **options) as running:
        yield running


def base_url(running: RunningServer, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{running.server.http_port}"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def fetch(url: str, body: bytes | dict[str, Any] | list[Any] | str | None = None, method: str | None = None,
          headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> Reply:
    """One HTTP request: `body` as JSON unless it is bytes; GET without a body, else POST."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"),
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S, context=context) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


def openai_error(reply: Reply, status: int) -> dict[str, Any]:
    """The `error` object of an OpenAI-shaped error reply, after checking its status and shape."""
    assert reply.status == status, (reply.status, reply.body)
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def kserve_error(reply: Reply, status: int) -> str:
    """The message of a Triton-shaped error reply (`{"error": "..."}`), after checking its status."""
    assert reply.status == status, (reply.status, reply.body)
    document = reply.json()
    assert set(document) == {"error"} and isinstance(document["error"], str), document
    return document["error"]

