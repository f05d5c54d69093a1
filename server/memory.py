"""Giving a retired engine's memory back to the operating system.

glibc's malloc keeps memory freed by the program in its heaps for reuse and returns only the
top of the main heap on its own; after the first large free it also stops serving big blocks
with mmap (its dynamic mmap threshold rises), so an engine's weights and session buffers land
in those heaps. Measured with MiniLM under ONNX Runtime, 20 reloads under traffic: once replaced
engines were really freed, the process still settled about 100 MB (23%) above its size after
the first load (475 → 585 MB); `malloc_trim(0)` after each freed engine brought it back to
480 MB. A trim walks the free lists of every arena (about 30 ms here), so it runs in a thread,
once per engine, never per request.

Python's cyclic garbage collector is the other half. A server process holds some 200 000
container objects after start-up (torch, OpenVINO, protobuf and the engines' Python objects),
and every full collection walks them all: measured under HTTP load on 2 busy cores, 50-250 ms
each (every request in flight waits), 0.7 s of a 12 s run, a quarter of the event loop's busy
time and more than all its JSON encoding. The objects alive once the server has started live as
long as the process, so `freeze_heap` moves them out of the collector's sight (`gc.freeze`);
collections then walk only what requests allocate. A retired engine's objects were frozen with
the rest: `refreeze_heap` makes them collectable again once it is drained.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import weakref
from collections.abc import Callable


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (AttributeError, OSError, TypeError):  # not glibc (musl, macOS, Windows)
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_free_heap() -> bool:
    """Return the C heap's free pages to the operating system (glibc's `malloc_trim(0)`).
    False where the C library has no such call; nothing to do there."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def release_heap_when_freed(obj: object, loop: asyncio.AbstractEventLoop) -> None:
    """Once `obj` (a retired engine) is freed, run `release_free_heap` in a thread of `loop`.

    The weakref callback runs while `obj` is being torn down, before its attributes (the
    engine's session and weights) are released, so it only schedules the trim on the loop,
    which runs it after the teardown is done.
    """

    def freed() -> None:
        try:
            loop.call_soon_threadsafe(_trim_in_thread, loop)
        except RuntimeError:  # the loop is closed: the process is ending anyway
            pass

    weakref.finalize(obj, freed)


def _trim_in_thread(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_in_executor(None, release_free_heap)
    except RuntimeError:  # the loop's default executor is shut down: the server has stopped
        pass


def freeze_heap() -> None:
    """Collect what start-up left behind, then exempt every object alive now from the cyclic
    collector (`gc.freeze`). Call once the server serves; objects made later are collected as
    usual."""
    gc.collect()
    gc.freeze()


def refreeze_heap() -> None:
    """After a model is retired: give the frozen objects back to the collector, collect (so a
    retired engine held only by reference cycles is freed) and freeze the survivors again. A
    no-op unless `freeze_heap` ran (tests and embedders that never freeze keep Python's
    defaults). One full collection, a few hundred milliseconds at most, once per reload."""
    if not gc.get_freeze_count():
        return
    gc.unfreeze()
    gc.collect()
    gc.freeze()
