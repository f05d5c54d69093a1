"""One engine in its own process, run on request: the timing side of the CPU engine comparison.

Engines' thread pools slow one another down when two runtimes share a process on a small
machine (eager was measured up to 30% slower with another engine loaded), so the
benchmark starts one worker per engine and times a round trip: it writes `run` on the worker's
stdin and waits for `ok`. The pipe adds tens of microseconds to runs of tens of milliseconds.

    python -m bench.engines.worker ENGINE_DIR --batch 8 --seq 128
    python -m bench.engines.worker --transformers MODEL_DIR --batch 8 --seq 128

`--transformers` is the baseline users compare against: the Hugging Face model run eagerly by
PyTorch in fp32 (`torch.inference_mode`), with the sentence-transformers mean pooling and L2
normalization applied after it, as the engines compute them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

VOCAB_LOW, VOCAB_HIGH = 1000, 29000  # ordinary word-piece ids of a BERT vocabulary


def dense_inputs(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """[batch, seq] token ids with no padding: every engine does the full work, padding-free
    ones included (they gain nothing here)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(VOCAB_LOW, VOCAB_HIGH, (batch, seq), generator=generator, dtype=torch.int64),
        "attention_mask": torch.ones(batch, seq, dtype=torch.int64),
    }


def transformers_runner(model_dir: Path) -> Callable[[dict[str, torch.Tensor]], object]:
    import transformers

    from optimize.runtime.pooling import pool

    model = transformers.AutoModel.from_pretrained(model_dir).eval()

    def run(feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            hidden = model(**feeds).last_hidden_state
            return pool(hidden, feeds["attention_mask"], "mean", normalize=True)

    return run


def engine_runner(engine_dir: Path) -> Callable[[dict[str, torch.Tensor]], object]:
    import optimize

    engine = optimize.load(engine_dir)
    return engine.run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engines.worker")
    parser.add_argument("engine", nargs="?", type=Path, help="engine directory")
    parser.add_argument("--transformers", type=Path, help="run this Hugging Face model directory eagerly instead")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = transformers_runner(args.transformers) if args.transformers else engine_runner(args.engine)
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
