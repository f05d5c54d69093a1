"""The serving container's entry point, in KServe's conventions (deploy/kserve/, deploy/docker/):

    python -m server.kserve_runtime --model_name=NAME --model_dir=/mnt/models --http_port=8080 --grpc_port=8081

KServe's storage initializer puts the InferenceService's `storageUri` at /mnt/models and the
ServingRuntime passes the model's name (`{{.Name}}`, the InferenceService's) and the ports, in
the underscore spelling of KServe's own model servers (`--model-dir` and the like are
accepted too). /mnt/models may hold
- one engine directory (`manifest.json` at its top, and optionally a `config.toml`): served as
  model NAME, version 1;
- one model directory (`config.toml` and numeric version directories): served as model NAME,
  its latest version;
- a model repository (`<model>/<version>/`): every model in it under its own name, as Triton's
  runtime serves `--model-store=/mnt/models`.

This is `python -m server` with KServe's defaults: listening on every interface, HTTP (KServe
v2 REST, whose /v2/health/ready and /v2/health/live are the probes) on 8080, gRPC on 8081 (the
container port named `h2c`), Prometheus metrics on 8002; SIGTERM drains for
`--shutdown_grace_s` seconds (the pod's terminationGracePeriodSeconds must be longer). The
engine views of the first two layouts are symbolic links in a temporary directory, so
/mnt/models may be read-only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from server.__main__ import main as serve

# The engine directory's manifest (optimize's format, ARCHITECTURE.md "The engine directory").
ENGINE_MANIFEST = "manifest.json"
CONFIG_FILE = "config.toml"
DEFAULT_MODEL_DIR = "/mnt/models"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server.kserve_runtime",
                                     description="Serve /mnt/models as a KServe ServingRuntime container.")

    def option(name: str, **kwargs: object) -> None:
        spellings = dict.fromkeys((f"--{name}", f"--{name.replace('_', '-')}"))  # KServe's, and kiln's
        parser.add_argument(*spellings, dest=name, **kwargs)  # type: ignore[arg-type]

    option("model_name", default="model", help="the name the model is served under (KServe: {{.Name}})")
    option("model_dir", type=Path, default=Path(DEFAULT_MODEL_DIR),
           help=f"an engine, a model directory or a model repository (default: {DEFAULT_MODEL_DIR})")
    option("http_port", type=int, default=8080, help="KServe v2 REST and OpenAI's API (default: 8080)")
    option("grpc_port", type=int, default=8081, help="KServe v2 gRPC (default: 8081)")
    option("metrics_port", type=int, default=8002, help="Prometheus metrics at /metrics (default: 8002)")
    option("host", default="0.0.0.0", help="address to listen on (default: every interface)")
    option("shutdown_grace_s", type=float, default=30.0,
           help="on SIGTERM, seconds for queued and running requests (default: 30)")
    option("max_message_bytes", type=int, help="largest request or response (default: the server's, 64 MiB)")
    option("log_level", default="INFO", help="(default: INFO)")
    option("log_format", choices=("text", "json"), default="text", help="(default: text)")
    return parser.parse_args(argv)


def layout_of(model_dir: Path) -> str:
    """"engine", "model" or "repository": what `model_dir` holds (see the module docstring).
    Raises `ValueError` when it is not a directory."""
    if not model_dir.is_dir():
        raise ValueError(f"--model_dir {model_dir} is not a directory (did the storage initializer run?)")
    if (model_dir / ENGINE_MANIFEST).is_file():
        return "engine"
    if any(p.is_dir() and p.name.isdigit() for p in model_dir.iterdir()):
        return "model"
    return "repository"


def repository_view(model_dir: Path, model_name: str, scratch: Path) -> Path:
    """A model repository serving what `model_dir` holds: `model_dir` itself when it is one, else
    a repository under `scratch` whose model `model_name` links to it."""
    kind = layout_of(model_dir)
    if kind == "repository":
        return model_dir
    model = scratch / model_name
    if kind == "model":
        model.symlink_to(model_dir.resolve(), target_is_directory=True)
    else:
        model.mkdir()
        (model / "1").symlink_to(model_dir.resolve(), target_is_directory=True)
        if (model_dir / CONFIG_FILE).is_file():
            (model / CONFIG_FILE).symlink_to((model_dir / CONFIG_FILE).resolve())
    return scratch


def main(argv: list[str] | None = None) -> int:
    """Entry point: the exit code of `python -m server` (0 after a drain, 1 when it cannot
    start)."""
    args = parse_args(argv)
    try:
        layout_of(args.model_dir)
    except ValueError as exc:
        print(f"python -m server.kserve_runtime: error: {exc}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="kiln-models-") as scratch:
        repository = repository_view(args.model_dir, args.model_name, Path(scratch))
        options = ["--repository", str(repository), "--host", args.host, "--port", str(args.grpc_port),
                   "--http-port", str(args.http_port), "--metrics-port", str(args.metrics_port),
                   "--shutdown-grace-s", str(args.shutdown_grace_s), "--log-level", args.log_level,
                   "--log-format", args.log_format]
        if args.max_message_bytes is not None:
            options += ["--max-message-bytes", str(args.max_message_bytes)]
        return serve(options)


if __name__ == "__main__":
    sys.exit(main())
