"""How a compile shows its progress: the `Reporter` protocol that every stage, backend and pass
reports to, and the silent one used when nobody watches."""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    """Receives progress: a stage starts (with a step count when known), steps advance."""

    def start(self, stage: str, total: int | None = None) -> None: ...

    def advance(self, detail: str = "") -> None: ...

    def finish(self, stage: str, seconds: float) -> None: ...


class Silent:
    def start(self, stage: str, total: int | None = None) -> None:
        pass

    def advance(self, detail: str = "") -> None:
        pass

    def finish(self, stage: str, seconds: float) -> None:
        pass


__all__ = ["Reporter", "Silent"]
