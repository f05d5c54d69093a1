"""Timing: CUDA events on GPU, `time.perf_counter` on CPU, warm-up and repeats.

Every latency in a profile is one of these marks subtracted from another; `Stopwatch.method`
names which, and the profile's `measures` says around what.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


class Stopwatch:
    """Marks taken around work. On CUDA a mark is a recorded event and durations are read
    after `sync()`; on CPU a mark is `perf_counter()` and durations are exact at once."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    @property
    def method(self) -> str:
        return "CUDA events" if self.cuda else "time.perf_counter"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds between two marks (on CUDA only after `sync()`)."""
        if self.cuda:
            return float(start.elapsed_time(end)) / 1e3
        return float(end - start)


def time_calls(fn: Callable[[], Any], repeats: int, cuda: bool) -> list[float]:
    """Run `fn` `repeats` times and return each call's duration in seconds. On CUDA the device
    is synchronized before and after each call, so a duration is one inference's latency, not a
    share of a pipelined stream."""
    watch = Stopwatch(cuda)
    marks = []
    for _ in range(repeats):
        watch.sync()
        start = watch.mark()
        fn()
        end = watch.mark()
        watch.sync()
        marks.append((start, end))
    return [watch.seconds(a, b) for a, b in marks]


def warm_up(fn: Callable[[], Any], times: int, cuda: bool) -> None:
    """Run `fn` `times` times untimed (allocator, caches, autotuning, lazy init)."""
    for _ in range(times):
        fn()
    Stopwatch(cuda).sync()


__all__ = ["Stopwatch", "time_calls", "warm_up"]
