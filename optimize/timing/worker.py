"""The worker side of timing: a process that loads one engine, warms it up at each shape, says
"ready", then answers "SHAPE RUNS" lines with the wall and CPU milliseconds of each run, one JSON
line per request (`python -m optimize.timing worker ENGINE --shape BxS ...`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from optimize.runtime.loading import load
from optimize.runtime.specs import torch_dtype
from optimize.timing.results import TIMING_WARMUP, parse_shape


def _feeds(engine: Any, batch: int, seq: int) -> dict[str, Any]:
    """Inputs of one shape: all-ones attention masks (no padding, so padding-free engines do the
    full work too), random floats, and integers in the input's value range."""

    sizes = {"batch": batch, "seq": seq}
    generator = torch.Generator().manual_seed(0)
    feeds = {}
    for spec in engine.inputs:
        shape = spec.concrete(sizes)
        dtype = torch_dtype(spec.dtype)
        if spec.name == "attention_mask":
            feeds[spec.name] = torch.ones(shape, dtype=dtype)
        elif dtype.is_floating_point:
            feeds[spec.name] = torch.randn(shape, generator=generator).to(dtype)
        else:  # values do not change the time of a dense engine
            lo, hi = spec.value_range or (0, 100)
            feeds[spec.name] = torch.randint(lo, hi + 1, shape, generator=generator, dtype=dtype)
    return feeds


def serve(args: argparse.Namespace) -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    engine = load(args.engine)
    feeds = {text: _feeds(engine, *parse_shape(text)) for text in args.shape}
    for text in args.shape:
        for _ in range(TIMING_WARMUP):
            engine.run(feeds[text])
    answer_runs(engine.run, feeds)
    return 0


def answer_runs(run: Callable[[Any], Any], feeds: Mapping[str, Any]) -> None:
    """The worker's half of the protocol, for anything that runs (a benchmark's peers too):
    say "ready", then answer each "SHAPE RUNS" line on stdin with one JSON line of the wall and
    CPU milliseconds of each of `runs` calls of `run(feeds[SHAPE])`, until stdin closes."""
    print("ready", flush=True)
    for line in sys.stdin:
        text, runs = line.split()
        wall, cpu = [], []
        for _ in range(int(runs)):
            c0, t0 = time.process_time(), time.perf_counter()
            run(feeds[text])
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        print(json.dumps({"wall_ms": wall, "cpu_ms": cpu}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimize.timing")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="load one engine and time runs on request (started by time_engines)")
    w.add_argument("engine", type=Path)
    w.add_argument("--shape", action="append", required=True, help="BATCHxSEQ, e.g. 8x128 (repeatable)")
    w.set_defaults(func=serve)
    args = parser.parse_args(argv)
    return int(args.func(args))

