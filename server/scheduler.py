"""The asyncio driver around one model's `Batcher`: instance workers that take batches, run the
engine in a thread, and answer each request with its part of the outputs.

Guarantees: every accepted request is answered or failed explicitly — engine failure → the
batch's requests fail with `Internal`; queue timeout → `Rejected` ("Request timeout expired");
deadline passed → `DeadlineExceeded`; shutdown past its grace period → `Unavailable`. A request
whose client has gone (its task cancelled) is taken out of the queue and never runs; one whose
timeout or deadline passed never runs either. With `preserve_ordering`, answers are released in
arrival order.

A request may run in parts (`server.batcher.Batcher.add_parts`): a text request one text per
part, so the batcher can group texts of similar length across requests; a request of tokens
whose rows exceed `max_batch_tokens` in slices that fit. Its answer is the parts' results
joined in order (`server.layout.join`) once the last part has run; if one part fails, the
request fails and its other parts are taken out of the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server import layout as layouts
from server.batcher import Batch, Batcher, Clock, Expired, Pending, QueueFull
from server.ordering import InOrder
from server.errors import DeadlineExceeded, Internal, Rejected, Unavailable
from server.layout import Layout
from server.repository import Model
from server.stats import ModelStats, Timings

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
# Tasks whose text answers are made from the engine's token-axis outputs (entities from per-token
# logits, ...): their requests' texts stay together, padded as one block, so those outputs are
# what the engine computed for every position.
TOKEN_LEVEL_TASKS = ("token-classification", "fill-mask", "causal-lm")


@dataclass(eq=False)
class Work:
    """One request: where its answer goes, and its parts' results as they come in."""

    layout: Layout
    future: asyncio.Future[Tensors]
    request_id: str
    timings: Timings
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    ticket: int = -1  # arrival order, for preserve_ordering
    settled: bool = False
    results: list[Tensors | None] = field(default_factory=list)
    pending: list[Pending[Part]] = field(default_factory=list)
    dispatched: bool = False
    reads_token_outputs: bool = True  # False: its answer reads no token-axis output (see `_by_text`)


@dataclass(eq=False)
class Part:
    """What the batcher carries: the rows of one request (`index`-th part of `work`)."""

    work: Work
    index: int
    inputs: Mapping[str, np.ndarray]


