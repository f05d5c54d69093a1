"""The batcher's policies: what one batch may hold and how each priority level's queue treats
its requests (Triton's dynamic batcher and `ModelQueuePolicy` settings, with a token budget).
Plain frozen dataclasses, checked when made; `server.config` builds them from a model's
`config.toml` and `server.batcher.Batcher` follows them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

TIMEOUT_ACTIONS = ("reject", "delay")


@dataclass(frozen=True)
class QueuePolicy:
    """How one priority level's queue treats its requests (Triton's `ModelQueuePolicy`).

    - `max_queue_size`: requests the level may hold; 0 is unbounded.
    - `default_timeout_us`: how long a request may wait in the queue; 0 is forever.
    - `allow_timeout_override`: whether a request's own `timeout` applies; it may only shorten
      the default (Triton's rule). kiln's default is True, so the `timeout` request parameter
      works out of the box; Triton's default is False.
    - `timeout_action`: "reject" answers a timed-out request UNAVAILABLE; "delay" lets it wait
      behind every request that has not timed out.
    """

    max_queue_size: int = 0
    default_timeout_us: int = 0
    allow_timeout_override: bool = True
    timeout_action: str = "reject"

    def __post_init__(self) -> None:
        if self.max_queue_size < 0:
            raise ValueError(f"max_queue_size must be >= 0, got {self.max_queue_size}")
        if self.default_timeout_us < 0:
            raise ValueError(f"default_timeout_us must be >= 0, got {self.default_timeout_us}")
        if self.timeout_action not in TIMEOUT_ACTIONS:
            raise ValueError(f"timeout_action must be one of {', '.join(TIMEOUT_ACTIONS)}, got {self.timeout_action!r}")

    def timeout_us(self, requested_us: int = 0) -> int:
        """The timeout of a request asking for `requested_us` (0: none asked): the default, or
        the request's when overriding is allowed and it is shorter (or there is no default)."""
        if self.allow_timeout_override and requested_us > 0:
            if self.default_timeout_us == 0 or requested_us < self.default_timeout_us:
                return requested_us
        return self.default_timeout_us


@dataclass(frozen=True)
class BatchPolicy:
    """What the batcher may form and how it queues.

    `max_batch_size` in samples (0: no batching); `max_batch_tokens` in padded tokens (rows ×
    the longest row's tokens; 0: no bound); `lookahead`: how many queued entries of a key length
    grouping looks at (0: 16 × `max_batch_size`); `max_queue_delay_us`: the longest the deciding
    request waits for company; `preferred_batch_sizes`: sizes dispatched as soon as they can be
    formed; `priority_levels` (0: one level) with `default_priority_level` for requests that
    name none (0: the lowest level); `queue_policy` for every level unless
    `priority_queue_policy` has an entry for it.
    """

    max_batch_size: int
    max_queue_delay_us: int = 0
    max_batch_tokens: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    priority_levels: int = 0
    default_priority_level: int = 0
    queue_policy: QueuePolicy = QueuePolicy()
    priority_queue_policy: Mapping[int, QueuePolicy] = field(default_factory=dict)
    lookahead: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise ValueError(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.max_batch_tokens < 0:
            raise ValueError(f"max_batch_tokens must be >= 0, got {self.max_batch_tokens}")
        if self.lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {self.lookahead}")
        if not self.lookahead:
            # Wide enough to sort many batches' worth of rows by length (how offline inference
            # gets its padding down: a run of 32 among 96 random lengths of 8..128 tokens pads
            # its rows by a third, among 512 by a tenth), narrow enough that sorting stays a
            # small cost per batch (512 entries: about 0.1 ms).
            object.__setattr__(self, "lookahead", 16 * max(1, self.max_batch_size))
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(set(self.preferred_batch_sizes))))
        for size in self.preferred_batch_sizes:
            if size < 1 or (self.max_batch_size and size > self.max_batch_size):
                raise ValueError(
                    f"preferred batch size {size} must be between 1 and max_batch_size {self.max_batch_size}")
        if self.priority_levels < 0:
            raise ValueError(f"priority_levels must be >= 0, got {self.priority_levels}")
        if not 0 <= self.default_priority_level <= self.levels:
            raise ValueError(
                f"default_priority_level must be between 1 and {self.levels}, got {self.default_priority_level}")
        for level in self.priority_queue_policy:
            if not 1 <= level <= self.levels:
                raise ValueError(f"priority_queue_policy level {level} is outside 1..{self.levels}")

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_us / 1e6

    @property
    def levels(self) -> int:
        """Number of priority levels (at least 1)."""
        return max(1, self.priority_levels)

    def level(self, priority: int = 0) -> int:
        """The level a request asking for `priority` lands in. 0, or a value outside
        1..levels, means the default level (Triton's rule)."""
        if 1 <= priority <= self.levels:
            return priority
        return self.default_priority_level or self.levels

    def policy(self, level: int) -> QueuePolicy:
        """The queue policy of priority `level`."""
        return self.priority_queue_policy.get(level, self.queue_policy)
