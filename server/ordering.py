"""Answers released in the order their requests arrived (Triton's `preserve_ordering`), for
schedulers whose batches may finish out of order."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class InOrder(Generic[T]):
    """Releases answers in the order requests were admitted (Triton's `preserve_ordering`).

    `admit` hands out a ticket per accepted request; `finish(ticket, answer)` returns the
    answers that may go out now: this one and any later ones that were waiting, once every
    earlier ticket is finished. A request that ends without an answer (its client went away)
    is still finished, with None, so it never holds the others back.
    """

    def __init__(self) -> None:
        self._next_ticket = 0
        self._next_release = 0
        self._done: dict[int, T | None] = {}

    def __len__(self) -> int:
        """Finished answers held back behind an unfinished earlier request."""
        return len(self._done)

    def admit(self) -> int:
        ticket = self._next_ticket
        self._next_ticket += 1
        return ticket

    def finish(self, ticket: int, answer: T | None) -> list[T]:
        if ticket in self._done or not self._next_release <= ticket < self._next_ticket:
            raise ValueError(f"ticket {ticket} is not outstanding")
        self._done[ticket] = answer
        released: list[T] = []
        while self._next_release in self._done:
            item = self._done.pop(self._next_release)
            self._next_release += 1
            if item is not None:
                released.append(item)
        return released