class ModelScheduler:
    """Queue, batcher and `instances` workers of one model.

    `infer` may be called from many coroutines at once; `engine.run` executes in a thread pool
    with one thread per instance (the Engine API promises it is thread-safe), so the event
    loop stays free while the engine computes.
    """

    def __init__(self, model: Model, clock: Clock = time.monotonic) -> None:
        self.model = model
        self.stats = ModelStats(model.name, model.version)
        self.batcher: Batcher[Part] = Batcher(model.config.batch_policy(), clock=clock)
        self._max_batch_tokens = model.config.max_batch_tokens
        self._running = 0  # batches executing now (the model is idle at 0)
        self._clock = clock
        self._in_order: InOrder[tuple[Work, Tensors | None, BaseException | None]] | None = (
            InOrder() if model.config.preserve_ordering else None
        )
        self._instances = model.config.instances
        self._inline = InlinePolicy(model.config.inline_below_us)
        self._executor: ThreadPoolExecutor | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._timer_task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._timer_wakeup = asyncio.Event()
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
        self._timer_task = asyncio.create_task(self._watch_timeouts(), name=f"{self.model.name}-timeouts")

    async def infer(self, inputs: Mapping[str, np.ndarray], size: int, request_id: str = "", *, text: bool = False,
                    outputs: Sequence[str] | None = None, priority: int = 0, timeout_us: int = 0,
                    deadline_in_s: float | None = None, timings: Timings | None = None) -> Tensors:
        """Queue one validated request of `size` samples and return its outputs.

        `text` marks a request of texts, already tokenized by the engine's pipeline (it batches
        with other texts through the model's `text_layout`), `outputs` the outputs it asks for
        (None: all; its texts are queued one by one unless one of them, or its task's answer,
        needs the engine's token-axis outputs); `priority` and `timeout_us` are
        the request's parameters (0: none); `deadline_in_s` is the time its client still waits
        (None: forever). `timings`, when given, receives where the time went.

        Raises `Unavailable` when the scheduler is not accepting requests, `Rejected` when the
        queue is full or the request timed out in it, `DeadlineExceeded` when its deadline
        passed before it could run, `Internal` when the engine fails on its batch.
        """
        if not self.accepting:
            raise Unavailable(f"model '{self.model.name}' is not accepting requests: the server is shutting down")
        layout = self.model.text_layout if text else self.model.layout
        assert layout is not None, "text requests are only queued for models with a text input"
        loop = asyncio.get_running_loop()
        work = Work(layout, loop.create_future(), request_id, timings or Timings())
        work.reads_token_outputs = not (text and self._by_text(outputs))
        deadline_s = self._clock() + deadline_in_s if deadline_in_s is not None else None
        parts = self._parts(inputs, size, text, outputs)
        work.results = [None] * len(parts)
        try:
            work.pending = self.batcher.add_parts(
                [(rows, tokens, Part(work, index, part)) for index, (part, rows, tokens) in enumerate(parts)],
                layout.key(inputs), priority=priority, timeout_us=timeout_us, deadline_s=deadline_s)
        except QueueFull as exc:
            raise Rejected(f"{exc} for model '{self.model.name}'") from None
        if self._in_order is not None:
            work.ticket = self._in_order.admit()
        self._wakeup.set()
        if work.pending[0].timeout_s is not None or work.pending[0].deadline_s is not None:
            self._timer_wakeup.set()
        try:
            return await work.future
        except asyncio.CancelledError:
            # The client went away (or the RPC was cancelled): do not run it if it still waits,
            # and do not let it hold back the answers of later requests.
            self._settle(work, None, None)
            raise

    def _parts(self, inputs: Mapping[str, np.ndarray], size: int, text: bool,
               outputs: Sequence[str] | None = None) -> list[tuple[Mapping[str, np.ndarray], int, int]]:
        """How a request is queued: `(inputs, rows, tokens per row)` per part. Texts as the text
        layout splits them (one per part, grouped by length in the batcher); a request of tokens
        whole, or — when the model has a token budget and the request's rows exceed it — in
        slices that fit it."""
        if text:
            assert self.model.text_layout is not None
            return self.model.text_layout.split(  # type: ignore[attr-defined]
                inputs, self._max_batch_tokens, by_text=self._by_text(outputs))
        if not self._max_batch_tokens or not self.model.max_batch_size:
            return [(inputs, size, 0)]
        tokens = layouts.token_length(inputs)
        if not tokens:
            return [(inputs, size, 0)]
        rows = max(1, self._max_batch_tokens // tokens)
        return [(part, int(next(iter(part.values())).shape[0]), tokens) for part in layouts.slices(inputs, rows)]

    def _by_text(self, outputs: Sequence[str] | None) -> bool:
        """Whether a text request asking for `outputs` (None: all) is queued text by text: its
        answer reads no token-axis output (pooled embeddings, labels, pair scores), and its
        task's answer needs none."""
        assert self.model.text_layout is not None
        token_outputs = set(self.model.text_layout.output_axes)  # type: ignore[attr-defined]
        asked = token_outputs if outputs is None else set(outputs)
        return self.model.task not in TOKEN_LEVEL_TASKS and not asked & token_outputs

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
        self._fail_expired()
        leftovers = list(dict.fromkeys(p.payload.work for p in self.batcher.drain()))
        for work in leftovers:
            self._settle(work, None, self._shutdown_error())
        if leftovers:
            log.warning("model '%s': %d request(s) failed at shutdown after the %.1f s grace period",
                        self.model.name, len(leftovers), grace_s, extra={"model": self.model.name})
        if self._timer_task is not None:
            self._timer_task.cancel()
            await asyncio.gather(self._timer_task, return_exceptions=True)
        if self._executor is not None:
            # A run that outlived the grace period keeps its thread; nothing waits for it.
            self._executor.shutdown(wait=not late, cancel_futures=True)
        # A cancelled task keeps its CancelledError, whose traceback holds the task's last frame,
        # whose `self` is this scheduler: a reference cycle that only Python's cyclic GC frees,
        # and it runs rarely in a process this large. Until then the scheduler kept its model's
        # engine alive (about 100 MB for MiniLM under ONNX Runtime), so every reload grew the
        # process (measured: +50-100 MB per reload). Dropping the tasks breaks the cycle, and the
        # engine is freed as soon as the last request that used it is answered.
        self._workers = []
        self._timer_task = None

    # -- workers -----------------------------------------------------------------------------
    async def _worker(self, index: int) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            await self._execute(batch, index)

    async def _next_batch(self) -> Batch[Part] | None:
        """The next batch to run, waiting for arrivals or for the deciding request's delay (not
        for a lone request while no batch runs); None once the scheduler is closing and the
        queue is empty."""
        while True:
            batch = self.batcher.next_batch(flush=self._closing, idle=self._running == 0)
            self._fail_expired()
            if batch is not None:
                return batch
            if self._closing and not len(self.batcher):
                return None
            self._wakeup.clear()
            # asyncio.timeout, not wait_for: no task per wait (this loop runs once per batch).
            with contextlib.suppress(TimeoutError):  # the deciding request's delay is up
                async with asyncio.timeout(self.batcher.wait_s(idle=self._running == 0)):
                    await self._wakeup.wait()

    async def _watch_timeouts(self) -> None:
        """Answer requests whose timeout or deadline passes while every instance is busy (idle
        workers find them on their own)."""
        while True:
            self._timer_wakeup.clear()
            when = self.batcher.next_timer_s()
            timeout = None if when is None else max(0.0, when - self._clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._timer_wakeup.wait()
            self._fail_expired()

    def _fail_expired(self) -> None:
        for expired in self.batcher.expire():
            self._settle(expired.pending.payload.work, None, self._expired_error(expired))

    def _expired_error(self, expired: Expired[Part]) -> Exception:
        if expired.reason == "timeout":
            return Rejected(f"Request timeout expired: model '{self.model.name}' did not start the request in time")
        return DeadlineExceeded(f"deadline exceeded before model '{self.model.name}' could run the request")

    async def _execute(self, batch: Batch[Part], index: int) -> None:
        # Requests cancelled (or failed) after dispatch are dropped here rather than computed.
        members = [p.payload for p in batch.requests if not p.payload.work.future.done()]
        if not members:
            return
        works = list(dict.fromkeys(part.work for part in members))  # each request once, in batch order
        dispatched = time.perf_counter_ns()
        for work in works:
            if not work.dispatched:  # its queue time ends when its first part runs
                work.dispatched = True
                work.timings.queue_ns = dispatched - work.enqueued_ns
        samples = sum(p.size for p in batch.requests if not p.payload.work.future.done())
        self._running += 1
        try:
            if self._inline.inline:
                results, durations = self._run_batch(members)
            else:
                loop = asyncio.get_running_loop()
                results, durations = await loop.run_in_executor(self._executor, self._run_batch, members)
        except Exception as exc:  # the engine's failure is the batch's answer, never a lost request
            log.error("model '%s' instance %d failed on a batch of %d request(s)", self.model.name, index, len(works),
                      exc_info=exc, extra={"model": self.model.name, "request_ids": [w.request_id for w in works]})
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # status details are one line
            for work in works:
                self._settle(work, None, Internal(f"model '{self.model.name}' failed: {reason}"))
        except asyncio.CancelledError:  # shutdown's grace period ran out while the engine ran
            for work in works:
                self._settle(work, None, self._shutdown_error())
            raise
        else:
            self._inline.observe(sum(durations))
            self.stats.record_execution(samples, *durations)
            input_ns, infer_ns, output_ns = durations
            for work in works:
                # added to what the service counted before queueing (tokenization) and after
                work.timings.compute_input_ns += input_ns
                work.timings.compute_infer_ns += infer_ns
                work.timings.compute_output_ns += output_ns
            for part, result in zip(members, results, strict=True):
                self._deliver(part, result)
            if log.isEnabledFor(logging.DEBUG):
                shapes = [list(next(iter(p.inputs.values())).shape) for p in members]
                log.debug("model '%s' instance %d ran a batch of %d sample(s) from %d request(s) (%s) in %.2f ms",
                          self.model.name, index, samples, len(works), batch.reason, sum(durations) / 1e6,
                          extra={"model": self.model.name, "request_ids": [w.request_id for w in works],
                                 "shapes": shapes})
        finally:
            self._running -= 1

    def _deliver(self, part: Part, result: Tensors) -> None:
        """Keep one part's result; answer its request once every part has run."""
        work = part.work
        if work.settled:  # failed, or its client went away, while this part ran
            return
        work.results[part.index] = result
        if all(r is not None for r in work.results):
            self._settle(work, layouts.join(work.results), None)  # type: ignore[arg-type]

    def _run_batch(self, parts: list[Part]) -> tuple[list[Tensors], tuple[int, int, int]]:
        """In an instance thread: assemble, run, disassemble; with the time each took (ns)."""
        layout = parts[0].work.layout  # one key, so one layout, per batch
        t0 = time.perf_counter_ns()
        inputs, plan = layout.assemble([p.inputs for p in parts])
        t1 = time.perf_counter_ns()
        outputs = layout.execute(self.model.engine, inputs)
        if not any(p.work.reads_token_outputs for p in parts):
            # Nobody reads them (MiniLM's last_hidden_state: 6 MB a batch of 32 x 128, split per
            # text and padded again per request): dropped before they are.
            unread = getattr(layout, "output_axes", ())
            outputs = {name: array for name, array in outputs.items() if name not in unread}
        t2 = time.perf_counter_ns()
        parts = layout.disassemble(outputs, plan)
        t3 = time.perf_counter_ns()
        return parts, (t1 - t0, t2 - t1, t3 - t2)

    def _settle(self, work: Work, result: Tensors | None, error: BaseException | None) -> None:
        """Answer `work` (result or error; neither when its client went away), in arrival order
        when the model preserves ordering."""
        if work.settled:
            return
        work.settled = True
        for pending in work.pending:  # parts still queued never run (no-op for those that ran)
            self.batcher.remove(pending)
        work.results = []
        if self._in_order is None or work.ticket < 0:
            _resolve(work, result, error)
            return
        answer = None if result is None and error is None else (work, result, error)
        for ready, ready_result, ready_error in self._in_order.finish(work.ticket, answer):
            _resolve(ready, ready_result, ready_error)

    def _shutdown_error(self) -> Unavailable:
        return Unavailable(f"model '{self.model.name}': the server shut down before the request finished")


class InlinePolicy:
    """Whether to run the next batch on the event loop instead of an instance thread.

    Handing a batch to a thread and its result back costs tens of microseconds of wake-ups and
    GIL hand-offs — more than a tiny engine computes (measured here: the identity model served
    at about 2x the throughput inline). So batches run inline while the moving average of recent
    batches' time (assemble + run + disassemble) stays under `below_us`; the first `WARMUP`
    batches always run in threads, to measure. 0 turns inline execution off. An inline batch
    blocks the event loop for its duration, which the threshold bounds on average.
    """

    WARMUP = 8
    _WEIGHT = 0.2  # of the newest batch in the moving average

    def __init__(self, below_us: int) -> None:
        self.below_ns = below_us * 1000
        self.average_ns = 0.0
        self._seen = 0

    @property
    def inline(self) -> bool:
        return bool(self.below_ns) and self._seen >= self.WARMUP and self.average_ns < self.below_ns

    def observe(self, batch_ns: int) -> None:
        self._seen += 1
        if self._seen == 1:
            self.average_ns = batch_ns
        else:
            self.average_ns = (1 - self._WEIGHT) * self.average_ns + self._WEIGHT * batch_ns


def _resolve(work: Work, result: Any, error: BaseException | None) -> None:
    if work.future.done():
        return
    if error is not None:
        work.future.set_exception(error)
    elif result is not None:
        work.future.set_result(result)
