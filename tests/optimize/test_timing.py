"""`optimize.timing`: engines timed in rotating rounds, each by its fastest run, with the
machine's load and how sure the ranking is said beside the times.

The method is tested on a simulated machine (a clock, engines of known speed, spells of load
from other processes) so that a spell can be put exactly where it did harm; one test runs the
real worker processes."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import optimize
from optimize.runtime.errors import OptimizeError
from optimize.timing import BUSY_FRACTION, EXTRA_ROUNDS, ROUNDS, RUNS_PER_ROUND, measure, time_engines

SLOWDOWN = 3.0  # a run during a spell takes this much longer, unless the engine says otherwise


class Machine:
    """Engines of known speed (ms per run alone) on this machine's CPUs, each using `threads`
    cores fully (2 unless told: its CPU time per run is threads x speed); during each spell
    (start, end in ms of simulated time) other processes use every CPU and runs take `slowdown`
    (SLOWDOWN unless told) times longer."""

    def __init__(self, speeds: dict[str, float], spells: list[tuple[float, float]] = (), broken: str = "",
                 hit: Callable[[str, int], bool] | None = None, threads: dict[str, int] | None = None,
                 slowdown: dict[str, float] | None = None, cpu_bound: bool = True) -> None:
        self.speeds, self.spells, self.broken = speeds, list(spells), broken
        self.hit = hit  # (engine, its batch number) -> whether a spell falls on that batch
        self.threads = {name: (threads or {}).get(name, 2) for name in speeds}
        self.slowdown = {name: (slowdown or {}).get(name, SLOWDOWN) for name in speeds}
        self.cpu_bound = cpu_bound
        self.now_ms = 0.0
        self.busy_cpu_ms = 0.0  # CPU time used on the machine by anyone
        self.order: list[str] = []

    def busy(self, name: str = "") -> bool:
        if self.hit is not None and self.hit(name, self.order.count(name) - 1):  # order holds this batch already
            return True
        return any(start <= self.now_ms < end for start, end in self.spells)

    def run(self, name: str, shape: str, runs: int) -> tuple[list[float], list[float]]:
        if name == self.broken:
            raise OptimizeError("timing failed: the worker died")
        self.order.append(name)
        walls = []
        for _ in range(runs):
            busy = self.busy(name)
            wall = self.speeds[name] * (self.slowdown[name] if busy else 1.0)
            cpu = self.speeds[name] * self.threads[name]
            if busy:
                self.busy_cpu_ms += max(0.0, wall * (os.cpu_count() or 1) - cpu)  # others fill the rest
            self.busy_cpu_ms += cpu
            self.now_ms += wall
            walls.append(wall)
        return walls, [self.speeds[name] * self.threads[name]] * runs

    def measure(self, names: list[str] | None = None, whole_ticks: bool = False):
        """`whole_ticks`: the machine's CPU use is counted in whole clock ticks, as the kernel's is."""
        ticks = os.sysconf("SC_CLK_TCK")
        count = math.floor if whole_ticks else float
        return measure(names or list(self.speeds), ["8x64"], self.run, clock=lambda: self.now_ms / 1e3,
                       sleep=lambda s: None, jiffies=lambda: (count(self.busy_cpu_ms / 1e3 * ticks), 0),
                       cpu_bound=self.cpu_bound)


@pytest.mark.parametrize("spell", [(0, 250), (150, 400), (300, 550), (450, 5000)])
def test_a_busy_spell_cannot_fall_on_one_engine_alone(spell: tuple[float, float]):
    # 250 ms is as long as all 24 runs of the fast engine one after another: timed in one block,
    # a spell there makes it 30 ms against the slow one's 14 and the wrong engine wins.
    machine = Machine({"fast": 10.0, "slow": 14.0}, spells=[spell])
    timings = machine.measure()
    assert timings.ranking() == ["fast", "slow"]
    assert timings.engines["fast"].time_ms == 10.0 and timings.engines["slow"].time_ms == 14.0
    assert timings.engines["fast"].median_ms >= 10.0 and timings.engines["fast"].runs == ROUNDS * RUNS_PER_ROUND


def test_rounds_rotate_the_order_so_every_engine_is_timed_early_and_late():
    machine = Machine({"a": 1.0, "b": 2.0, "c": 3.0})
    machine.measure()
    rounds = [machine.order[i:i + 3] for i in range(0, len(machine.order), 3)]
    assert rounds[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]] and len(rounds) == ROUNDS


def test_a_machine_busy_all_along_is_reported_busy_and_a_quiet_one_quiet():
    busy = Machine({"fast": 10.0, "slow": 14.0}, spells=[(0, 1e9)]).measure()
    assert busy.busy and busy.others_cpu > BUSY_FRACTION and busy.ranking() == ["fast", "slow"]
    assert "machine busy: other processes used" in busy.confidence()["verdict"]
    assert not busy.confidence()["sure"], "both times are CPU times: a 1.4x lead may be parallelism"
    quiet = Machine({"fast": 10.0, "slow": 14.0}).measure()
    assert not quiet.busy and quiet.others_cpu == 0.0 and "machine quiet" in quiet.confidence()["verdict"]


def test_a_busy_machine_is_seen_even_when_every_batch_is_shorter_than_a_clock_tick():
    # Runs of 0.1 ms: a batch of three lasts under a millisecond (0.3 ms alone, 0.9 ms in the
    # spell), a tenth of a 10 ms tick; most batches alone see no tick counted at all.
    busy = Machine({"fast": 0.1, "slow": 0.2}, spells=[(0, 1e9)]).measure(whole_ticks=True)
    assert busy.busy and busy.others_cpu > BUSY_FRACTION, busy.load_text()
    quiet = Machine({"fast": 0.1, "slow": 0.2}).measure(whole_ticks=True)
    assert not quiet.busy, quiet.load_text()


def test_the_choice_is_sure_only_when_its_lead_exceeds_its_own_spread():
    clear = Machine({"fast": 10.0, "slow": 14.0}).measure().confidence()
    assert clear["sure"] and clear["margin"] == pytest.approx(0.4) and clear["spread"] == 0.0
    assert clear["verdict"].startswith("sure: fast leads slow by 40%")
    close = Machine({"fast": 10.0, "slow": 10.1, "third": 20.0}).measure()
    assert not close.confidence()["sure"] and close.confidence()["verdict"].startswith("unsure: fast leads slow by 1%")
    assert close.extra_rounds == EXTRA_ROUNDS and "+8 rounds for the two fastest" in close.method()
    runs = ROUNDS * RUNS_PER_ROUND
    assert [close.engines[n].runs for n in ("fast", "slow", "third")] == [2 * runs, 2 * runs, runs]
    # Every batch of the fast engine in an odd round fell in a spell: its two halves disagree 3x.
    shaky = Machine({"fast": 10.0, "slow": 14.0}, threads={"fast": 4},  # CPU time 40 ms: no bound
                    hit=lambda name, batch: name == "fast" and batch % 2).measure()
    assert shaky.ranking() == ["fast", "slow"] and shaky.engines["fast"].spread == pytest.approx(SLOWDOWN - 1)
    assert not shaky.confidence()["sure"] and "its run-to-run spread is 200%" in shaky.confidence()["verdict"]


def test_on_a_machine_busy_all_along_cpu_time_keeps_the_parallel_engine_ahead():
    # The case: OpenVINO bf16 (two threads that wait on each other) ran 3.5x faster than
    # CTranslate2 alone, and 4x slower beside a spinning process; CTranslate2 hardly slowed down.
    engines = {"openvino": 25.0, "ctranslate2": 89.0}
    machine = {"threads": {"openvino": 2, "ctranslate2": 1}, "slowdown": {"openvino": 4.4, "ctranslate2": 1.1},
               "spells": [(0, 1e12)]}
    assert Machine(engines, cpu_bound=False, **machine).measure().ranking()[0] == "ctranslate2", "wall time alone"
    timings = Machine(engines, **machine).measure()
    assert timings.ranking() == ["openvino", "ctranslate2"]
    assert timings.engines["openvino"].time_ms == 50.0 and timings.engines["openvino"].cpu_bound == ["8x64"]
    confidence = timings.confidence()
    assert timings.engines["ctranslate2"].time_ms == 89.0, "its CPU time too is shorter than its runs here"
    assert "the time of openvino and ctranslate2 is CPU time" in confidence["verdict"]
    assert confidence["sure"] == (89 / 50 > timings.cpus), "1.78x is sure only with fewer CPUs than that"


def test_an_unsure_choice_gets_more_rounds_of_the_two_fastest_and_can_become_sure():
    # Spells fall on the fast engine's odd rounds, but only while the first ROUNDS last.
    machine = Machine({"fast": 10.0, "slow": 14.0, "third": 30.0},
                      hit=lambda name, batch: name == "fast" and batch % 2 == 1 and batch < ROUNDS)
    timings = machine.measure()
    assert timings.extra_rounds == EXTRA_ROUNDS and set(machine.order[-2 * EXTRA_ROUNDS:]) == {"fast", "slow"}
    assert timings.confidence()["sure"] and timings.engines["fast"].spread == 0.0


def test_an_engine_that_fails_is_reported_and_the_others_still_timed():
    timings = Machine({"ok": 5.0, "broken": 1.0}, broken="broken").measure()
    assert timings.failed == {"broken": "timing failed: the worker died"}
    assert timings.ranking() == ["ok"] and timings.engines["ok"].runs == ROUNDS * RUNS_PER_ROUND


def test_workers_time_real_engines_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    engine = optimize.compile("tests.optimize.factories:tiny_mlp", tmp_path / "e",
                              optimize.CompileConfig(backend="eager", max_batch=4))
    monkeypatch.chdir(tmp_path)  # the worker imports the caller's kiln whatever the working directory
    timings = time_engines({"eager": engine.path, "nothing": tmp_path / "missing"}, [(2, 1), (4, 1)])
    assert "missing is not an engine directory" in timings.failed["nothing"]
    result = timings.engines["eager"]
    assert set(result.times_ms) == {"2x1", "4x1"} and result.runs == 2 * ROUNDS * RUNS_PER_ROUND
    assert 0 < result.time_ms <= result.median_ms and all(v > 0 for v in result.cpu_ms.values())
    assert timings.cpus == os.cpu_count() and timings.to_json()["confidence"]["verdict"].startswith("only one engine")
