"""`manifest.json`: what an engine directory holds and how it was made.

The manifest is the contract between the compiler and everything downstream (server, profiler):
a reader needs nothing but this file to know the engine's tensors, backend and accuracy.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from optimize.runtime.config import CompileConfig
from optimize.runtime.errors import EngineError
from optimize.runtime.specs import TensorSpec

FORMAT_VERSION = 2
#: Why each older format cannot be read, for the refusal message.
_FORMAT_CHANGES = {
    1: "its programs call kernel ops by their old names (torch.ops.kernels.*, now torch.ops.kiln.*)",
}
PIPELINE_DIR = "pipeline"  # where an engine directory keeps its text pipeline (tokenizer files)
MANIFEST_FILE = "manifest.json"


@dataclass
class Manifest:
    """Everything `manifest.json` records. `payload` lists the backend's files (relative paths)."""

    name: str
    backend: str
    config: CompileConfig
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source: dict[str, Any]
    payload: list[str]
    accuracy: dict[str, Any] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def files(self) -> list[tuple[str, str]]:
        """Every file this manifest names, as (what it is, path relative to the engine
        directory): the payload, and the text pipeline's tokenizer."""
        named = [("payload file", rel) for rel in self.payload]
        if self.pipeline is not None:
            named.append(("pipeline tokenizer", f"{PIPELINE_DIR}/{self.pipeline.get('tokenizer')}"))
        return named

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "backend": self.backend,
            "source": self.source,
            "config": self.config.to_json(),
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "payload": self.payload,
            "passes": self.passes,
            "accuracy": self.accuracy,
            "pipeline": self.pipeline,
            "timings_s": self.timings_s,
            "build": self.build,
            "environment": self.environment,
        }

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        """Read and validate `<directory>/manifest.json`; raises `EngineError` with the reason."""
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise EngineError(f"{directory} is not an engine directory: {MANIFEST_FILE} not found")
        path = engine_file(directory, MANIFEST_FILE, "manifest")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EngineError(f"{path} is not valid JSON: {exc}") from None
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            why = _FORMAT_CHANGES.get(version, "")
            raise EngineError(
                f"{path} has format_version {version!r}; this kiln reads format_version {FORMAT_VERSION}"
                + (f" ({why})" if why else "")
                + "; recompile the engine with `python -m optimize compile`"
            )
        try:
            return cls(
                name=data["name"],
                backend=data["backend"],
                config=CompileConfig.from_json(data["config"]),
                inputs=[TensorSpec.from_json(s) for s in data["inputs"]],
                outputs=[TensorSpec.from_json(s) for s in data["outputs"]],
                source=data["source"],
                payload=list(data["payload"]),
                accuracy=data.get("accuracy", {}),
                passes=data.get("passes", []),
                environment=data.get("environment", {}),
                pipeline=_pipeline_entry(data.get("pipeline")),
                timings_s=data.get("timings_s", {}),
                build=data.get("build", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"{path} is malformed: {exc}") from None


def _pipeline_entry(entry: Any) -> dict[str, Any] | None:
    if entry is not None and not (isinstance(entry, dict) and isinstance(entry.get("tokenizer"), str)):
        raise ValueError(f"pipeline must be an object with a 'tokenizer' file name, not {entry!r}"[:200])
    return entry


def engine_file(directory: str | Path, name: str, what: str) -> Path:
    """`directory / name` for a file an engine names (`name` relative, '/'-separated, as the
    manifest records it), once it is known to stay inside the engine directory with every
    symlink resolved. Raises `EngineError` naming `what` when `name` is absolute, has a `..`
    component, or resolves outside; whether the file exists is the caller's question."""
    root = Path(directory)
    parts = name.split("/") if isinstance(name, str) else [""]
    # Every component a plain name: no absolute path, no "..", no "." or empty component that
    # would hide one (pipeline/ + "/etc/x"), no backslash (a separator elsewhere).
    if any(part in ("", ".", "..") or "\\" in part for part in parts):
        raise EngineError(f"engine {root}: {what} {name!r} is not a relative path inside the engine directory")
    target = root / PurePosixPath(*parts)
    if not target.resolve().is_relative_to(root.resolve()):
        raise EngineError(f"engine {root}: {what} {name!r} resolves to {target.resolve()}, outside the engine directory")
    return target


def check_links(directory: str | Path) -> None:
    """Raise `EngineError` when any symlink inside the engine directory (at any depth, whether
    the manifest names it or a backend opens it by its own name) resolves outside it."""
    root = Path(directory)
    for parent, dirs, files in os.walk(root):  # does not descend into linked directories
        for entry in (*dirs, *files):
            if os.path.islink(os.path.join(parent, entry)):
                engine_file(root, Path(parent, entry).relative_to(root).as_posix(), "link")


def build_environment() -> dict[str, Any]:
    """Versions and device of the build machine, so a mismatch at load time can be explained."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'unknown'})",
    }
    for module in ("onnx", "onnxruntime", "transformers", "triton"):
        try:
            env[module] = __import__(module).__version__
        except Exception:  # an optional dependency that is absent or broken is just not recorded
            continue
    # Engine runtimes are recorded when the build used them (importing them all costs seconds).
    for module in ("tensorrt", "tensorrt_rtx", "openvino", "ctranslate2"):
        if module in sys.modules:
            env[module] = getattr(sys.modules[module], "__version__", "unknown")
    return env
