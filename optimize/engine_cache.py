"""The winners' engines, kept beside the tuning cache, so that a second build of the same model
with the same request copies the engine instead of building and verifying it again (seconds,
not the minute or more a build and its verification take on 2 cores).

A tuning-cache entry (`optimize.tuning`) says which candidate won for one key (CPU, library
versions, the model's content digest, the request); its engine is kept under
`<tuning file's stem>-engines/<entry id>/` next to `tuning.json`, with `record.json` naming the
entry (its id, the candidate and when the search was recorded) and the SHA-256 of every file.
An engine is restored only when all of that still matches, every file is intact and its
manifest is one this kiln reads; anything else (missing, corrupted, from another search) is
reported as the reason, and the caller builds the winner again and keeps that engine instead.
Library versions are part of the key, so an engine is never reused under other versions; the
record also holds a digest of kiln's own sources, so an edited kiln (same version number)
never reuses an engine an older one built.

Disk use is bounded: after an engine is kept, the least recently used ones are removed until
all fit in `max_bytes` (2 GiB by default; an engine larger than that is not kept).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimize.runtime.errors import EngineError
from optimize.runtime.manifest import MANIFEST_FILE, Manifest
from optimize.staging import staged_directory

RECORD_FILE = "record.json"
ENGINE_DIR = "engine"
FORMAT = 1
DEFAULT_MAX_BYTES = 2 << 30


def file_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under `directory`, by '/'-separated relative path."""
    digests = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digests[path.relative_to(directory).as_posix()] = h.hexdigest()
    return digests


@functools.cache
def kiln_digest() -> str:
    """SHA-256 over the sources of the `optimize` package (file names and contents)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@dataclass
class EngineCache:
    """The directory of kept engines, one subdirectory per tuning-cache entry id."""

    root: Path
    max_bytes: int = DEFAULT_MAX_BYTES

    def keep(self, entry_id: str, chosen: str, recorded: str | None, engine_dir: Path) -> bool:
        """Copy the engine at `engine_dir` in as entry `entry_id`'s (replacing an older one), then
        evict the least recently used until the cache fits; False when it is too large to keep."""
        size = _size(engine_dir)
        if size > self.max_bytes:
            return False
        with staged_directory(self.root / entry_id) as staging:
            shutil.copytree(engine_dir, staging / ENGINE_DIR)
            record = {"format": FORMAT, "entry": entry_id, "chosen": chosen, "recorded": recorded, "kiln": kiln_digest(),
                      "stored": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "files": file_digests(staging / ENGINE_DIR)}
            (staging / RECORD_FILE).write_text(json.dumps(record, indent=1))
        self._evict(keep=entry_id)
        return True

    def restore(self, entry_id: str, chosen: str, recorded: str | None, out_dir: Path) -> tuple[dict[str, Any] | None, str]:
        """Copy entry `entry_id`'s engine to `out_dir` if it is the one `chosen` by the search
        recorded at `recorded` and intact: (its record, "") or (None, why not)."""
        entry = self.root / entry_id
        try:
            record = json.loads((entry / RECORD_FILE).read_text())
        except FileNotFoundError:
            return None, "no engine kept for it"
        except (OSError, ValueError) as exc:
            return None, f"its record cannot be read ({exc})"
        if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("files"), dict):
            return None, "its record is of another format"
        if (record.get("entry"), record.get("chosen"), record.get("recorded")) != (entry_id, chosen, recorded):
            return None, "the kept engine is from another search"
        if record.get("kiln") != kiln_digest():
            return None, "the kept engine was built by another kiln"
        engine = entry / ENGINE_DIR
        if MANIFEST_FILE not in record["files"]:
            return None, "the kept engine has no manifest"
        try:
            found = file_digests(engine)
        except OSError as exc:
            return None, f"the kept engine cannot be read ({exc})"
        if found != record["files"]:
            changed = sorted(set(found) ^ set(record["files"]) | {k for k in found if found[k] != record["files"].get(k)})
            return None, f"the kept engine's files changed: {', '.join(changed)[:200]}"
        try:
            Manifest.read(engine)
        except EngineError as exc:
            return None, f"the kept engine's manifest cannot be used ({str(exc)[:160]})"
        with staged_directory(out_dir) as staging:
            shutil.copytree(engine, staging, dirs_exist_ok=True)
        os.utime(entry / RECORD_FILE)  # recently used: evicted last
        return record, ""

    def _evict(self, keep: str) -> None:
        entries = []
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                record = entry / RECORD_FILE
                used = record.stat().st_mtime if record.exists() else 0.0
                entries.append((used, entry, _size(entry)))
        total = sum(size for _, _, size in entries)
        for _, entry, size in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if entry.name != keep:
                shutil.rmtree(entry, ignore_errors=True)
                total -= size


__all__ = ["EngineCache", "file_digests", "kiln_digest", "DEFAULT_MAX_BYTES"]
