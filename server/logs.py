"""Logging for the server process: one line per event, with request context as fields.

Code logs with `extra={"request_id": ..., "model": ..., "code": ...}`; the text format appends
those fields as `key=value`, the JSON format (`--log-format json`, for log shippers) emits one
object per line with them as keys.

Much of what is logged comes from clients (model names, request ids, input names inside error
messages), so no client can forge or split a log line: the text format writes control
characters as escapes (`\\n`, `\\x00`, ...) and indents the lines of a traceback under a `  | `
marker; JSON escapes them by itself. Events that anyone may cause at will (refused calls,
unparseable requests) go through `Throttled`, so a flood of them is a few lines, not a flood.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

# C0 controls, DEL, C1 controls (NEL, U+0085, ends a line for some readers) and the Unicode line
# and paragraph separators.
_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_NAMED = {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
_ESCAPES = {c: _NAMED.get(c, f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROLS}
# Marks the lines of a traceback: a line that starts a record never starts with it.
CONTINUATION = "  | "


def escape(text: str) -> str:
    """`text` with every control character written as an escape (`\\n`, `\\r`, `\\t`, `\\x00`,
    `\\x85`, `\\u2028`), so it cannot end a log line or hide in one."""
    return text.translate(_ESCAPES)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """`2026-11-23 12:00:00,123 INFO server.service: message [key=value ...]`: one line per
    record, message and field values escaped; a traceback follows on lines starting `  | `."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        fields = _fields(record)
        if fields:
            line += " [" + " ".join(f"{escape(k)}={escape(str(v))}" for k, v in fields.items()) + "]"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for block in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if block:
                line += "".join(f"\n{CONTINUATION}{escape(part)}" for part in block.splitlines())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the `extra` fields, and the
    exception text when there is one. `json` escapes every control character (and everything
    outside ASCII), so a record is always exactly one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class Throttled:
    """Logs an event that clients can cause as often as they like without letting them flood
    the log: the first occurrence at `level`, then at most one line at `level` per `interval_s`
    saying how many occurred since the last one; every occurrence at DEBUG."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0, level: int = logging.INFO,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._level = level
        self._clock = clock
        self._next_s: float | None = None
        self._since = 0

    def log(self, message: str, *args: Any, extra: Mapping[str, Any] | None = None) -> None:
        """Log one occurrence (`message % args`, with `extra` fields)."""
        now = self._clock()
        self._since += 1
        if self._next_s is not None and now < self._next_s:
            self._logger.debug(message, *args, extra=extra)
            return
        if self._since > 1:
            message += f" (and {self._since - 1} more since the previous such line, logged at DEBUG)"
        self._logger.log(self._level, message, *args, extra=extra)
        self._since = 0
        self._next_s = now + self._interval_s


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send the server's logs (and the engine's) to stderr at `level` in format `fmt`
    ("text" or "json"). Raises `ValueError` for an unknown level or format."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
