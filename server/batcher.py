"""The dynamic batcher: requests in, batches out. A pure object — no asyncio, no sockets, no
threads; time comes from an injected clock — so every rule is unit-tested with a fake clock.

Rules (those of Triton Inference Server's dynamic batcher, with text-embeddings-inference's token
budget and length grouping):
- A batch holds at most `max_batch_size` samples and, when `max_batch_tokens` is set, at most
  that many padded tokens: its rows times the token length of its longest row (what an engine
  that pads computes). A queued entry is never split here; a request may be queued as several
  parts (`add_parts`: a text request's sentences one by one, or a client batch over the budget
  in slices), which the caller re-joins, and counts as one request in the queue's bounds.
- Length grouping: entries that carry a token length (`tokens`) join the deciding request's
  batch by length, not by arrival: among the first `lookahead` entries of its key (oldest
  first), sorted by length, the batch is the run of neighbours around the deciding one, within
  both bounds, with the most useful tokens per token computed (padding and a per-call cost,
  `CALL_OVERHEAD_TOKENS`, counted), so rows of similar length run together and padding stays
  small, as in offline inference on sorted input. The deciding request is always in its
  batch, so nothing starves.
- Only requests with equal batching keys join one batch. The key is the caller's business
  (`server.layout` makes it: exact shapes, a sequence-length bucket, or nothing but dtypes for
  packed batches). Requests of another key wait for their own batch.
- Priority levels (1 is the highest): the oldest request of the highest non-empty level decides
  what is dispatched next, across all keys, so no shape starves within a level. Requests of
  lower levels with the same key join its batch after every request of higher levels.
- A batch is ready when it is full (no further queued request of its key fits), when the
  queued requests of its key reach a preferred batch size (the largest one reachable goes), or
  when the deciding request has waited `max_queue_delay_us`. With a delay of 0 a batch is ready
  at once with whatever is queued, so requests still batch when they queue behind a busy
  instance.
- Queue policy, per priority level: `max_queue_size` bounds the level's queue (`add` raises
  `QueueFull`); a request's timeout (the level's default, or the request's own when overriding
  is allowed — only ever shorter) either rejects it (`expire` returns it) or delays it behind
  every request that has not timed out. A request's deadline (its client's) always rejects.
  `next_batch` never returns a request whose deadline or rejecting timeout has passed.
- `max_batch_size` 0 means the model does not batch: every request is its own batch.

`next_batch` is asked whenever an instance is free, by any number of instances sharing one
batcher; `wait_s` tells the driver how long it may sleep before a batch becomes ready or a
request times out without new arrivals. The policies live in `server.batch_policy`;
`server.ordering.InOrder` releases answers in arrival order for models that preserve ordering.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from server.batch_policy import BatchPolicy

T = TypeVar("T")
Clock = Callable[[], float]  # seconds, monotonic

# What one engine call costs beyond its tokens, in tokens of compute: assembling the batch, the
# hand-off to an instance thread and back, the engine's dispatch (about 1 ms in all here), which
# a MiniLM-class encoder on 2 CPU cores spends on some 10 tokens. Length grouping weighs a batch
# by useful tokens / (padded tokens + this), so it pays a little padding to make fewer calls,
# and splits rows of very different lengths into calls of their own when the padding would cost
# more; 128 leans towards fewer, larger batches, for engines whose calls cost more.
CALL_OVERHEAD_TOKENS = 128


class QueueFull(Exception):
    """The request's priority level already holds `max_queue_size` requests."""


@dataclass(eq=False)
class _Request:
    """The parts of one request still queued (a request counts once in its level's bound)."""

    parts: int


@dataclass(eq=False)
class Pending(Generic[T]):
    """One queued entry (a request, or one part of it): its size in samples, the token length
    of its rows (0: not counted), batching key, payload, arrival time (clock seconds) and
    priority level; `timeout_s`/`deadline_s` are absolute clock times or None."""

    size: int
    key: Hashable
    payload: T
    arrival_s: float
    seq: int = field(repr=False)  # arrival order; breaks ties between equal clock readings
    tokens: int = 0
    request: _Request = field(default_factory=lambda: _Request(1), repr=False)
    level: int = 1
    timeout_s: float | None = None
    timeout_action: str = "reject"
    deadline_s: float | None = None
    delayed: bool = False  # timed out with action "delay": waits behind everything else
    queued: bool = field(default=True, repr=False)


