"""The dynamic batcher's rules, one test each, with a fake clock (no asyncio, no sockets)."""

from __future__ import annotations

import pytest

from server.batch_policy import BatchPolicy, QueuePolicy
from server.batcher import Batcher, QueueFull
from server.ordering import InOrder

A, B = "shape-a", "shape-b"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance_us(self, us: float) -> None:
        self.now += us / 1e6


def make(max_batch_size: int = 8, max_queue_delay_us: int = 1000, **policy) -> tuple[Batcher[str], FakeClock]:  # type: ignore[no-untyped-def]
    clock = FakeClock()
    return Batcher(BatchPolicy(max_batch_size, max_queue_delay_us, **policy), clock=clock), clock


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


# -- preferred batch sizes ------------------------------------------------------------------------

def test_a_preferred_batch_size_goes_at_once_without_waiting_for_the_delay():
    batcher, _ = make(max_batch_size=8, max_queue_delay_us=10_000_000, preferred_batch_sizes=(4,))
    for i in range(3):
        batcher.add(1, A, f"r{i}")
    assert batcher.next_batch() is None and batcher.wait_s() > 1  # 3 is not preferred: wait
    batcher.add(1, A, "r3")
    assert batcher.wait_s() == 0.0
    batch = batcher.next_batch()
    assert batch is not None and batch.size == 4 and batch.reason == "preferred"


def test_the_largest_reachable_preferred_size_is_dispatched_and_the_rest_waits():
    batcher, _ = make(max_batch_size=16, max_queue_delay_us=10_000_000, preferred_batch_sizes=(2, 4, 8))
    for i in range(6):
        batcher.add(1, A, f"r{i}")  # 6 queued: 4 is the largest preferred size reachable
    batch = batcher.next_batch()
    assert batch is not None and payloads(batch) == ["r0", "r1", "r2", "r3"] and batch.reason == "preferred"
    second = batcher.next_batch()
    assert second is not None and payloads(second) == ["r4", "r5"]  # 2 is preferred too


def test_preferred_sizes_count_samples_and_never_split_a_request():
    batcher, clock = make(max_batch_size=8, max_queue_delay_us=1000, preferred_batch_sizes=(4,))
    batcher.add(3, A, "r0")
    batcher.add(3, A, "r1")  # 3, then 6: 4 is never hit exactly
    assert batcher.next_batch() is None
    clock.advance_us(1000)
    batch = batcher.next_batch()
    assert batch is not None and batch.sizes == [3, 3] and batch.reason == "delay"


def test_preferred_sizes_above_max_batch_size_are_refused():
    with pytest.raises(ValueError, match="preferred batch size 16"):
        BatchPolicy(8, preferred_batch_sizes=(4, 16))


# -- priority levels ----------------------------------------------------------------------------

def test_a_higher_priority_request_decides_the_next_batch_even_if_younger():
    batcher, clock = make(max_batch_size=2, max_queue_delay_us=0, priority_levels=2)
    batcher.add(1, A, "low", priority=2)
    clock.advance_us(10)
    batcher.add(1, B, "high", priority=1)
    first = batcher.next_batch()
    assert first is not None and payloads(first) == ["high"]
    second = batcher.next_batch()
    assert second is not None and payloads(second) == ["low"]


def test_lower_priority_requests_of_the_same_key_fill_a_higher_priority_batch_after_it():
    batcher, _ = make(max_batch_size=3, max_queue_delay_us=0, priority_levels=3)
    batcher.add(1, A, "p3", priority=3)
    batcher.add(1, A, "p2", priority=2)
    batcher.add(1, A, "p1-a", priority=1)
    batcher.add(1, A, "p1-b", priority=1)
    batch = batcher.next_batch()
    assert batch is not None and payloads(batch) == ["p1-a", "p1-b", "p2"] and batch.reason == "full"
    assert payloads(batcher.next_batch()) == ["p3"]


def test_requests_without_a_valid_priority_go_to_the_default_level():
    policy = BatchPolicy(4, priority_levels=3, default_priority_level=2)
    assert [policy.level(p) for p in (0, 1, 2, 3, 4, 99)] == [2, 1, 2, 3, 2, 2]
    assert BatchPolicy(4, priority_levels=3).level(0) == 3  # no default given: the lowest level
    assert BatchPolicy(4).level(5) == 1  # no priority levels: everything is one level


# -- queue policy: bounded queue and timeouts -----------------------------------------------------

def test_a_full_queue_refuses_with_tritons_words_and_accepts_again_once_drained():
    batcher, clock = make(max_batch_size=8, max_queue_delay_us=1000, queue_policy=QueuePolicy(max_queue_size=2))
    batcher.add(1, A, "r0")
    batcher.add(1, A, "r1")
    with pytest.raises(QueueFull, match="Exceeds maximum queue size"):
        batcher.add(1, A, "r2")
    assert len(batcher) == 2
    clock.advance_us(1000)
    assert batcher.next_batch() is not None
    batcher.add(1, A, "r3")  # room again


