"""One engine in its own process, run on request: the timing side of the CPU engine comparison.

Engines' thread pools slow one another down when two runtimes share a process on a small
machine (eager was measured up to 30% slower with another engine loaded), so the
benchmark starts one worker per engine and times a round trip: it writes `run` on the worker's
stdin and waits for `ok`. The pipe adds tens of microseconds to runs of tens of milliseconds.

    python -m bench.engines.worker ENGINE_DIR --batch 8 --seq 128
    python -m bench.engines.worker --transformers MODEL_DIR --batch 8 --seq 128

`--transformers` is the baseline users compare against: the Hugging Face model run eagerly by
PyTorch in fp32, with the sentence-transformers pooling after it (`bench.engines.peers`'
`eager-fp32`, which also loads engines and makes the inputs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from bench.engines.peers import dense_inputs, engine_runner, peer_runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engines.worker")
    parser.add_argument("engine", nargs="?", type=Path, help="engine directory")
    parser.add_argument("--transformers", type=Path, help="run this Hugging Face model directory eagerly instead")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = peer_runner("eager-fp32", args.transformers) if args.transformers else engine_runner(args.engine)
    feeds = dense_inputs(args.batch, args.seq)
    run(feeds)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        run(feeds)
        print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
