"""The asyncio driver: real batches from concurrent requests, results split back per request,
failures and shutdown answered explicitly, cancelled requests dropped. No sockets."""

from __future__ import annotations

import asyncio
import gc
import weakref

import numpy as np
import pytest

from server.config import ModelConfig
from server.errors import DeadlineExceeded, Internal, Rejected, Unavailable
from server.repository import Model
from server.scheduler import ModelScheduler
from server.stats import Timings
from tests.server.fakes import FakeEngine, FakeTextEngine, SlowOnZeroEngine, expected_features


def request(first_id: int, batch: int = 1, seq: int = 4) -> dict[str, np.ndarray]:
    ids = (np.arange(batch * seq, dtype=np.int64).reshape(batch, seq) + first_id) % 100
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def scheduler_for(engine: FakeEngine, **config) -> ModelScheduler:  # type: ignore[no-untyped-def]
    return ModelScheduler(Model(name="fake", version=1, engine=engine, config=ModelConfig.from_dict(config)))


def run(coro, timeout_s: float = 20.0):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows_back():
    engine = FakeEngine(delay_s=0.05)
    scheduler = scheduler_for(engine, max_batch_size=8, max_queue_delay_us=20_000)
    requests = [request(7 * i, batch=1 + i % 3) for i in range(12)]

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        results = await asyncio.gather(*(scheduler.infer(r, len(r["input_ids"])) for r in requests))
        await scheduler.stop(grace_s=5)
        return results

    results = run(main())
    for r, out in zip(requests, results, strict=True):
        np.testing.assert_array_equal(out["features"], expected_features(r["input_ids"], r["attention_mask"]))
        np.testing.assert_array_equal(out["lengths"], [4] * len(r["input_ids"]))
    assert sum(engine.calls) == sum(len(r["input_ids"]) for r in requests)
    assert max(engine.calls) > 1, f"no batch was formed: {engine.calls}"
    assert max(engine.calls) <= 8


def test_requests_of_different_sequence_lengths_run_in_separate_batches():
    engine = FakeEngine()
    scheduler = scheduler_for(engine, max_batch_size=8, max_queue_delay_us=50_000)
    short, long = request(1, seq=3), request(2, seq=9)

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        results = await asyncio.gather(*(scheduler.infer(r, 1) for r in (short, long, short, long)))
        await scheduler.stop(grace_s=5)
        return results

    results = run(main())
    assert sorted(engine.calls) == [2, 2]
    np.testing.assert_array_equal(results[1]["features"], expected_features(long["input_ids"], long["attention_mask"]))


def test_an_engine_failure_fails_the_batch_with_internal_and_the_model_keeps_serving():
    engine = FakeEngine()
    scheduler = scheduler_for(engine, max_batch_size=8, max_queue_delay_us=20_000)

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        engine.fail_with = RuntimeError("out of memory")
        failed = await asyncio.gather(*(scheduler.infer(request(i), 1) for i in range(3)), return_exceptions=True)
        engine.fail_with = None
        ok = await scheduler.infer(request(5), 1)
        await scheduler.stop(grace_s=5)
        return failed, ok

    failed, ok = run(main())
    assert all(isinstance(e, Internal) and "model 'fake' failed: out of memory" in str(e) for e in failed)
    assert ok["features"].shape == (1, 4)


def test_stop_runs_everything_queued_without_waiting_for_the_batch_delay():
    engine = FakeEngine()
    scheduler = scheduler_for(engine, max_batch_size=8, max_queue_delay_us=30_000_000)  # 30 s delay

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        tasks = [asyncio.create_task(scheduler.infer(request(i), 1)) for i in range(3)]
        await asyncio.sleep(0.05)
        assert len(scheduler.batcher) == 3  # waiting for company
        loop = asyncio.get_running_loop()
        started = loop.time()
        await scheduler.stop(grace_s=10)
        return await asyncio.gather(*tasks), loop.time() - started

    results, stop_s = run(main())
    assert len(results) == 3 and stop_s < 5
    assert engine.calls == [3]


def test_requests_still_unfinished_after_the_grace_period_fail_with_unavailable():
    engine = FakeEngine(delay_s=1.0)
    scheduler = scheduler_for(engine, max_batch_size=1, max_queue_delay_us=0)

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        tasks = [asyncio.create_task(scheduler.infer(request(i), 1)) for i in range(3)]
        await asyncio.sleep(0.1)  # the first is running, two are queued
        await scheduler.stop(grace_s=0.2)
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = run(main())
    assert all(isinstance(r, Unavailable) and "shut down before the request finished" in str(r) for r in results)


def test_a_stopped_scheduler_refuses_new_requests_with_unavailable():
    scheduler = scheduler_for(FakeEngine(), max_batch_size=8)

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        await scheduler.stop(grace_s=1)
        await scheduler.infer(request(1), 1)

    with pytest.raises(Unavailable, match="shutting down"):
        run(main())