def test_each_priority_level_has_its_own_queue_bound():
    batcher, _ = make(priority_levels=2, queue_policy=QueuePolicy(max_queue_size=1),
                      priority_queue_policy={1: QueuePolicy(max_queue_size=3)})
    for i in range(3):
        batcher.add(1, A, f"high{i}", priority=1)
    batcher.add(1, A, "low0", priority=2)
    with pytest.raises(QueueFull, match="priority level 2"):
        batcher.add(1, A, "low1", priority=2)
    with pytest.raises(QueueFull, match="priority level 1"):
        batcher.add(1, A, "high3", priority=1)
    assert batcher.queued(1) == 3 and batcher.queued(2) == 1


def test_a_timed_out_request_is_rejected_and_never_dispatched():
    batcher, clock = make(max_batch_size=8, max_queue_delay_us=10_000_000)
    batcher.add(1, A, "patient")
    batcher.add(1, A, "hasty", timeout_us=500)
    assert batcher.wait_s() == pytest.approx(500e-6)  # the driver wakes up for the timeout
    clock.advance_us(500)
    expired = batcher.expire()
    assert [(e.pending.payload, e.reason) for e in expired] == [("hasty", "timeout")]
    batch = batcher.next_batch(flush=True)
    assert batch is not None and payloads(batch) == ["patient"]


def test_next_batch_never_returns_an_expired_request_and_hands_it_to_expire():
    batcher, clock = make(max_batch_size=2, max_queue_delay_us=0)
    batcher.add(1, A, "late", timeout_us=100)
    batcher.add(1, A, "ok")
    clock.advance_us(100)
    batch = batcher.next_batch()
    assert batch is not None and payloads(batch) == ["ok"]
    assert [e.pending.payload for e in batcher.expire()] == ["late"]
    assert batcher.expire() == []


def test_a_client_deadline_always_rejects_even_under_a_delay_policy():
    batcher, clock = make(max_batch_size=8, max_queue_delay_us=10_000_000,
                          queue_policy=QueuePolicy(timeout_action="delay"))
    batcher.add(1, A, "r0", deadline_s=clock.now + 0.001)
    clock.advance_us(1000)
    assert [(e.pending.payload, e.reason) for e in batcher.expire()] == [("r0", "deadline")]
    assert len(batcher) == 0


def test_the_default_timeout_applies_and_a_request_may_only_shorten_it():
    policy = QueuePolicy(default_timeout_us=1000)
    assert policy.timeout_us(0) == 1000 and policy.timeout_us(300) == 300 and policy.timeout_us(5000) == 1000
    assert QueuePolicy(default_timeout_us=1000, allow_timeout_override=False).timeout_us(300) == 1000
    assert QueuePolicy().timeout_us(300) == 300  # no default: the request's own applies
    batcher, clock = make(max_batch_size=8, max_queue_delay_us=10_000_000,
                          queue_policy=QueuePolicy(default_timeout_us=1000))
    batcher.add(1, A, "default")
    batcher.add(1, A, "longer", timeout_us=5000)  # may not extend the default
    clock.advance_us(1000)
    assert sorted(e.pending.payload for e in batcher.expire()) == ["default", "longer"]


def test_a_delayed_request_waits_behind_every_request_that_has_not_timed_out():
    batcher, clock = make(max_batch_size=1, max_queue_delay_us=0,
                          queue_policy=QueuePolicy(default_timeout_us=100, timeout_action="delay"))
    batcher.add(1, A, "old")
    clock.advance_us(100)  # "old" timed out: delayed, not rejected
    batcher.add(1, A, "new")
    assert batcher.expire() == []
    assert [payloads(batcher.next_batch()) for _ in range(2)] == [["new"], ["old"]]


# -- several instances sharing one queue ------------------------------------------------------------

def test_instances_sharing_a_batcher_get_disjoint_batches_covering_every_request_once():
    batcher, clock = make(max_batch_size=4, max_queue_delay_us=1000)
    for i in range(10):
        batcher.add(1, A if i % 3 else B, f"r{i}")
    clock.advance_us(1000)
    taken: list[str] = []
    instances: list[list[list[str]]] = [[], [], []]
    while True:  # three idle instances ask in turn, as the scheduler's workers do
        got = [batcher.next_batch() for _ in instances]
        if not any(got):
            break
        for runs, batch in zip(instances, got, strict=True):
            if batch is not None:
                runs.append(payloads(batch))
                taken += payloads(batch)
    assert sorted(taken) == sorted(f"r{i}" for i in range(10)) and len(taken) == 10
    assert all(runs for runs in instances)  # every instance got work
    assert all(len(b) <= 4 for runs in instances for b in runs)


# -- preserved ordering -------------------------------------------------------------------------------

def test_in_order_releases_answers_only_after_every_earlier_request():
    order: InOrder[str] = InOrder()
    tickets = [order.admit() for _ in range(4)]
    assert order.finish(tickets[2], "c") == []  # finished early: held back
    assert order.finish(tickets[1], "b") == []
    assert order.finish(tickets[0], "a") == ["a", "b", "c"]
    assert order.finish(tickets[3], "d") == ["d"]
    assert len(order) == 0


