"""The tuning cache: which candidate a measured build chose, per machine and model, so the next
build of the same model on the same machine copies the winner's kept engine (seconds), or, where
that engine is gone or damaged, rebuilds only the winner (a minute, not several).

`--backend auto` spends most of its time building and timing candidates that lose. What it
learns holds as long as nothing it depends on changes, so the whole table (every candidate's
times, accuracy, the reasons for rejections and skips, how sure the choice was) is stored in
`tuning.json` under a key made of exactly those things:

- the CPU: model name, instruction-set flags (AMX, AVX512, VNNI change the winner) and count;
- the software: Python, torch, ONNX Runtime, OpenVINO, NNCF, CTranslate2 versions, kiln's;
- the model: the source's content digest (weights and config) and its task;
- the request: precision, guard, shape ranges, timing shapes and backend restriction.

Any change makes another key, so a stale entry is never used; entries of other models and
machines stay. Where the file lives: `--tuning-cache PATH` (CLI), else `$KILN_CACHE_DIR/tuning.json`,
else `$XDG_CACHE_HOME/kiln/tuning.json`, else `~/.cache/kiln/tuning.json`. `--retune` measures
again and replaces the entry (and its engine); `--no-tuning-cache` neither reads nor writes any
of it. The winners' engines are kept beside the file (`optimize.engine_cache`,
`tuning-engines/`, bounded in size). The file is JSON, written atomically (temporary file + rename), so
a crash never leaves half of it, and one that cannot be read is set aside, never trusted. Writers
take turns (an exclusive lock on `tuning.json.lock` around read, update and replace), so two
compiles finishing at once on one machine both keep their entries.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from optimize.engine_cache import EngineCache

CACHE_ENV = "KILN_CACHE_DIR"
CACHE_FILE = "tuning.json"
FORMAT = 1
# Libraries whose version can change which engine is fastest.
ENGINE_PACKAGES = ("torch", "onnxruntime", "openvino", "nncf", "ctranslate2", "kiln")


def default_path() -> Path:
    """Where the tuning cache lives when no path is given (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / CACHE_FILE
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kiln" / CACHE_FILE


def cpu_identity() -> dict[str, Any]:
    """The CPU's model name, its sorted instruction-set flags and the CPU count."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in (platform.processor(), platform.machine()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = sorted(value.split())
    except OSError:
        pass
    return {"model": model, "flags": flags, "cpus": os.cpu_count() or 1}


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ENGINE_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def tuning_key(model_digest: str, request: dict[str, Any]) -> dict[str, Any]:
    """Everything a cached choice depends on (see the module docstring), as one JSON object."""
    return {"cpu": cpu_identity(), "versions": versions(), "model": model_digest, "request": request}


def key_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class TuningCache:
    """A tuning.json file. `retune`: ignore what is cached (measure again, then replace it)."""

    path: Path
    retune: bool = False

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"format": FORMAT, "entries": {}}
        except (OSError, ValueError):
            self._set_aside()
            return {"format": FORMAT, "entries": {}}
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            self._set_aside()
            return {"format": FORMAT, "entries": {}}
        return data

    def _set_aside(self) -> None:
        try:
            self.path.replace(self.path.with_name(self.path.name + ".unreadable"))
        except OSError:
            pass

    def lookup(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The recorded search for `key`, or None (not cached, or `retune`)."""
        if self.retune:
            return None
        entry = self._read()["entries"].get(key_id(key))
        return entry if isinstance(entry, dict) and entry.get("key") == key and entry.get("chosen") else None

    @property
    def engines(self) -> EngineCache:
        """Where the winners' engines are kept: beside the file, `<stem>-engines/`."""
        return EngineCache(self.path.with_name(f"{self.path.stem}-engines"))

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the file's writer lock: another process's read-update-replace waits for ours,
        instead of replacing the file with a copy that lacks our entry."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def store(self, key: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        """Record a finished search under `key` (replacing an older one); returns the entry."""
        with self._writing():
            data = self._read()
            recorded = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            entry = data["entries"][key_id(key)] = {**record, "key": key, "recorded": recorded}
            fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_FILE}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return entry


__all__ = ["TuningCache", "default_path", "tuning_key", "key_id", "cpu_identity", "versions", "CACHE_ENV"]
