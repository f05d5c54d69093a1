"""The first requests a freshly started server answers, with and without `warmup` in the
model's config.toml: what a user who restarts or scales out a replica sees in its first seconds.

    python -m bench.server.warmup                    # writes bench/results/server-warmup-<date>.json

kiln's OpenVINO engine (all-MiniLM-L6-v2, bf16, the engine `bench.server.vs_infinity` serves)
behind kiln's server, one single-sentence request at a time over HTTP (`/v1/embeddings`), the
sentences drawn in turn from four of the server's token-length buckets (9-16, 17-32, 49-64 and
113-128 tokens: four engine shapes, as many as the engine keeps static copies of). Two
configurations, each in its own server process, alternating, `--rounds` times each:
- `cold`: no warm-up, as before: the first calls at each shape plan the dynamic model, and a
  shape seen twice compiles a static copy on a background thread, beside the requests;
- `warm`: `warmup = [[1, 16], [1, 32], [1, 64], [1, 128]]`: those shapes are run, and their copies
  compiled, at load, before the server answers ready.

Reported per configuration (median over rounds): the first `FIRST` requests' mean and worst
latency, the steady mean of the last half (the cold server's background compiles are long
over by then), and the time from start to ready (polled every 0.1 s).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.server.vs_infinity import (CACHE, KILN_CONFIG, MODEL, RESULTS, ROOT, Running, free_port,
                                      kiln_repository, machine, minilm_dir, sentences, stop, wait_ready)

BUCKETS = (16, 32, 64, 128)
REQUESTS = 400
FIRST = 40
WARMUP = [[1, tokens] for tokens in BUCKETS]


def bucketed_texts() -> list[str]:
    """Sentences in turn from each bucket (a text of 9-16 tokens runs as 16, and so on)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.no_padding()  # the file pads to 128
    tokenizer.no_truncation()
    by_bucket: dict[int, list[str]] = {b: [] for b in BUCKETS}
    for text in sentences(1024, seed=3):
        count = len(tokenizer.encode(text).ids)
        for low, bucket in zip((8, *BUCKETS), BUCKETS):
            if max(low, bucket - 16) < count <= bucket:  # the server pads to 16-token steps up to 128
                by_bucket[bucket].append(text)
    empty = [b for b in BUCKETS if not by_bucket[b]]
    if empty:
        raise SystemExit(f"no sentence falls in the bucket(s) {empty}")
    turns = [itertools.cycle(by_bucket[b]) for b in BUCKETS]  # a bucket's texts repeat when it has too few
    return [next(turns[i % len(BUCKETS)]) for i in range(REQUESTS)]


def repository(engine: Path, warm: bool) -> Path:
    root = CACHE / f"repository-{'warm' if warm else 'cold'}"
    shutil.rmtree(root, ignore_errors=True)
    (root / MODEL).mkdir(parents=True)
    (root / MODEL / "1").symlink_to(engine)
    config = {**KILN_CONFIG, **({"warmup": WARMUP} if warm else {})}
    (root / MODEL / "config.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
    return root


def one_round(root: Path, texts: list[str]) -> dict[str, Any]:
    http, grpc = free_port(), free_port()
    log = CACHE / f"{root.name}.log"
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "server", "--repository", str(root), "--port", str(grpc),
                                    "--http-port", str(http), "--no-metrics", "--log-level", "INFO"],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    running = Running(root.name, process, f"http://127.0.0.1:{http}")
    try:
        wait_ready(running, log)
        ready_s = time.perf_counter() - started
        latencies = []
        for text in texts:
            body = json.dumps({"model": MODEL, "input": text}).encode()
            request = urllib.request.Request(f"{running.http_url}/v1/embeddings", data=body,
                                             headers={"Content-Type": "application/json"})
            begin = time.perf_counter()
            with urllib.request.urlopen(request, timeout=60) as reply:
                reply.read()
            latencies.append((time.perf_counter() - begin) * 1e3)
    finally:
        stop(process)
    first, rest = latencies[:FIRST], latencies[REQUESTS // 2:]
    return {"ready_s": round(ready_s, 2), "first_mean_ms": round(statistics.mean(first), 2),
            "first_max_ms": round(max(first), 2), "steady_mean_ms": round(statistics.mean(rest), 2),
            "latencies_ms": [round(x, 2) for x in latencies]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS / f"server-warmup-{dt.date.today()}.json")
    args = parser.parse_args(argv)
    _, engine = kiln_repository(None)
    texts = bucketed_texts()
    roots = {"cold": repository(engine, warm=False), "warm": repository(engine, warm=True)}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in roots}
    for index in range(args.rounds):
        order = list(roots) if index % 2 == 0 else list(reversed(roots))
        for name in order:
            result = one_round(roots[name], texts)
            rounds[name].append(result)
            print(f"round {index + 1} {name}: ready in {result['ready_s']} s, first {FIRST} mean "
                  f"{result['first_mean_ms']} ms (worst {result['first_max_ms']}), then {result['steady_mean_ms']} ms",
                  flush=True)
    summary = {name: {key: statistics.median(r[key] for r in results)
                      for key in ("ready_s", "first_mean_ms", "first_max_ms", "steady_mean_ms")}
               for name, results in rounds.items()}
    report = {"benchmark": "first requests of a fresh kiln server, with and without warmup (python -m bench.server.warmup)",
              "date": str(dt.date.today()), "machine": machine(), "engine": "OpenVINO bf16 all-MiniLM-L6-v2",
              "kiln_config": KILN_CONFIG, "warmup": WARMUP, "requests": REQUESTS, "first": FIRST,
              "method": __doc__.split("\n\n")[2], "summary": summary, "rounds": rounds}
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
