"""The dynamic batcher: requests in, batches out. A pure object — no asyncio, no sockets, no
threads; time comes from an injected clock — so every rule is unit-tested with a fake clock.

Rules (Triton's dynamic batcher, FIELD_NOTES "Triton's dynamic batcher"):
- A batch holds at most `max_batch_size` samples and never splits a request.
- Only requests with equal batching keys join one batch. The key is the caller's business;
  the server uses every input's dtype and non-batch dims, so concatenation along dim 0 is
  always valid. Requests of another shape wait for their own batch.
- The oldest queued request decides what is dispatched next, across all keys, so no shape
  starves behind a stream of another. Its batch is ready when it is full (no further queued
  request of its key fits) or when that oldest request has waited `max_queue_delay_us`.
  With a delay of 0 a batch is ready at once with whatever is queued, so requests still batch
  when they queue behind a busy instance.
- `max_batch_size` 0 means the model does not batch: every request is its own batch.

`next_batch` is asked whenever an instance is free; `wait_s` tells the driver how long it may
sleep before a batch becomes ready without new arrivals. `concatenate` and `split` turn a
batch's inputs into one tensor per input and the engine's outputs back into one result per
request.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")
Clock = Callable[[], float]  # seconds, monotonic


@dataclass(frozen=True)
class BatchPolicy:
    """What the batcher may form. `max_batch_size` in samples (0: no batching);
    `max_queue_delay_us`: the longest the oldest request waits for company."""

    max_batch_size: int
    max_queue_delay_us: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise ValueError(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_us / 1e6


@dataclass(eq=False)
class Pending(Generic[T]):
    """One queued request: its size in samples, its batching key, when it arrived (clock
    seconds) and the caller's payload (inputs, a future to answer, ...)."""

    size: int
    key: Hashable
    payload: T
    arrival_s: float
    seq: int = field(repr=False)  # arrival order; breaks ties between equal clock readings


@dataclass(eq=False)
class Batch(Generic[T]):
    """Requests dispatched together, in arrival order. `reason` says why it left the queue:
    "full", "delay" (the oldest request waited long enough), "flush" (draining) or
    "unbatched" (the model does not batch)."""

    requests: list[Pending[T]]
    reason: str

    @property
    def size(self) -> int:
        """Samples in the batch."""
        return sum(r.size for r in self.requests)

    @property
    def sizes(self) -> list[int]:
        return [r.size for r in self.requests]


class Batcher(Generic[T]):
    """Queue of pending requests that forms batches by the module's rules."""

    def __init__(self, policy: BatchPolicy, clock: Clock = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        # One FIFO per key; the oldest request overall is the oldest of the FIFO heads.
        self._queues: dict[Hashable, deque[Pending[T]]] = {}
        self._seq = itertools.count()
        self._count = 0

    def __len__(self) -> int:
        """Requests waiting."""
        return self._count

    def add(self, size: int, key: Hashable, payload: T) -> Pending[T]:
        """Queue a request of `size` samples. Raises `ValueError` when it can never be
        dispatched (larger than `max_batch_size`, or not a positive size)."""
        if size < 1:
            raise ValueError(f"request size must be >= 1, got {size}")
        if self.policy.max_batch_size and size > self.policy.max_batch_size:
            raise ValueError(f"request of {size} samples exceeds max_batch_size {self.policy.max_batch_size}")
        pending = Pending(size=size, key=key, payload=payload, arrival_s=self._clock(), seq=next(self._seq))
        self._queues.setdefault(key, deque()).append(pending)
        self._count += 1
        return pending

    def remove(self, pending: Pending[T]) -> bool:
        """Take a request out of the queue (its client went away). False when it is no longer
        queued (already dispatched or removed)."""
        queue = self._queues.get(pending.key)
        if queue is None:
            return False
        try:
            queue.remove(pending)
        except ValueError:
            return False
        if not queue:
            del self._queues[pending.key]
        self._count -= 1
        return True

    def drain(self) -> list[Pending[T]]:
        """Remove and return every queued request, oldest first (shutdown fails them)."""
        everything = sorted((p for q in self._queues.values() for p in q), key=lambda p: p.seq)
        self._queues.clear()
        self._count = 0
        return everything

    def next_batch(self, *, flush: bool = False) -> Batch[T] | None:
        """The batch to run now, removed from the queue, or None when nothing is ready.
        `flush=True` dispatches the oldest request's batch even if it could still grow
        (used while draining)."""
        head = self._oldest()
        if head is None:
            return None
        if self.policy.max_batch_size == 0:
            return self._pop([head], "unbatched")
        members, full = self._gather(head)
        if full:
            return self._pop(members, "full")
        if self._clock() - head.arrival_s >= self.policy.max_queue_delay_s:
            return self._pop(members, "delay")
        if flush:
            return self._pop(members, "flush")
        return None

    def wait_s(self) -> float | None:
        """Seconds until `next_batch` returns a batch if nothing else arrives: 0 when one is
        ready now, None when the queue is empty."""
        head = self._oldest()
        if head is None:
            return None
        if self.policy.max_batch_size == 0 or self._gather(head)[1]:
            return 0.0
        return max(0.0, head.arrival_s + self.policy.max_queue_delay_s - self._clock())

    def _oldest(self) -> Pending[T] | None:
        if not self._queues:
            return None
        return min((q[0] for q in self._queues.values()), key=lambda p: p.seq)

    def _gather(self, head: Pending[T]) -> tuple[list[Pending[T]], bool]:
        """The requests that join `head`'s batch (FIFO within its key, stopping at the first
        that does not fit: a later, smaller request never overtakes it) and whether the
        batch is full."""
        members: list[Pending[T]] = []
        total = 0
        limit = self.policy.max_batch_size
        for pending in self._queues[head.key]:
            if total + pending.size > limit:
                return members, True
            members.append(pending)
            total += pending.size
        return members, total == limit

    def _pop(self, members: list[Pending[T]], reason: str) -> Batch[T]:
        queue = self._queues[members[0].key]
        for _ in members:  # members are the queue's first len(members) entries
            queue.popleft()
        if not queue:
            del self._queues[members[0].key]
        self._count -= len(members)
        return Batch(members, reason)


def batch_key(inputs: Mapping[str, np.ndarray]) -> tuple:
    """Key under which requests can be concatenated along dim 0: every input's name, dtype
    and non-batch dims."""
    return tuple((name, array.dtype.str, array.shape[1:]) for name, array in sorted(inputs.items()))


def concatenate(requests: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One array per input name, the requests' arrays stacked along dim 0 in order. A single
    request's arrays are returned as they are."""
    if len(requests) == 1:
        return dict(requests[0])
    return {name: np.concatenate([r[name] for r in requests], axis=0) for name in requests[0]}


def split(outputs: Mapping[str, np.ndarray], sizes: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Cut each output along dim 0 into consecutive parts of `sizes` samples, one dict per
    request. Raises `ValueError` when an output's dim 0 is not the batch's total size."""
    if len(sizes) == 1:
        return [dict(outputs)]
    total = sum(sizes)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ValueError(
                f"output '{name}' has shape {list(array.shape)}, expected dim 0 to be the batch size {total}"
            )
    bounds = np.cumsum(sizes)[:-1]
    parts: list[dict[str, np.ndarray]] = [{} for _ in sizes]
    for name, array in outputs.items():
        for part, piece in zip(parts, np.split(array, bounds, axis=0), strict=True):
            part[name] = piece
    return parts
