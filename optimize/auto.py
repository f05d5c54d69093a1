"""`--backend auto`: build every candidate engine this machine can run, keep the fastest one
that passes the accuracy guard.

On CPUs the best engine differs by model, shape and precision (FIELD_NOTES: ONNX Runtime,
OpenVINO and CTranslate2 each win somewhere), so kiln measures instead of guessing:

1. candidates are the (backend, precision, options) combinations installed and runnable here
   whose precision is at least as accurate as the one asked for (asking for int8 admits fp32,
   the int8 modes and every backend's variants);
2. each is compiled and verified like any engine, all against the tolerance of the precision
   asked for — a candidate that fails is rejected with the verifier's reason;
3. each passing engine is timed at the configured `opt` shape **in its own process**: engines'
   thread pools slow one another down when they share a process on a small machine;
4. the fastest becomes the engine; the table of all candidates (time, accuracy, rejection
   reasons) is stored in its manifest (`build.auto`) and printed by the CLI.

`python -m optimize.auto time ENGINE_DIR --batch B --seq S` is the timing subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optimize.config import CompileConfig
from optimize.errors import ConfigError, OptimizeError

# The precisions admitted as candidates when a precision is asked for: that one and every more
# accurate one (all are judged against the tolerance of the one asked for).
ADMITTED = {
    "fp32": ("fp32",),
    "fp16": ("fp32", "fp16"),
    "bf16": ("fp32", "bf16", "fp16"),
    "int8-weight": ("fp32", "fp16", "int8-weight"),
    "int8": ("fp32", "fp16", "int8-weight", "int8"),
    "fp8": ("fp32", "fp16", "int8-weight", "int8", "fp8"),
}
TIMING_WARMUP = 3
TIMING_RUNS = 15


@dataclass
class Candidate:
    backend: str
    precision: str
    options: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"  # chosen | passed | rejected
    reason: str = ""
    median_ms: float | None = None
    accuracy: dict[str, Any] = field(default_factory=dict)
    build_s: float = 0.0

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.backend}/{self.precision}" + (f"[{opts}]" if opts else "")

    def to_json(self) -> dict[str, Any]:
        return {"candidate": self.label, "backend": self.backend, "precision": self.precision, "options": self.options,
                "status": self.status, "reason": self.reason, "median_ms": self.median_ms, "accuracy": self.accuracy,
                "build_s": round(self.build_s, 1)}


AUTO_OPTIONS = ("backends",)


def candidates(config: CompileConfig) -> list[Candidate]:
    """Every combination worth trying here, for the precision `config` asks for; the option
    `backends` (a list of names) restricts the search."""
    from optimize.backends import available_backends, get_backend

    unknown = sorted(set(config.backend_options) - set(AUTO_OPTIONS))
    if unknown:
        raise ConfigError(f"backend 'auto' has no option(s) {', '.join(unknown)}; its options: {', '.join(AUTO_OPTIONS)}")
    allowed = config.backend_options.get("backends")
    names = [n for n in available_backends() if n != "auto" and (allowed is None or n in allowed)]
    if allowed is not None and set(allowed) - set(names):
        missing = sorted(set(allowed) - set(names))
        raise ConfigError(f"backend 'auto': unknown backend(s) {', '.join(missing)}; available: {', '.join(available_backends())}")
    admitted = ADMITTED[config.precision]
    found: list[Candidate] = []
    variants: dict[str, list[dict[str, Any]]] = {
        "onnxruntime": [{"ort_fusions": True}, {"ort_fusions": False}],
    }
    for name in names:
        try:
            backend = get_backend(name)
        except (OptimizeError, ImportError):
            continue
        if not backend.can_run_here()[0]:
            continue
        for precision in admitted:
            if precision not in backend.precisions:
                continue
            # Reduced float precisions only pay off on accelerators; CPUs emulate them.
            if precision in ("fp16", "bf16") and name != "tensorrt":
                continue
            for options in variants.get(name, [{}]):
                found.append(Candidate(name, precision, dict(options)))
    return found


def time_engine(path: Path, batch: int, seq: int) -> float:
    """Median milliseconds of one `run` at [batch, seq], measured in a fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "optimize.auto", "time", str(path), "--batch", str(batch), "--seq", str(seq)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if result.returncode != 0:
        lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
        raise OptimizeError(f"timing failed: {lines[-1] if lines else 'exit ' + str(result.returncode)}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["median_ms"])


def compile_auto(source: str | Path, out_dir: str | Path, config: CompileConfig, *, name: str | None = None,
                 reporter: Any = None) -> Any:
    """Compile every candidate, time the ones that pass, install the fastest at `out_dir`."""
    import optimize
    from optimize.manifest import Manifest

    out_dir = Path(out_dir)
    found = candidates(config)
    if not found:
        raise ConfigError("no backend can run on this machine for precision " + config.precision)
    workdir = out_dir.parent / f".{out_dir.name}.auto"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    tolerance = config.tolerance
    assert config.opt_batch is not None and config.opt_seq is not None
    try:
        for index, candidate in enumerate(found):
            if reporter is not None:
                reporter.start(f"candidate {index + 1}/{len(found)}: {candidate.label}")
            t0 = time.perf_counter()
            sub = replace(config, backend=candidate.backend, precision=candidate.precision,
                          backend_options={**candidate.options}, tolerance=tolerance)
            path = workdir / f"{index}"
            try:
                engine = optimize.compile(source, path, sub, name=name)
                candidate.accuracy = {k: engine.manifest.accuracy.get(k) for k in ("max_abs_error", "min_cosine", "judged_on")}
                candidate.build_s = time.perf_counter() - t0
                candidate.median_ms = time_engine(path, config.opt_batch, config.opt_seq)
                candidate.status = "passed"
            except OptimizeError as exc:
                candidate.status, candidate.reason = "rejected", str(exc)
                candidate.build_s = time.perf_counter() - t0
            if reporter is not None:
                reporter.finish(f"candidate {candidate.label}: " + (
                    f"{candidate.median_ms:.1f} ms" if candidate.median_ms is not None else f"rejected ({candidate.reason[:80]})"
                ), round(time.perf_counter() - t0, 3))
        passed = [c for c in found if c.status == "passed"]
        if not passed:
            reasons = "; ".join(f"{c.label}: {c.reason}" for c in found)
            raise OptimizeError(f"no candidate passed the accuracy guard: {reasons}"[:2000])
        best = min(passed, key=lambda c: c.median_ms or float("inf"))
        best.status = "chosen"
        chosen_dir = workdir / str(found.index(best))
        manifest = Manifest.read(chosen_dir)
        manifest.build["auto"] = {
            "shape": {"batch": config.opt_batch, "seq": config.opt_seq},
            "timing": f"median of {TIMING_RUNS} runs after {TIMING_WARMUP} warm-up, each engine in its own process",
            "asked": {"precision": config.precision, "tolerance": tolerance.to_json() if tolerance else None},
            "candidates": [c.to_json() for c in found],
            "chosen": best.label,
        }
        manifest.write(chosen_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        chosen_dir.rename(out_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return optimize.load(out_dir)


def _time_main(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import optimize
    from optimize.specs import torch_dtype

    torch.set_num_threads(os.cpu_count() or 1)
    engine = optimize.load(args.engine)
    sizes = {"batch": args.batch, "seq": args.seq}
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
    for _ in range(TIMING_WARMUP):
        engine.run(feeds)
    times = []
    for _ in range(TIMING_RUNS):
        t0 = time.perf_counter()
        engine.run(feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimize.auto")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("time", help="time one engine (run by --backend auto in a subprocess)")
    t.add_argument("engine", type=Path)
    t.add_argument("--batch", type=int, required=True)
    t.add_argument("--seq", type=int, required=True)
    t.set_defaults(func=_time_main)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