def test_a_cancelled_request_leaves_the_queue_and_never_runs():
    engine = FakeEngine()
    scheduler = scheduler_for(engine, max_batch_size=8, max_queue_delay_us=30_000_000)

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        # Two requests, so they wait for company (a lone one on an idle model would go at once).
        tasks = [asyncio.create_task(scheduler.infer(request(i), 1)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        assert len(scheduler.batcher) == 2
        for queued, task in enumerate(tasks):
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert len(scheduler.batcher) == 1 - queued
        await scheduler.stop(grace_s=1)

    run(main())
    assert engine.calls == []


def test_instances_run_batches_concurrently():
    engine = FakeEngine(delay_s=0.2)
    scheduler = scheduler_for(engine, max_batch_size=1, instances=2)

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        await asyncio.gather(*(scheduler.infer(request(i), 1) for i in range(4)))
        await scheduler.stop(grace_s=5)

    run(main())
    assert engine.max_running == 2


def test_a_model_without_batching_runs_each_request_alone():
    engine = FakeEngine(delay_s=0.02)
    scheduler = scheduler_for(engine, max_batch_size=0)

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        results = await asyncio.gather(*(scheduler.infer(request(i, batch=2), 1) for i in range(4)))
        await scheduler.stop(grace_s=5)
        return results

    results = run(main())
    assert engine.calls == [2, 2, 2, 2]
    assert all(r["features"].shape == (2, 4) for r in results)


def test_a_full_queue_answers_unavailable_exceeds_maximum_queue_size():
    engine = FakeEngine(delay_s=0.3)
    scheduler = scheduler_for(engine, max_batch_size=1, max_queue_size=2)

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        running = asyncio.create_task(scheduler.infer(request(0), 1))
        await asyncio.sleep(0.05)  # the first one runs; two more fill the queue
        queued = [asyncio.create_task(scheduler.infer(request(i), 1)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Rejected, match="Exceeds maximum queue size"):
            await scheduler.infer(request(3), 1)
        results = await asyncio.gather(running, *queued)
        await scheduler.stop(grace_s=5)
        return results

    assert len(run(main())) == 3
    assert engine.calls == [1, 1, 1]


def test_a_request_that_times_out_in_the_queue_is_rejected_at_its_timeout_and_never_runs():
    engine = FakeEngine(delay_s=0.5)
    scheduler = scheduler_for(engine, max_batch_size=1)

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        busy = asyncio.create_task(scheduler.infer(request(0), 1))
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Rejected, match="Request timeout expired"):
            await scheduler.infer(request(1), 1, timeout_us=100_000)
        waited = loop.time() - started
        await busy
        await scheduler.stop(grace_s=5)
        return waited

    waited = run(main())
    assert 0.09 < waited < 0.4  # answered at its timeout, while the instance was still busy
    assert engine.calls == [1]  # the timed-out request never ran


def test_a_request_whose_deadline_passes_in_the_queue_never_runs():
    engine = FakeEngine(delay_s=0.3)
    scheduler = scheduler_for(engine, max_batch_size=1)

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        busy = asyncio.create_task(scheduler.infer(request(0), 1))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await scheduler.infer(request(1), 1, deadline_in_s=0.05)
        await busy
        await scheduler.stop(grace_s=5)

    run(main())
    assert engine.calls == [1]


def test_preserve_ordering_answers_in_arrival_order_even_when_a_later_batch_finishes_first():
    async def finish_order(preserve: bool) -> list[int]:
        scheduler = scheduler_for(SlowOnZeroEngine(slow_s=0.3), max_batch_size=1, instances=2,
                                  preserve_ordering=preserve)
        await scheduler.start()
        done: list[int] = []

        async def one(i: int) -> None:
            await scheduler.infer(request(i), 1)  # request 0 is slow, 1 is fast, on two instances
            done.append(i)

        await asyncio.gather(one(0), one(1))
        await scheduler.stop(grace_s=5)
        return done

    assert run(finish_order(False)) == [1, 0]  # the fast one overtakes without ordering ...
    assert run(finish_order(True)) == [0, 1]  # ... and waits for the slow one with it


def test_a_higher_priority_request_runs_before_older_lower_priority_ones():
    engine = FakeEngine(delay_s=0.1)
    scheduler = scheduler_for(engine, max_batch_size=1, priority_levels=2)
    order: list[int] = []

    async def one(i: int, priority: int) -> None:
        await scheduler.infer(request(i), 1, priority=priority)
        order.append(i)

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        tasks = [asyncio.create_task(one(0, 2))]
        await asyncio.sleep(0.03)  # 0 runs; 1 and 2 (low) queue, then 3 (high)
        tasks += [asyncio.create_task(one(i, 2)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(one(3, 1)))
        await asyncio.gather(*tasks)
        await scheduler.stop(grace_s=5)

    run(main())
    assert order == [0, 3, 1, 2]


def test_sequence_buckets_batch_different_lengths_together_and_answer_each_at_its_own_length():
    engine = FakeEngine(manifest=None)
    scheduler = scheduler_for(engine, max_batch_size=8, max_queue_delay_us=50_000, sequence_buckets=[8])
    lengths = [3, 5, 8, 2]

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        results = await asyncio.gather(*(scheduler.infer(request(i, seq=n), 1) for i, n in enumerate(lengths)))
        await scheduler.stop(grace_s=5)
        return results

    results = run(main())
    assert engine.calls == [4]  # four lengths, one bucket, one batch
    for i, (n, out) in enumerate(zip(lengths, results, strict=True)):
        r = request(i, seq=n)
        assert out["lengths"].tolist() == [n]  # the mask's padding is zeros
        masked_sum = expected_features(r["input_ids"], r["attention_mask"])[:, 3]
        np.testing.assert_array_equal(out["features"][:, 3], masked_sum)


def test_tokenized_text_requests_of_any_length_share_a_batch():
    engine = FakeTextEngine(delay_s=0.05)
    scheduler = scheduler_for(engine, max_batch_size=8, max_queue_delay_us=20_000)
    texts = [["a bb ccc"], ["dddd", "ee"], ["f"]]  # 3, 1 and 1 tokens wide

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        results = await asyncio.gather(*(
            scheduler.infer(engine.fake_pipeline.tokenize(t), len(t), text=True) for t in texts))
        await scheduler.stop(grace_s=5)
        return results

    results = run(main())
    assert engine.calls == [4]  # one batch, padded to the longest text
    assert [r["lengths"].tolist() for r in results] == [[3], [1, 1], [1]]
    np.testing.assert_array_equal(results[0]["features"][0], [6, 1, 3, 6])  # word lengths 1, 2, 3


def test_timings_and_statistics_account_for_queue_and_compute_time():
    engine = FakeEngine(delay_s=0.05)
    scheduler = scheduler_for(engine, max_batch_size=8, max_queue_delay_us=20_000)
    timings = [Timings() for _ in range(3)]

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        await asyncio.gather(*(scheduler.infer(request(i, batch=2), 2, timings=t) for i, t in enumerate(timings)))
        await scheduler.stop(grace_s=5)

    run(main())
    stats = scheduler.stats
    assert (stats.inference_count, stats.execution_count) == (6, 1)
    assert set(stats.batches) == {6} and stats.batches[6].compute_infer.count == 1
    for t in timings:
        assert t.queue_ns >= 15e6  # waited for the 20 ms delay (minus clock granularity)
        assert t.compute_infer_ns >= 45e6  # the engine's 50 ms


def test_a_stopped_scheduler_is_freed_without_the_cyclic_garbage_collector():
    # Its cancelled timer task once kept it (and so its model's engine) alive in a reference
    # cycle until a full collection: a replaced engine per reload.
    engine = FakeEngine()
    scheduler = scheduler_for(engine, max_batch_size=8)

    async def main() -> weakref.ref[ModelScheduler]:
        await scheduler.start()
        await scheduler.infer(request(1), 1)
        await scheduler.stop(grace_s=5)
        return weakref.ref(scheduler)

    gc.disable()
    try:
        ref = run(main())
        del scheduler
        assert ref() is None
    finally:
        gc.enable()


def test_a_request_of_tokens_over_the_token_budget_runs_in_slices_and_is_answered_whole_in_order():
    engine = FakeEngine()
    scheduler = scheduler_for(engine, max_batch_size=8, max_batch_tokens=8)
    big = request(5, batch=6, seq=4)  # 24 padded tokens: three slices of 2 rows x 4 tokens

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        result = await scheduler.infer(big, 6)
        await scheduler.stop(grace_s=5)
        return result

    result = run(main())
    assert engine.calls == [2, 2, 2]
    np.testing.assert_array_equal(result["features"], expected_features(big["input_ids"], big["attention_mask"]))


def test_a_text_request_is_split_across_batches_by_length_and_rejoined_in_its_order():
    engine = FakeTextEngine(delay_s=0.02)
    scheduler = scheduler_for(engine, max_batch_size=8, max_batch_tokens=12, max_queue_delay_us=20_000)
    texts = [["a " * 9, "b", "c c c c c c c c c c", "d d"], ["e e e", "f"]]  # 9, 1, 10, 2 | 3, 1 tokens
    tokenized = [engine.fake_pipeline.tokenize(t) for t in texts]

    async def main():  # type: ignore[no-untyped-def]
        await scheduler.start()
        results = await asyncio.gather(*(scheduler.infer(t, len(t["input_ids"]), text=True) for t in tokenized))
        await scheduler.stop(grace_s=5)
        return results

    results = run(main())
    assert sum(engine.calls) == 6 and len(engine.calls) > 1  # no batch over 12 padded tokens
    for tokens, result in zip(tokenized, results, strict=True):
        assert result["lengths"].tolist() == tokens["attention_mask"].sum(1).tolist()
        want = expected_features(tokens["input_ids"], tokens["attention_mask"])
        np.testing.assert_array_equal(result["features"][:, 3], want[:, 3])  # masked sums, row by row
