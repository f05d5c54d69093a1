"""`python -m server --repository DIR [--host 127.0.0.1] [--port 8001] [--http-port 8000]`: serve a
model repository until SIGINT or SIGTERM, then drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from server import logs, memory
from server.app import create_server
from server.config import CONTROL_MODES, DEFAULT_MAX_MESSAGE_BYTES, ServerConfig
from server.errors import ServerError

log = logging.getLogger("server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__.split("\n")[0].strip("`"))
    parser.add_argument("--repository", type=Path, required=True, help="model repository: <repo>/<model>/<version>/")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8001, help="gRPC port; 0 picks a free one (default: 8001)")
    parser.add_argument("--http-port", type=int, default=8000,
                        help="HTTP port: KServe v2 REST at /v2 and OpenAI's embeddings API at /v1; 0 picks a free "
                             "one (default: 8000, as Triton)")
    parser.add_argument("--no-http", action="store_true", help="serve no HTTP port (gRPC only)")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="largest gRPC message received or sent, and largest HTTP request body; larger ones are "
                             f"refused (RESOURCE_EXHAUSTED, HTTP 413) (default: {DEFAULT_MAX_MESSAGE_BYTES} = 64 MiB; "
                             "at most 2147483647)")
    parser.add_argument("--shutdown-grace-s", type=float, default=30.0,
                        help="on SIGTERM, seconds for queued and running requests to finish (default: 30)")
    parser.add_argument("--metrics-port", type=int, default=8002,
                        help="Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port (default: 8002, "
                             "as Triton)")
    parser.add_argument("--no-metrics", action="store_true", help="serve no metrics endpoint")
    parser.add_argument("--tls-cert", type=Path,
                        help="PEM certificate chain: serve gRPC over TLS and HTTPS (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path, help="PEM CA: require client certificates it signed (mTLS)")
    parser.add_argument("--auth-token-file", type=Path,
                        help="file holding a bearer token every RPC and HTTP request but health checks must carry "
                             "(or set KILN_AUTH_TOKEN; a token is never taken from the command line)")
    parser.add_argument("--model-control-mode", choices=CONTROL_MODES, default="none",
                        help="explicit: clients load/unload models (RepositoryModelLoad/Unload) (default: none)")
    parser.add_argument("--load-model", action="append", metavar="NAME",
                        help="with --model-control-mode explicit: model to load at startup (repeatable; '*': all; "
                             "default: all)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG logs every request and batch (default: INFO)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log line format (default: text)")
    return parser.parse_args(argv)


def read_token(path: Path | None) -> str | None:
    """The bearer token from `path`, else from $KILN_AUTH_TOKEN, else None (no auth)."""
    if path is not None:
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --auth-token-file {path}: {exc.strerror}") from None
    return os.environ.get("KILN_AUTH_TOKEN") or None


async def serve(config: ServerConfig) -> None:
    """Run a server for `config` until SIGINT/SIGTERM, then stop it gracefully."""
    server, _ = create_server(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s received again; still draining (at most %.1f s)", signum.name, config.shutdown_grace_s)
        else:
            log.info("%s received", signum.name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    memory.freeze_heap()  # what start-up made lives as long as the process: no full GC walks it
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 after a graceful shutdown, 1 when the server
    cannot start)."""
    args = parse_args(argv)
    try:
        logs.configure(args.log_level, args.log_format)
        config = ServerConfig(
            repository=args.repository, host=args.host, port=args.port,
            http_port=None if args.no_http else args.http_port,
            max_message_bytes=args.max_message_bytes, shutdown_grace_s=args.shutdown_grace_s,
            metrics_port=None if args.no_metrics else args.metrics_port,
            tls_cert_file=args.tls_cert, tls_key_file=args.tls_key, tls_client_ca_file=args.tls_client_ca,
            auth_token=read_token(args.auth_token_file),
            model_control_mode=args.model_control_mode, startup_models=tuple(args.load_model or ("*",)),
        )
        asyncio.run(serve(config))
    except (ServerError, ValueError) as exc:  # bad options, missing repository, port in use
        print(f"python -m server: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