def test_in_order_skips_requests_that_ended_without_an_answer():
    order: InOrder[str] = InOrder()
    first, second = order.admit(), order.admit()
    assert order.finish(second, "b") == []
    assert order.finish(first, None) == ["b"]  # its client went away: it must not block "b"
    with pytest.raises(ValueError, match="not outstanding"):
        order.finish(first, "again")


# -- token budget and length grouping ------------------------------------------------------------
def test_a_batch_holds_at_most_max_batch_tokens_padded_tokens():
    batcher, _ = make(max_batch_size=8, max_batch_tokens=100)
    for name in "abcdef":
        batcher.add(1, A, name, tokens=30)
    batch = batcher.next_batch()
    assert batch is not None and batch.reason == "full"
    assert payloads(batch) == ["a", "b", "c"] and batch.tokens == 90  # a 4th row would make 120


def test_texts_are_grouped_by_length_so_padding_stays_small():
    batcher, _ = make(max_batch_size=3, max_batch_tokens=0)
    lengths = {"long1": 100, "short1": 10, "short2": 12, "long2": 98, "short3": 11, "long3": 99}
    for name, tokens in lengths.items():
        batcher.add(1, A, name, tokens=tokens)
    first, second = batcher.next_batch(), batcher.next_batch()
    assert first is not None and second is not None
    assert set(payloads(first)) == {"long1", "long2", "long3"}  # the oldest decides, its neighbours join
    assert set(payloads(second)) == {"short1", "short2", "short3"}


def test_the_deciding_request_always_runs_in_the_next_batch_whatever_its_length():
    batcher, clock = make(max_batch_size=2, max_batch_tokens=0)
    batcher.add(1, A, "oldest-long", tokens=120)
    for i in range(5):
        batcher.add(1, A, f"short{i}", tokens=8)
    batch = batcher.next_batch()
    assert batch is not None and "oldest-long" in payloads(batch)


def test_a_row_longer_than_the_budget_runs_alone():
    batcher, _ = make(max_batch_size=8, max_batch_tokens=64)
    batcher.add(1, A, "huge", tokens=128)
    batcher.add(1, A, "small", tokens=8)
    batch = batcher.next_batch()
    assert batch is not None and payloads(batch) == ["huge"]


def test_the_parts_of_a_request_count_as_one_request_in_the_queue_bounds():
    batcher, _ = make(max_batch_size=2, queue_policy=QueuePolicy(max_queue_size=1))
    parts = batcher.add_parts([(1, 10, "r0"), (1, 20, "r1"), (1, 30, "r2")], A)
    assert len(parts) == 3 and len(batcher) == 1
    with pytest.raises(QueueFull):
        batcher.add(1, A, "another")
    first = batcher.next_batch()
    assert first is not None and payloads(first) == ["r0", "r1"] and len(batcher) == 1  # r2 still queued
    last = batcher.next_batch(flush=True)
    assert last is not None and payloads(last) == ["r2"] and len(batcher) == 0


def test_a_lone_request_on_an_idle_model_goes_at_once_without_waiting_for_the_delay():
    batcher, clock = make(max_batch_size=8, max_queue_delay_us=1_000_000)
    batcher.add_parts([(1, 10, "a0"), (1, 12, "a1")], A)
    assert batcher.next_batch() is None  # a busy model: it waits for company
    assert batcher.wait_s(idle=True) == 0.0
    batch = batcher.next_batch(idle=True)
    assert batch is not None and batch.reason == "idle" and sorted(payloads(batch)) == ["a0", "a1"]


def test_two_queued_requests_on_an_idle_model_still_wait_for_the_delay():
    batcher, clock = make(max_batch_size=8, max_queue_delay_us=1000)
    batcher.add(1, A, "a", tokens=10)
    batcher.add(1, A, "b", tokens=10)
    assert batcher.next_batch(idle=True) is None
    clock.advance_us(1000)
    batch = batcher.next_batch(idle=True)
    assert batch is not None and batch.reason == "delay" and payloads(batch) == ["a", "b"]


def test_a_preferred_size_formed_by_length_still_holds_the_deciding_request():
    batcher, _ = make(max_batch_size=8, preferred_batch_sizes=(2,))
    batcher.add(1, A, "oldest", tokens=50)
    for name, tokens in (("b", 47), ("c", 48), ("d", 49)):
        batcher.add(1, A, name, tokens=tokens)
    batch = batcher.next_batch()
    assert batch is not None and batch.reason == "preferred" and payloads(batch)[0] == "oldest" and batch.size == 2


def test_rows_of_far_other_lengths_are_left_for_a_batch_of_their_own():
    batcher, _ = make(max_batch_size=8, max_queue_delay_us=1_000_000)
    batcher.add(1, A, "oldest", tokens=120)
    for name, tokens in (("s1", 8), ("s2", 9), ("l1", 118)):
        batcher.add(1, A, name, tokens=tokens)
    first = batcher.next_batch()  # padding the short ones to 120 tokens would cost more than a call
    assert first is not None and first.reason == "full" and payloads(first) == ["oldest", "l1"]
    second = batcher.next_batch(flush=True)
    assert second is not None and sorted(payloads(second)) == ["s1", "s2"]
