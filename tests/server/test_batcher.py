"""The dynamic batcher's rules, one test each, with a fake clock (no asyncio, no sockets)."""

from __future__ import annotations

import numpy as np
import pytest

from server.batcher import Batcher, BatchPolicy, batch_key, concatenate, split

A, B = "shape-a", "shape-b"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance_us(self, us: float) -> None:
        self.now += us / 1e6


def make(max_batch_size: int = 8, max_queue_delay_us: int = 1000) -> tuple[Batcher[str], FakeClock]:
    clock = FakeClock()
    return Batcher(BatchPolicy(max_batch_size, max_queue_delay_us), clock=clock), clock


def payloads(batch) -> list[str]:  # type: ignore[no-untyped-def]
    return [p.payload for p in batch.requests]


def test_empty_queue_has_no_batch_and_no_wait():
    batcher, _ = make()
    assert batcher.next_batch() is None
    assert batcher.wait_s() is None
    assert len(batcher) == 0


def test_a_partial_batch_waits_for_the_queue_delay():
    batcher, clock = make(max_batch_size=8, max_queue_delay_us=1000)
    batcher.add(1, A, "r1")
    assert batcher.next_batch() is None
    assert batcher.wait_s() == pytest.approx(1e-3)
    clock.advance_us(600)
    batcher.add(1, A, "r2")
    assert batcher.next_batch() is None
    # The oldest request bounds the wait: 400 us left, not a fresh 1000 us for r2.
    assert batcher.wait_s() == pytest.approx(400e-6)
    clock.advance_us(400)
    batch = batcher.next_batch()
    assert batch is not None and payloads(batch) == ["r1", "r2"] and batch.reason == "delay"
    assert len(batcher) == 0


def test_a_full_batch_goes_at_once_without_waiting():
    batcher, _ = make(max_batch_size=4, max_queue_delay_us=10_000_000)
    for i in range(3):
        batcher.add(1, A, f"r{i}")
    assert batcher.next_batch() is None
    batcher.add(1, A, "r3")
    assert batcher.wait_s() == 0.0
    batch = batcher.next_batch()
    assert batch is not None and batch.size == 4 and batch.reason == "full"


def test_batch_size_counts_samples_not_requests():
    batcher, _ = make(max_batch_size=8, max_queue_delay_us=10_000_000)
    batcher.add(3, A, "r0")
    batcher.add(5, A, "r1")
    batch = batcher.next_batch()
    assert batch is not None and batch.sizes == [3, 5] and batch.size == 8


def test_a_batch_never_splits_a_request_and_is_full_when_the_next_does_not_fit():
    batcher, _ = make(max_batch_size=8, max_queue_delay_us=10_000_000)
    batcher.add(5, A, "r0")
    batcher.add(4, A, "r1")  # 5 + 4 > 8: r1 cannot join, so r0's batch cannot grow
    first = batcher.next_batch()
    assert first is not None and payloads(first) == ["r0"] and first.reason == "full"
    assert batcher.next_batch() is None  # r1 alone (4 of 8) waits for company
    assert len(batcher) == 1


def test_a_later_smaller_request_does_not_overtake_one_that_does_not_fit():
    batcher, _ = make(max_batch_size=8, max_queue_delay_us=10_000_000)
    batcher.add(6, A, "r0")
    batcher.add(4, A, "r1")
    batcher.add(2, A, "r2")  # would fit next to r0, but r1 is older
    first = batcher.next_batch()
    assert first is not None and payloads(first) == ["r0"]


def test_a_request_larger_than_max_batch_size_is_refused():
    batcher, _ = make(max_batch_size=4)
    with pytest.raises(ValueError, match="exceeds max_batch_size 4"):
        batcher.add(5, A, "big")
    with pytest.raises(ValueError, match=">= 1"):
        batcher.add(0, A, "empty")
    assert len(batcher) == 0


def test_requests_of_different_shapes_never_share_a_batch():
    batcher, clock = make(max_batch_size=8, max_queue_delay_us=1000)
    batcher.add(1, A, "a0")
    batcher.add(1, B, "b0")
    batcher.add(1, A, "a1")
    clock.advance_us(1000)
    first = batcher.next_batch()
    assert first is not None and payloads(first) == ["a0", "a1"]
    second = batcher.next_batch()
    assert second is not None and payloads(second) == ["b0"]


def test_the_oldest_request_goes_first_so_no_shape_starves():
    batcher, clock = make(max_batch_size=2, max_queue_delay_us=1000)
    batcher.add(1, B, "b0")  # oldest, alone in its shape
    for i in range(6):  # a stream of full batches of another shape
        batcher.add(1, A, f"a{i}")
    # Shape A has full batches ready, but b0 is the oldest request: it decides, and its batch is
    # not full, so nothing leaves until its delay has passed ...
    assert batcher.next_batch() is None
    clock.advance_us(1000)
    first = batcher.next_batch()
    assert first is not None and payloads(first) == ["b0"]
    # ... and then the others follow in arrival order.
    assert [payloads(batcher.next_batch()) for _ in range(3)] == [["a0", "a1"], ["a2", "a3"], ["a4", "a5"]]


