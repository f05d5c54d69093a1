"""What the CPU engine comparison compares, and the targets it is judged by (issue 5).

all-MiniLM-L6-v2 at batch 8 × seq 128 on the 2-core machine, against PyTorch eager fp32 (the
Hugging Face model run as is): the `auto` engine ≥ 1.5× at fp32-level accuracy (cosine ≥
0.9999), ≥ 2.5× with int8 at cosine ≥ 0.99 on real sentences, and never slower than the best
single engine it had to choose from.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

BASELINE = "pytorch eager fp32"
FP32_LEVEL_COSINE = 0.9999
FP32_LEVEL_SPEEDUP = 1.5
INT8_COSINE = 0.99
INT8_SPEEDUP = 2.5
# "Never slower than the best single engine", when auto chose another kind of engine than the
# fastest single one, allows this much timing noise.
NOISE = 0.05


@dataclass(frozen=True)
class Entry:
    """One compared engine: a kiln compile (backend, precision, accuracy guard) or, with no
    backend, the baseline."""

    label: str
    backend: str | None
    precision: str = "fp32"
    min_cosine: float | None = None  # None: the precision's default guard

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.label).strip("-")

    def compile_args(self) -> list[str]:
        assert self.backend is not None
        args = ["--backend", self.backend, "--precision", self.precision, "--max-batch", "32", "--max-seq", "256",
                "--opt-batch", "8", "--opt-seq", "128"]
        if self.min_cosine is not None:
            args += ["--min-cosine", str(self.min_cosine)]
        return args


ENTRIES: tuple[Entry, ...] = (
    Entry(BASELINE, None),
    Entry("kiln eager fp32", "eager"),
    Entry("onnxruntime fp32", "onnxruntime"),
    Entry("openvino fp32", "openvino"),
    Entry("ctranslate2 fp32", "ctranslate2"),
    Entry("openvino bf16", "openvino", "bf16"),
    Entry("onnxruntime int8", "onnxruntime", "int8"),
    Entry("openvino int8-weight", "openvino", "int8-weight"),
    Entry("ctranslate2 int8", "ctranslate2", "int8"),
    Entry("auto fp32", "auto", "fp32"),
    # fp32-level accuracy by the measure (cosine), any compute precision that keeps it.
    Entry("auto cos>=0.9999", "auto", "bf16", min_cosine=FP32_LEVEL_COSINE),
    Entry("auto int8", "auto", "int8"),
)


def _admitted(precision: str) -> tuple[str, ...]:
    from optimize.precision import admitted

    return admitted(precision)


def _int8(precision: str | None) -> bool:
    """Whether `precision` quantizes weights to int8 (int8, int8-weight), read from its facts."""
    import torch

    from optimize.runtime.precision import FACTS

    return precision in FACTS and FACTS[precision].weights == torch.int8


def evaluate(rows: dict[str, dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Each target with the measured value and whether it was met."""
    targets: list[dict[str, Any]] = []
    level = [r for label, r in rows.items() if label.startswith("auto") and r.get("min_cosine", 0) >= FP32_LEVEL_COSINE]
    best = max(level, key=lambda r: r["speedup_vs_baseline"], default=None)
    targets.append({
        "target": f"auto >= {FP32_LEVEL_SPEEDUP}x {baseline} at cosine >= {FP32_LEVEL_COSINE}",
        "engine": best["chosen"] if best else None,
        "value": best["speedup_vs_baseline"] if best else None,
        "met": bool(best and best["speedup_vs_baseline"] >= FP32_LEVEL_SPEEDUP),
    })
    int8 = rows.get("auto int8")
    if int8 is not None:
        targets.append({
            "target": f"auto int8 >= {INT8_SPEEDUP}x {baseline} at cosine >= {INT8_COSINE} on real sentences",
            "engine": int8.get("chosen"), "value": int8["speedup_vs_baseline"], "cosine": int8.get("min_cosine"),
            "met": int8["speedup_vs_baseline"] >= INT8_SPEEDUP and int8.get("min_cosine", 0) >= INT8_COSINE,
        })
    quantized = [(r["speedup_vs_baseline"], name) for name, r in rows.items() if not name.startswith("auto")
                 and _int8(r.get("precision")) and r.get("min_cosine", 0) >= INT8_COSINE]
    if quantized:  # auto may prefer a float engine; the int8 engines on their own, for the record
        speedup, name = max(quantized)
        targets.append({"target": f"an int8 engine alone >= {INT8_SPEEDUP}x {baseline} at cosine >= {INT8_COSINE}",
                        "engine": name, "value": speedup, "met": speedup >= INT8_SPEEDUP})
    for label, row in rows.items():
        if not label.startswith("auto"):
            continue
        admitted = _admitted(row["precision"])
        singles = [(r["median_ms"], name) for name, r in rows.items()
                   if not name.startswith("auto") and r.get("backend") is not None
                   and r.get("precision") in admitted and r.get("min_cosine", 0) >= row["guard_cosine"]]
        if not singles:
            continue
        fastest_ms, fastest = min(singles)
        # Choosing the same engine as the fastest single one is "not slower" by construction; the
        # two are built and timed apart, so their measured ratio is the benchmark's own noise.
        same = row.get("runs_as") == rows[fastest].get("runs_as")
        targets.append({
            "target": f"{label} never slower than the best single engine it chose from",
            "engine": row.get("chosen"), "best_single": fastest, "value": round(row["median_ms"] / fastest_ms, 3),
            "same_engine": same,
            "met": same or row["median_ms"] <= fastest_ms * (1 + NOISE),
        })
    return targets


def table(summary: dict[str, Any]) -> list[str]:
    """The comparison as text lines (a rich table), fastest first, then the targets."""
    from rich.console import Console
    from rich.table import Table

    out = io.StringIO()
    console = Console(file=out, width=150, force_terminal=False)
    t = Table(title=f"{summary['benchmark']} — {summary['machine']['cpu']}, {summary['machine']['cores']} cores",
              title_justify="left")
    for column in ("engine", "runs as", "median ms", "p90 ms", "vs eager", "min cosine", "max abs err"):
        t.add_column(column, justify="left" if column in ("engine", "runs as") else "right")
    for label, row in sorted(summary["engines"].items(), key=lambda kv: kv[1]["median_ms"]):
        cos, err = row.get("min_cosine"), row.get("max_abs_error")
        t.add_row(label, row.get("chosen") or row.get("runs_as", ""), f"{row['median_ms']:.1f}", f"{row['p90_ms']:.1f}",
                  f"{row['speedup_vs_baseline']:.2f}x", f"{cos:.6f}" if cos is not None else "reference",
                  f"{err:.1e}" if err is not None else "")
    console.print(t)
    for target in summary["targets"]:
        mark = "met" if target["met"] else "NOT met"
        same = " (the same engine: the ratio is timing noise)" if target.get("same_engine") else ""
        console.print(f"{mark:>8}: {target['target']}: {target['value']} ({target.get('engine')}){same}")
    return out.getvalue().rstrip().splitlines()
