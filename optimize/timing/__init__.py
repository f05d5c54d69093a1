"""Timing engines against one another on this machine: the measurement behind `--backend auto`.

Engines are timed to be compared, on a machine that may be busy with other work (a shared
2-core box often is). Other processes only ever add time to a run, and they come and go in
spells of seconds, so the method is built to let a spell fall on every engine alike and to
keep the runs it did not touch:

1. **One worker process per engine**, all started, loaded and warmed up before any timing
   (`python -m optimize.timing worker ENGINE --shape BxS ...`): engines' thread pools never
   share a process, and each engine is loaded once however many rounds there are (so the
   candidates must fit in memory together).
2. **Short rounds in rotating order**: `ROUNDS` rounds of `RUNS_PER_ROUND` runs per engine and
   shape; round r starts at engine r (A B C, B C A, C A B, ...), so each engine is measured
   early, late and in between, spread over the whole timing window instead of in one block.
3. **An engine's time is its fastest run per shape** (the geometric mean over shapes when there
   are several): interference cannot make a run faster, so the minimum is the estimate least
   moved by other processes. The median of all runs is kept beside it.
4. **CPU time bounds it**: each run's process CPU time (all threads) is recorded too. On a
   machine without a CUDA GPU every engine computes on the CPU and keeps at least one core
   busy throughout a run, so alone it would take no longer than the CPU time a run needs:
   the time is the fastest run or the least CPU time of a run, whichever is shorter. This is
   what holds the ranking when the machine stays busy all along: an engine whose threads wait
   on each other (OpenVINO, ONNX Runtime) can run 7x slower beside a spinning process while a
   single-threaded one barely slows down, but the CPU time each needs hardly moves. An engine
   that uses k cores alone is then credited at most k times its time, so on a busy machine a
   lead smaller than that can still flip, and the verdict says "unsure".
5. **The machine's load**: its CPU use (`/proc/stat`) is read around every batch of runs; what
   the worker did not use was used by other processes. It is pooled over all batches, since
   one batch of fast runs can be shorter than the clock tick the kernel counts in. When other
   processes used more than
   `BUSY_FRACTION` of the machine the result says "machine busy".
6. **How sure**: the rounds are split in two halves (even and odd rounds), each timed like the
   whole; an engine's spread is how much slower its slower half came out than its time. The
   fastest engine is "sure" when even its slower half beats the runner-up's time by more than
   `MIN_MARGIN`, i.e. its margin exceeds its own run-to-run spread, and, where the time of
   either of the two is its CPU time, when it leads by more than the number of CPUs. When it
   is unsure, the two fastest get `EXTRA_ROUNDS` more rounds (more chances to be timed outside
   a busy spell) and are judged again; "unsure" then means the two are about as fast, or the
   machine too busy to tell.

`time_engines(paths, shapes)` is the whole method; `--backend auto` (`optimize.auto`) calls it
and records its `Timings` in the manifest.

Its parts: `parent` starts the workers and runs the rounds (`measure`), `worker` is the other
end of the pipe (`python -m optimize.timing worker`), `machine` reads the machine's CPU use,
and `results` holds the method's numbers and what they yield: the times, the spread, the
verdict.
"""

from __future__ import annotations

from optimize.timing.parent import Runner, engine_command, measure, time_engines, time_workers
from optimize.timing.results import (
    BUSY_FRACTION,
    EXTRA_ROUNDS,
    MIN_MARGIN,
    ROUNDS,
    RUNS_PER_ROUND,
    TIMING_WARMUP,
    Batch,
    EngineTimes,
    Timings,
    parse_shape,
    shape_key,
)

__all__ = [
    "BUSY_FRACTION", "EXTRA_ROUNDS", "MIN_MARGIN", "ROUNDS", "RUNS_PER_ROUND", "TIMING_WARMUP", "Batch",
    "EngineTimes", "Runner", "Timings", "engine_command", "measure", "parse_shape", "shape_key", "time_engines",
    "time_workers",
]
