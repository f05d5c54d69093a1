"""Static-shape copies of an OpenVINO engine's model, for the input shapes it keeps seeing.

OpenVINO's CPU plugin runs a model with dynamic dims through kernels prepared for any shape: it
infers shapes, plans memory and picks its blocking at run time. A copy reshaped to one static
shape and compiled for it does all of that once. Measured on all-MiniLM-L6-v2 in bf16 (2-core
Xeon with AMX, alternating in one process, identical outputs): 10% less time at 8 x 128 tokens,
15-20% less at 1 x 32; the projections and the fused attention are both faster.

Shapes repeat in practice: a batch job runs one shape per batch size, and the server pads text
to sequence buckets and forms batches of a few sizes. So the engine counts the shapes it runs,
and a shape seen `AFTER` times gets a static copy. The copy is compiled on a background thread
while calls keep running on the dynamic model, so no call waits for a compile. Each copy holds
its own weights in the inference precision (a MiniLM bf16 copy took 35-55 MB of resident
memory), so at most `capacity` are kept: the engine's `max_static_shapes`, fewer for a model
whose copies would exceed its `static_shapes_memory_mb`. When every slot is taken, a new shape
takes the least-used copy's slot only once it has been seen twice as often. Counts are halved
every `AGE_EVERY` calls, so the hot set can change, but a spread of shapes never makes the
engine compile without end. A server's warm-up (`prepare`) compiles the shapes it names at
load instead, before any request.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

# A shape's identity: (input name, shape) for each input, in name order.
ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]

AFTER = 2  # calls at a shape before a static copy is compiled (one call is not a pattern)
AGE_EVERY = 1024  # calls between halvings of the counts


class StaticShapes:
    """Static copies of one model, by input shape. A key is a `shape_key`, or one with more in
    it (the engine adds how the call runs). `compile(key)` returns what a call runs; it runs on
    a background thread. `capacity` 0 turns specialization off."""

    def __init__(self, compile: Callable[[Any], Any], capacity: int) -> None:
        self._compile = compile
        self.capacity = capacity
        self._seen: Counter[Hashable] = Counter()
        self._calls = 0
        self._ready: dict[Hashable, Any] = {}
        self._failed: set[Hashable] = set()
        self._pending: Future | None = None
        self._executor: ThreadPoolExecutor | None = None  # made on first use: engines may be forked
        self._lock = threading.Lock()

    def lookup(self, key: Hashable) -> Any | None:
        """The static copy for `key` if one is ready, else None (the caller runs the dynamic
        model). Counts the call, and starts compiling a copy for `key` when it has earned one."""
        if self.capacity <= 0:
            return None
        with self._lock:
            self._count(key)
            found = self._ready.get(key)
            if found is None and self._pending is None and self._earned(key):
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-openvino-shapes")
                self._pending = self._executor.submit(self._build, key)
            return found

    def prepare(self, key: Hashable) -> bool:
        """Compile the static copy for `key` now, on the calling thread, when a slot is free:
        a warm-up before serving, so that the first call at that shape already runs on it.
        Never takes another shape's slot (a warm-up names more shapes than fit: the first ones
        win). The shape counts as seen `AFTER` times, so traffic can still replace it. Returns
        whether `key` has a copy."""
        if self.capacity <= 0:
            return False
        self.wait()
        with self._lock:
            if key in self._ready:
                return True
            if key in self._failed or len(self._ready) >= self.capacity:
                return False
            self._seen[key] = max(self._seen[key], AFTER)
        self._build(key)  # a shape that cannot be made static is logged and recorded as failed
        with self._lock:
            return key in self._ready

    def wait(self) -> None:
        """Block until the compile in flight, if any, has finished (tests; a warm-up that wants
        its copy before timing)."""
        with self._lock:
            pending = self._pending
        if pending is not None:
            pending.result()

    @property
    def shapes(self) -> list[Hashable]:
        """The shapes that have a static copy now."""
        with self._lock:
            return list(self._ready)

    def _count(self, key: Hashable) -> None:
        self._seen[key] += 1
        self._calls += 1
        if self._calls % AGE_EVERY == 0:
            self._seen = Counter({k: n // 2 for k, n in self._seen.items() if n // 2 or k in self._ready})

    def _earned(self, key: Hashable) -> bool:
        count = self._seen[key]
        if count < AFTER or key in self._failed:
            return False
        if len(self._ready) < self.capacity:
            return True
        return count >= 2 * self._seen[self._coldest()]

    def _coldest(self) -> Hashable:
        return min(self._ready, key=lambda k: self._seen[k])

    def _build(self, key: Hashable) -> None:
        try:
            built = self._compile(key)
        except Exception as exc:  # a shape OpenVINO cannot make static keeps the dynamic model
            log.warning("OpenVINO could not compile a static copy for %s; that shape stays dynamic: %s",
                        key, _reason(exc))
            with self._lock:
                self._failed.add(key)
                self._pending = None
            return
        with self._lock:
            if len(self._ready) >= self.capacity:
                del self._ready[self._coldest()]
            self._ready[key] = built
            self._pending = None


def _reason(exc: Exception) -> str:
    """The informative line of an exception: OpenVINO's start with "Exception from <file>"."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith("Exception from")]
    return (useful or lines or [type(exc).__name__])[0]


def shape_key(feeds: dict[str, Any]) -> ShapeKey:
    """The key of a call's inputs (arrays with a `.shape`)."""
    return tuple((name, tuple(int(d) for d in feeds[name].shape)) for name in sorted(feeds))


__all__ = ["StaticShapes", "ShapeKey", "shape_key", "AFTER", "AGE_EVERY"]