@dataclass(eq=False)
class Batch(Generic[T]):
    """Requests dispatched together, in the order their results are laid out. `reason` says
    why it left the queue: "full", "preferred" (a preferred batch size was reached), "delay"
    (the deciding request waited long enough), "flush" (draining) or "unbatched" (the model
    does not batch)."""

    requests: list[Pending[T]]
    reason: str

    @property
    def size(self) -> int:
        """Samples in the batch."""
        return sum(r.size for r in self.requests)

    @property
    def sizes(self) -> list[int]:
        return [r.size for r in self.requests]

    @property
    def tokens(self) -> int:
        """Padded tokens: rows × the longest row's tokens (0 for entries without lengths)."""
        return self.size * max((r.tokens for r in self.requests), default=0)


@dataclass(eq=False)
class Expired(Generic[T]):
    """A request taken out of the queue unrun: `reason` is "timeout" (its queue policy's timeout
    with action reject) or "deadline" (its client's deadline)."""

    pending: Pending[T]
    reason: str


class Batcher(Generic[T]):
    """Queue of pending requests that forms batches by the module's rules."""

    def __init__(self, policy: BatchPolicy, clock: Clock = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        # Tier t < levels holds level t+1's requests; tier levels + t holds its delayed ones, so
        # delayed requests come after every request that has not timed out. Per tier, one FIFO
        # per key (an insertion-ordered dict, so that length grouping can take entries from
        # anywhere in it); a tier's oldest request is the oldest of its FIFO heads.
        self._tiers: list[dict[Hashable, dict[Pending[T], None]]] = [{} for _ in range(2 * policy.levels)]
        self._level_counts = [0] * (policy.levels + 1)
        self._timers: list[tuple[float, int, Pending[T]]] = []  # (when, seq, request): lazy heap
        self._expired: list[Expired[T]] = []
        self._seq = itertools.count()
        self._count = 0  # requests
        self._entries = 0  # queued entries (parts)

    def __len__(self) -> int:
        """Requests waiting (a request queued in parts counts once while any part waits)."""
        return self._count

    def queued(self, level: int | None = None) -> int:
        """Requests waiting, in one priority level or in all."""
        return self._count if level is None else self._level_counts[level]

    def add(self, size: int, key: Hashable, payload: T, *, tokens: int = 0, priority: int = 0, timeout_us: int = 0,
            deadline_s: float | None = None) -> Pending[T]:
        """Queue a request of `size` samples under `key`, each row `tokens` tokens long (0: not
        counted against `max_batch_tokens` nor grouped by length).

        `priority` picks the level (see `BatchPolicy.level`), `timeout_us` is the request's own
        queue timeout (0: none; applied as the level's policy allows), `deadline_s` an absolute
        clock time after which it must never run. Raises `ValueError` when it can never be
        dispatched (larger than `max_batch_size`, or not a positive size) and `QueueFull` when
        its level's queue is at `max_queue_size`.
        """
        return self.add_parts([(size, tokens, payload)], key, priority=priority, timeout_us=timeout_us,
                              deadline_s=deadline_s)[0]

    def add_parts(self, parts: Sequence[tuple[int, int, T]], key: Hashable, *, priority: int = 0,
                  timeout_us: int = 0, deadline_s: float | None = None) -> list[Pending[T]]:
        """Queue one request as `parts`, each `(size, tokens, payload)`, under `key`: they may
        run in different batches (the caller re-joins their results) and count as one request
        in the level's `max_queue_size`. Arguments and errors as `add`'s."""
        if not parts:
            raise ValueError("a request needs at least one part")
        for size, _, _ in parts:
            if size < 1:
                raise ValueError(f"request size must be >= 1, got {size}")
            if self.policy.max_batch_size and size > self.policy.max_batch_size:
                raise ValueError(f"request of {size} samples exceeds max_batch_size {self.policy.max_batch_size}")
        level = self.policy.level(priority)
        queue_policy = self.policy.policy(level)
        if queue_policy.max_queue_size and self._level_counts[level] >= queue_policy.max_queue_size:
            raise QueueFull(f"Exceeds maximum queue size ({queue_policy.max_queue_size} at priority level {level})")
        now = self._clock()
        timeout_us = queue_policy.timeout_us(timeout_us)
        request = _Request(len(parts))
        queue = self._tiers[level - 1].setdefault(key, {})
        added = []
        for size, tokens, payload in parts:
            pending = Pending(
                size=size, key=key, payload=payload, arrival_s=now, seq=next(self._seq), tokens=tokens,
                request=request, level=level, timeout_s=now + timeout_us / 1e6 if timeout_us else None,
                timeout_action=queue_policy.timeout_action, deadline_s=deadline_s,
            )
            queue[pending] = None
            for when in (pending.timeout_s, pending.deadline_s):
                if when is not None:
                    heapq.heappush(self._timers, (when, pending.seq, pending))
            added.append(pending)
        self._level_counts[level] += 1
        self._count += 1
        self._entries += len(parts)
        return added

    def remove(self, pending: Pending[T]) -> bool:
        """Take a request out of the queue (its client went away). False when it is no longer
        queued (already dispatched, expired or removed)."""
        if not pending.queued:
            return False
        self._unlink(pending)
        self._forget(pending)
        return True

    def drain(self) -> list[Pending[T]]:
        """Remove and return every queued request, oldest first (shutdown fails them)."""
        everything = sorted((p for tier in self._tiers for q in tier.values() for p in q), key=lambda p: p.seq)
        for pending in everything:
            pending.queued = False
        for tier in self._tiers:
            tier.clear()
        self._level_counts = [0] * len(self._level_counts)
        self._timers.clear()
        self._count = self._entries = 0
        return everything

    def expire(self) -> list[Expired[T]]:
        """Apply timeouts and deadlines that have passed and return the requests taken out of
        the queue unrun (deadline or rejecting timeout passed; also those `next_batch` found),
        oldest first. Requests whose delaying timeout passed move behind the others."""
        self._apply_timers()
        expired, self._expired = self._expired, []
        return sorted(expired, key=lambda e: e.pending.seq)

    def next_batch(self, *, flush: bool = False, idle: bool = False) -> Batch[T] | None:
        """The batch to run now, removed from the queue, or None when nothing is ready.
        Requests past their deadline or rejecting timeout are never in it (`expire` returns
        them). `flush=True` dispatches the deciding request's batch even if it could still
        grow (used while draining); `idle=True` says no batch of this model is running, so a
        lone request goes at once."""
        self._apply_timers()
        head = self._head()
        if head is None:
            return None
        if self.policy.max_batch_size == 0:
            return self._pop([head], "unbatched")
        members, full = self._gather(head)
        if full:
            return self._pop(members, "full")
        preferred = self._preferred(members)
        if preferred:
            return self._pop(members[:preferred], "preferred")
        if self._clock() - head.arrival_s >= self.policy.max_queue_delay_s:
            return self._pop(members, "delay")
        if idle and self._count == 1 and len(members) == self._entries:
            return self._pop(members, "idle")
        if flush:
            return self._pop(members, "flush")
        return None

    def wait_s(self, *, idle: bool = False) -> float | None:
        """Seconds until `next_batch` or `expire` has something to do if nothing else arrives:
        0 when a batch is ready (or an expired request waits to be collected) now, None when
        the queue is empty. `idle` as for `next_batch`."""
        if self._expired:
            return 0.0
        head = self._head()
        if head is None:
            return None
        if self.policy.max_batch_size == 0:
            return 0.0
        members, full = self._gather(head)
        if full or self._preferred(members) or (idle and self._count == 1 and len(members) == self._entries):
            return 0.0
        now = self._clock()
        wait = head.arrival_s + self.policy.max_queue_delay_s - now
        timer = self.next_timer_s()
        if timer is not None:
            wait = min(wait, timer - now)
        return max(0.0, wait)

    def next_timer_s(self) -> float | None:
        """Clock time of the earliest pending timeout or deadline, None when there is none."""
        while self._timers and not self._timers[0][2].queued:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    # -- internals ---------------------------------------------------------------------------
    def _apply_timers(self) -> None:
        now = self._clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, pending = heapq.heappop(self._timers)
            if not pending.queued:
                continue
            if pending.deadline_s is not None and pending.deadline_s <= now:
                self.remove(pending)
                self._expired.append(Expired(pending, "deadline"))
            elif pending.timeout_s is not None and pending.timeout_s <= now and not pending.delayed:
                if pending.timeout_action == "reject":
                    self.remove(pending)
                    self._expired.append(Expired(pending, "timeout"))
                else:
                    self._delay(pending)

    def _tier(self, pending: Pending[T]) -> int:
        return pending.level - 1 + (self.policy.levels if pending.delayed else 0)

    def _unlink(self, pending: Pending[T]) -> None:
        tier = self._tiers[self._tier(pending)]
        queue = tier[pending.key]
        del queue[pending]
        if not queue:
            del tier[pending.key]

    def _forget(self, pending: Pending[T]) -> None:
        pending.queued = False
        self._entries -= 1
        pending.request.parts -= 1
        if pending.request.parts == 0:
            self._level_counts[pending.level] -= 1
            self._count -= 1

    def _delay(self, pending: Pending[T]) -> None:
        self._unlink(pending)
        pending.delayed = True
        self._tiers[self._tier(pending)].setdefault(pending.key, {})[pending] = None

    def _head(self) -> Pending[T] | None:
        """The deciding request: the oldest of the first non-empty tier."""
        for tier in self._tiers:
            if tier:
                return min((next(iter(q)) for q in tier.values()), key=lambda p: p.seq)
        return None

    def _fits(self, rows: int, tokens: int) -> bool:
        """Whether `rows` rows padded to `tokens` tokens fit one batch."""
        budget = self.policy.max_batch_tokens
        return rows <= self.policy.max_batch_size and (not budget or rows * tokens <= budget)

    def _gather(self, head: Pending[T]) -> tuple[list[Pending[T]], bool]:
        """The entries that join `head`'s batch and whether the batch is full (something of
        its key is left out). From `head`'s tier, by length when its entries have lengths
        (see the module's rules), else in arrival order, stopping at the first that does not
        fit (a later, smaller request never overtakes it); then from later tiers, in arrival
        order, while they fit without lengthening the batch."""
        tiers = self._tiers[self._tier(head):]
        own = tiers[0][head.key]
        if head.tokens:
            members = self._by_length(head, own)
        else:
            members, rows = [], 0
            for pending in own:
                if rows + pending.size > self.policy.max_batch_size:
                    break
                members.append(pending)
                rows += pending.size
        full = len(members) < len(own)
        rows = sum(p.size for p in members)
        longest = max(p.tokens for p in members)
        for tier in tiers[1:]:
            for pending in tier.get(head.key, ()):
                if full or pending.tokens > longest or not self._fits(rows + pending.size, longest):
                    full = True
                    break
                members.append(pending)
                rows += pending.size
        return members, full or rows == self.policy.max_batch_size

    def _by_length(self, head: Pending[T], queue: Mapping[Pending[T], None]) -> list[Pending[T]]:
        """`head`'s batch from the first `lookahead` entries of `queue`: sorted by length, the
        run of neighbours around `head` that fits and computes the most useful tokens per
        token paid (see `CALL_OVERHEAD_TOKENS`), `head` first."""
        window = list(itertools.islice(queue, self.policy.lookahead))
        window.sort(key=lambda p: (p.tokens, p.seq))
        at = window.index(head)
        rows, useful = [0], [0]  # prefix sums: rows and tokens of window[:i]
        for pending in window:
            rows.append(rows[-1] + pending.size)
            useful.append(useful[-1] + pending.size * pending.tokens)
        best, best_score = (at, at), -1.0
        start = 0
        for end in range(at, len(window)):
            longest = window[end].tokens
            while start < at and not self._fits(rows[end + 1] - rows[start], longest):
                start += 1
            if not self._fits(rows[end + 1] - rows[at], longest):
                break  # even from `head` on, this run is too long; longer ends only grow it
            if rows[end] - rows[at] >= self.policy.max_batch_size:
                break  # a run this long cannot hold `head` any more
            # The longest run ending here, and shorter ones (down to `head`), halving.
            span = at - start
            while True:
                first = at - span
                count = rows[end + 1] - rows[first]
                score = (useful[end + 1] - useful[first]) / (count * longest + CALL_OVERHEAD_TOKENS)
                if score > best_score:
                    best, best_score = (first, end), score
                if span == 0:
                    break
                span //= 2
        run = window[best[0]:best[1] + 1]
        return [head, *(p for p in run if p is not head)]  # the head first: a preferred size's prefix holds it

    def _preferred(self, members: list[Pending[T]]) -> int:
        """How many of `members` (a prefix) make the largest preferred batch size; 0 if none."""
        if not self.policy.preferred_batch_sizes:
            return 0
        best, total = 0, 0
        for count, pending in enumerate(members, start=1):
            total += pending.size
            if total in self.policy.preferred_batch_sizes:
                best = count
        return best

    def _pop(self, members: list[Pending[T]], reason: str) -> Batch[T]:
        for pending in members:
            self._unlink(pending)
            self._forget(pending)
        return Batch(members, reason)
