"""The asyncio driver around one model's `Batcher`: instance workers that take batches, run the
engine in a thread, and answer each request with its slice of the outputs.

Guarantee: every accepted request is answered or failed explicitly — engine failure → the
batch's requests fail with `Internal`; shutdown past its grace period → `Unavailable`. A
request whose client has gone (its task cancelled) is taken out of the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from server.batcher import Batch, Batcher, BatchPolicy, Clock, batch_key, concatenate, split
from server.errors import Internal, Unavailable
from server.repository import Model

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]


@dataclass(eq=False)
class Work:
    """What the batcher carries for one request."""

    inputs: Tensors
    future: asyncio.Future[Tensors]
    request_id: str


class ModelScheduler:
    """Queue, batcher and `instances` workers of one model.

    `infer` may be called from many coroutines at once; `engine.run` executes in a thread pool
    with one thread per instance (the Engine API promises it is thread-safe), so the event
    loop stays free while the engine computes.
    """

    def __init__(self, model: Model, clock: Clock = time.monotonic) -> None:
        self.model = model
        self.batcher: Batcher[Work] = Batcher(
            BatchPolicy(model.max_batch_size, model.config.max_queue_delay_us), clock=clock
        )
        self._instances = model.config.instances
        self._executor: ThreadPoolExecutor | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._started = False

    @property
    def accepting(self) -> bool:
        """True between `start` and `stop`."""
        return self._started and not self._closing

    async def start(self) -> None:
        """Start the instance workers on the running loop."""
        if self._started:
            return
        self._started = True
        self._executor = ThreadPoolExecutor(self._instances, thread_name_prefix=f"kiln-{self.model.name}")
        self._workers = [
            asyncio.create_task(self._worker(i), name=f"{self.model.name}-instance-{i}") for i in range(self._instances)
        ]

    async def infer(self, inputs: Tensors, size: int, request_id: str = "") -> Tensors:
        """Queue one validated request of `size` samples and return its outputs.

        Raises `Unavailable` when the scheduler is not accepting requests, `Internal` when the
        engine fails on the request's batch.
        """
        if not self.accepting:
            raise Unavailable(f"model '{self.model.name}' is not accepting requests: the server is shutting down")
        loop = asyncio.get_running_loop()
        work = Work(inputs, loop.create_future(), request_id)
        pending = self.batcher.add(size, batch_key(inputs), work)
        self._wakeup.set()
        try:
            return await work.future
        except asyncio.CancelledError:
            # The client went away (or the RPC was cancelled): do not run it if it still waits.
            self.batcher.remove(pending)
            raise

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, let the workers finish everything queued and running (partial
        batches go at once, without waiting for their delay), and after `grace_s` seconds fail
        whatever is left with `Unavailable`."""
        if not self._started or self._closing:
            return
        self._closing = True
        self._wakeup.set()
        _, late = await asyncio.wait(self._workers, timeout=grace_s)
        if late:
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)  # running batches fail as they unwind
            leftovers = [p.payload for p in self.batcher.drain()]
            _fail(leftovers, self._shutdown_error())
            log.warning("model '%s': %d request(s) failed at shutdown after the %.1f s grace period",
                        self.model.name, len(leftovers), grace_s, extra={"model": self.model.name})
        if self._executor is not None:
            # A run that outlived the grace period keeps its thread; nothing waits for it.
            self._executor.shutdown(wait=not late, cancel_futures=True)

    async def _worker(self, index: int) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            await self._execute(batch, index)

    async def _next_batch(self) -> Batch[Work] | None:
        """The next batch to run, waiting for arrivals or for the oldest request's delay; None
        once the scheduler is closing and the queue is empty."""
        while True:
            batch = self.batcher.next_batch(flush=self._closing)
            if batch is not None:
                return batch
            if self._closing:
                return None
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):  # the oldest request's delay is up
                await asyncio.wait_for(self._wakeup.wait(), timeout=self.batcher.wait_s())

    async def _execute(self, batch: Batch[Work], index: int) -> None:
        # Requests cancelled after dispatch are dropped here rather than computed.
        members = [p for p in batch.requests if not p.payload.future.done()]
        if not members:
            return
        works = [p.payload for p in members]
        started = time.perf_counter()
        try:
            inputs = concatenate([w.inputs for w in works])
            loop = asyncio.get_running_loop()
            outputs = await loop.run_in_executor(self._executor, self.model.engine.run, inputs)
            parts = split(outputs, [p.size for p in members]) if self.model.max_batch_size else [outputs]
        except Exception as exc:  # the engine's failure is the batch's answer, never a lost request
            log.error("model '%s' instance %d failed on a batch of %d request(s)", self.model.name, index, len(works),
                      exc_info=exc, extra={"model": self.model.name, "request_ids": [w.request_id for w in works]})
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # status details are one line
            _fail(works, Internal(f"model '{self.model.name}' failed: {reason}"))
        except asyncio.CancelledError:  # shutdown's grace period ran out while the engine ran
            _fail(works, self._shutdown_error())
            raise
        else:
            for work, part in zip(works, parts, strict=True):
                if not work.future.done():
                    work.future.set_result(part)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("model '%s' instance %d ran a batch of %d sample(s) from %d request(s) (%s) in %.2f ms",
                          self.model.name, index, sum(p.size for p in members), len(works), batch.reason,
                          (time.perf_counter() - started) * 1e3, extra={"model": self.model.name})

    def _shutdown_error(self) -> Unavailable:
        return Unavailable(f"model '{self.model.name}': the server shut down before the request finished")


def _fail(works: list[Work], error: Exception) -> None:
    for work in works:
        if not work.future.done():
            work.future.set_exception(error)
