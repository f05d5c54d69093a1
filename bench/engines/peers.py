"""One engine or one peer in its own process, timed on request: the worker of `bench.engines.compare`.

Peers are what a PyTorch user gets without kiln, in a line or two, on the Hugging Face model
with the sentence-transformers pooling after it (as kiln's engines compute it):

- `eager-fp32`: the model as is, under `torch.inference_mode` (the baseline);
- `eager-bf16-autocast`: the same under `torch.autocast("cpu", dtype=torch.bfloat16)`;
- `torch-compile`: `torch.compile(model)` (Inductor, default mode), fp32;
- `torch-compile-bf16-autocast`: `torch.compile` of the model run under bf16 autocast.

An engine directory is loaded with `optimize.load`. Before timing, the worker computes its
answers on held-out real sentences and writes their worst cosine against the fp32 model's to
`--accuracy` (JSON); then it speaks `optimize.timing`'s worker protocol on stdin/stdout ("ready",
then one "SHAPE RUNS" line in, one {"wall_ms", "cpu_ms"} line out), so the same rotating rounds
time engines and peers alike.

    python -m bench.engines.peers eager-bf16-autocast --model MODEL_DIR --shape 8x128 --shape 1x32 --accuracy F
    python -m bench.engines.peers ENGINE_DIR --model MODEL_DIR --shape 8x128 --accuracy F
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from optimize.timing.worker import answer_runs

VOCAB_LOW, VOCAB_HIGH = 1000, 29000  # ordinary word-piece ids of a BERT vocabulary


def dense_inputs(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """[batch, seq] token ids with no padding: every engine does the full work, padding-free
    ones included (they gain nothing here)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(VOCAB_LOW, VOCAB_HIGH, (batch, seq), generator=generator, dtype=torch.int64),
        "attention_mask": torch.ones(batch, seq, dtype=torch.int64),
    }


PEERS = ("eager-fp32", "eager-bf16-autocast", "torch-compile", "torch-compile-bf16-autocast")
Run = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def peer_runner(peer: str, model_dir: Path) -> Run:
    import transformers

    from optimize.sources.hf import pool

    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    forward: Callable[..., object] = torch.compile(model) if peer.startswith("torch-compile") else model
    autocast = peer.endswith("bf16-autocast")

    def run(feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.inference_mode(), context:
            hidden = forward(**feeds).last_hidden_state
        return pool(hidden.float(), feeds["attention_mask"], "mean", normalize=True)

    return run


def engine_runner(engine_dir: Path) -> Run:
    import optimize

    engine = optimize.load(engine_dir)
    names = [s.name for s in engine.outputs]
    output = "sentence_embedding" if "sentence_embedding" in names else names[0]

    def run(feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        return engine.run(feeds)[output]

    return run


def real_cosine(run: Run, model_dir: Path) -> float:
    """The worst cosine of `run`'s sentence embeddings against the fp32 model's, over the
    held-out sentences kiln verifies with (batches of several lengths)."""
    import transformers

    from optimize.samples import VERIFICATION_SENTENCES

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    reference = peer_runner("eager-fp32", model_dir)
    worst = 1.0
    texts = list(VERIFICATION_SENTENCES)
    for start in range(0, len(texts), 8):
        feeds = dict(tokenizer(texts[start:start + 8], padding=True, truncation=True, max_length=128,
                               return_tensors="pt"))
        feeds = {k: v for k, v in feeds.items() if k in ("input_ids", "attention_mask")}
        expected, got = reference(feeds).double(), torch.as_tensor(run(feeds)).double()
        worst = min(worst, torch.nn.functional.cosine_similarity(expected, got, dim=1).min().item())
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engines.peers")
    parser.add_argument("what", help=f"an engine directory or a peer: {', '.join(PEERS)}")
    parser.add_argument("--model", type=Path, required=True, help="the Hugging Face directory (peers, and accuracy)")
    parser.add_argument("--shape", action="append", required=True, help="BATCHxSEQ (repeatable)")
    parser.add_argument("--accuracy", type=Path, required=True, help="write {'min_cosine': ...} here")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    run = peer_runner(args.what, args.model) if args.what in PEERS else engine_runner(Path(args.what))
    feeds = {}
    for text in args.shape:
        batch, seq = (int(v) for v in text.split("x"))
        feeds[text] = dense_inputs(batch, seq)
        for _ in range(args.warmup):  # torch.compile compiles here, for each shape
            run(feeds[text])
    args.accuracy.write_text(json.dumps({"min_cosine": real_cosine(run, args.model)}))
    answer_runs(run, feeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