def test_same_shape_requests_arriving_later_join_the_oldest_batch():
    batcher, clock = make(max_batch_size=8, max_queue_delay_us=1000)
    batcher.add(1, A, "a0")
    batcher.add(1, B, "b0")
    clock.advance_us(500)
    batcher.add(1, A, "a1")  # behind b0 in arrival order, same shape as the oldest
    clock.advance_us(500)
    first = batcher.next_batch()
    assert first is not None and payloads(first) == ["a0", "a1"]


def test_zero_delay_dispatches_whatever_is_queued_at_once():
    batcher, _ = make(max_batch_size=8, max_queue_delay_us=0)
    batcher.add(1, A, "r0")
    batcher.add(2, A, "r1")
    assert batcher.wait_s() == 0.0
    batch = batcher.next_batch()
    assert batch is not None and batch.sizes == [1, 2]


def test_max_batch_size_zero_runs_every_request_alone():
    batcher, _ = make(max_batch_size=0, max_queue_delay_us=10_000_000)
    batcher.add(3, A, "r0")  # a request's own batch dim is not limited: the model does not batch
    batcher.add(1, A, "r1")
    assert batcher.wait_s() == 0.0
    first, second = batcher.next_batch(), batcher.next_batch()
    assert first is not None and payloads(first) == ["r0"] and first.reason == "unbatched"
    assert second is not None and payloads(second) == ["r1"]


def test_flush_dispatches_a_partial_batch_before_its_delay():
    batcher, _ = make(max_batch_size=8, max_queue_delay_us=10_000_000)
    batcher.add(1, A, "r0")
    batcher.add(1, B, "r1")
    first = batcher.next_batch(flush=True)
    assert first is not None and payloads(first) == ["r0"] and first.reason == "flush"
    second = batcher.next_batch(flush=True)
    assert second is not None and payloads(second) == ["r1"]
    assert batcher.next_batch(flush=True) is None


def test_a_removed_request_is_never_dispatched():
    batcher, clock = make(max_batch_size=8, max_queue_delay_us=1000)
    r0 = batcher.add(1, A, "r0")
    batcher.add(1, A, "r1")
    assert batcher.remove(r0) is True
    assert batcher.remove(r0) is False  # already gone
    clock.advance_us(1000)
    batch = batcher.next_batch()
    assert batch is not None and payloads(batch) == ["r1"]
    assert batcher.remove(batch.requests[0]) is False  # dispatched requests are not queued


def test_removing_the_oldest_request_moves_the_deadline_to_the_next():
    batcher, clock = make(max_batch_size=8, max_queue_delay_us=1000)
    r0 = batcher.add(1, A, "r0")
    clock.advance_us(800)
    batcher.add(1, B, "r1")
    batcher.remove(r0)
    assert batcher.wait_s() == pytest.approx(1e-3)


def test_drain_returns_every_queued_request_oldest_first():
    batcher, _ = make()
    batcher.add(1, A, "a0")
    batcher.add(1, B, "b0")
    batcher.add(1, A, "a1")
    assert [p.payload for p in batcher.drain()] == ["a0", "b0", "a1"]
    assert len(batcher) == 0 and batcher.next_batch(flush=True) is None


def test_batch_key_separates_dtypes_and_non_batch_dims_only():
    base = {"ids": np.zeros((2, 16), np.int64), "mask": np.zeros((2, 16), np.int64)}
    assert batch_key(base) == batch_key({"ids": np.zeros((5, 16), np.int64), "mask": np.zeros((5, 16), np.int64)})
    assert batch_key(base) != batch_key({"ids": np.zeros((2, 17), np.int64), "mask": np.zeros((2, 17), np.int64)})
    assert batch_key(base) != batch_key({"ids": np.zeros((2, 16), np.int32), "mask": np.zeros((2, 16), np.int64)})


def test_concatenate_and_split_round_trip_in_request_order():
    rng = np.random.default_rng(0)
    requests = [{"x": rng.standard_normal((n, 3)).astype(np.float32)} for n in (1, 3, 2)]
    stacked = concatenate(requests)
    assert stacked["x"].shape == (6, 3)
    parts = split({"y": stacked["x"] * 2}, [1, 3, 2])
    for request, part in zip(requests, parts, strict=True):
        np.testing.assert_array_equal(part["y"], request["x"] * 2)


def test_split_refuses_outputs_whose_dim0_is_not_the_batch():
    with pytest.raises(ValueError, match="expected dim 0 to be the batch size 3"):
        split({"y": np.zeros((4, 2))}, [1, 2])
