"""Output: rich tables for the terminal, JSON files, and plots (roofline, per-layer latency,
latency distribution) with matplotlib."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from optimize.profile.records import ModuleRecord, Profile


# ------------------------------------------------------------------------------------------
# Units
# ------------------------------------------------------------------------------------------
def si(value: float | None, unit: str, digits: int = 3) -> str:
    """1.23e9, "FLOP" → "1.23 GFLOP"; None → "-"."""
    if value is None:
        return "-"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}"


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.3g} ms"


def pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.1f}%"


# ------------------------------------------------------------------------------------------
# Which modules are "the layers"
# ------------------------------------------------------------------------------------------
def _weight(m: ModuleRecord) -> float:
    return m.latency.median_s if m.latency is not None else float(m.flops + m.vector_flops)


def layers(profile: Profile, target: int = 8, limit: int = 40) -> list[ModuleRecord]:
    """The modules shown as layers: starting from the root, the heaviest module (by latency,
    or FLOPs when ops were not timed) is replaced by its children until there are at least
    `target` of them (e.g. root → model → embeddings, encoder, pooler → embeddings, layer.0..11,
    pooler), never more than `limit`. Returned in execution order."""
    children: dict[str | None, list[ModuleRecord]] = defaultdict(list)
    for m in profile.modules:
        children[m.parent].append(m)
    roots = children.get(None, [])
    if not roots:
        return []
    shown = list(roots)
    while len(shown) < target:
        expandable = [m for m in shown if children.get(m.path)]
        if not expandable:
            break
        heaviest = max(expandable, key=_weight)
        kids = children[heaviest.path]
        if len(shown) - 1 + len(kids) > limit:
            break
        i = shown.index(heaviest)
        shown[i:i + 1] = kids
    return sorted(shown, key=lambda m: m.order)


def op_types(profile: Profile) -> list[dict[str, Any]]:
    """Ops aggregated by name: calls, FLOPs, bytes, summed median latency, roofline."""
    rows: dict[str, dict[str, Any]] = {}
    for op in profile.ops:
        r = rows.setdefault(op.op, {"op": op.op, "kind": op.kind, "calls": 0, "flops": 0, "vector_flops": 0,
                                     "bytes": 0, "latency_s": None, "roofline_s": None, "bounds": set()})
        r["calls"] += 1
        r["flops"] += op.flops
        r["vector_flops"] += op.vector_flops
        r["bytes"] += op.bytes
        if op.latency is not None:
            r["latency_s"] = (r["latency_s"] or 0.0) + op.latency.median_s
        if op.roofline_s is not None:
            r["roofline_s"] = (r["roofline_s"] or 0.0) + op.roofline_s
        if op.bound:
            r["bounds"].add(op.bound)
    out = list(rows.values())
    out.sort(key=lambda r: (r["latency_s"] or 0.0, r["flops"] + r["vector_flops"]), reverse=True)
    return out


# ------------------------------------------------------------------------------------------
# Terminal
# ------------------------------------------------------------------------------------------
def nvml_line(profile: Profile) -> str:
    n = profile.nvml
    if n is None:
        return "NVML sampling off"
    if not n.available:
        return n.reason
    parts = [n.device, f"util {n.gpu_util_pct_mean:.0f}% (max {n.gpu_util_pct_max:.0f}%)" if n.gpu_util_pct_mean is not None else "",
             f"mem {si(n.memory_used_bytes_max, 'B')}" if n.memory_used_bytes_max is not None else "",
             f"power {n.power_w_mean:.0f} W (max {n.power_w_max:.0f} W)" if n.power_w_mean is not None else "",
             f"SM clock {n.sm_clock_mhz_mean:.0f} MHz" if n.sm_clock_mhz_mean is not None else "",
             f"{n.energy_per_inference_j * 1e3:.3g} mJ/inference" if n.energy_per_inference_j is not None else "",
             f"{n.samples} samples"]
    return ", ".join(p for p in parts if p)


def summary_table(profile: Profile) -> Any:
    p, t = profile, profile.totals
    table = Table(title=escape(f"profile {p.name} · {p.mode} · {p.device}"), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("inputs", escape(", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in p.inputs.items())))
    if p.ops:
        table.add_row("FLOPs (2·M·N·K)", f"{si(t.flops, 'FLOP')} matrix + {si(t.vector_flops, 'FLOP')} vector")
        table.add_row("bytes (minimum)", f"{si(t.bytes, 'B')}, intensity "
                      f"{(t.flops + t.vector_flops) / t.bytes:.3g} FLOP/B" if t.bytes else "-")
    if p.latency is not None:
        lat = p.latency
        table.add_row("latency", f"median {ms(lat.median_s)}, p90 {ms(lat.p90_s)}, min {ms(lat.min_s)}, max {ms(lat.max_s)} "
                      f"over {lat.n} ({p.latency_method})")
    if t.achieved_flops_per_s is not None:
        table.add_row("achieved", f"{si(t.achieved_flops_per_s, 'FLOP/s')} (matrix FLOPs / median latency)")
    if t.ops_latency_s is not None:
        table.add_row("time in ops", f"{ms(t.ops_latency_s)}; outside ops {ms(t.outside_ops_s)}")
    if p.ceilings is not None:
        c = p.ceilings
        peaks = ", ".join(f"{d} {si(v, 'FLOP/s')}" for d, v in sorted(c.matmul_flops_per_s.items()))
        table.add_row("ceilings", escape(f"{si(c.memory_bytes_per_s, 'B/s')} memory; matmul {peaks}"))
        if t.roofline_fraction is not None:
            table.add_row("roofline", f"{pct(t.roofline_fraction)} of the bound ({ms(t.roofline_s)} at the roof)")
    if p.memory is not None:
        m = p.memory
        table.add_row("memory", f"weights {si(m.weights_bytes, 'B')}, peak {si(m.peak_bytes, 'B')} "
                      f"(baseline {si(m.baseline_bytes, 'B')})")
    table.add_row("NVML", escape(nvml_line(p)))
    if p.ops:
        if p.uncounted:
            table.add_row("[red]uncounted ops[/]", escape(", ".join(f"{u.op} ×{u.calls}" for u in p.uncounted)))
        else:
            table.add_row("uncounted ops", "none: every op has a FLOP formula")
    return table


def layers_table(profile: Profile) -> Any:
    rows = layers(profile)
    total = profile.latency.median_s if profile.latency is not None else None
    table = Table(title="layers (inclusive of submodules)", title_justify="left")
    for col in ("module", "type", "FLOPs", "bytes", "median", "p90", "% time", "FLOP/s", "roofline"):
        table.add_column(col, justify="left" if col in ("module", "type") else "right")
    for m in rows:
        med = m.latency.median_s if m.latency is not None else None
        table.add_row(escape(m.path or "(root)"), escape(m.type), si(m.flops, ""), si(m.bytes, "B"), ms(med),
                      ms(m.latency.p90_s if m.latency else None),
                      pct(med / total) if med is not None and total else "-",
                      si(m.flops / med, "") if med else "-", pct(m.roofline_fraction))
    return table


def ops_table(profile: Profile, max_rows: int = 15) -> Any:
    rows = op_types(profile)
    op_time = sum(r["latency_s"] or 0.0 for r in rows)
    table = Table(title=f"ops by type (top {min(max_rows, len(rows))} of {len(rows)})", title_justify="left")
    for col in ("op", "kind", "calls", "FLOPs", "vector", "bytes", "FLOP/B", "time", "% ops", "roofline", "bound"):
        table.add_column(col, justify="left" if col in ("op", "kind", "bound") else "right")
    for r in rows[:max_rows]:
        work = r["flops"] + r["vector_flops"]
        table.add_row(escape(r["op"]), r["kind"], str(r["calls"]), si(r["flops"], ""), si(r["vector_flops"], ""),
                      si(r["bytes"], "B"), f"{work / r['bytes']:.3g}" if r["bytes"] else "-", ms(r["latency_s"]),
                      pct(r["latency_s"] / op_time) if r["latency_s"] is not None and op_time else "-",
                      pct(r["roofline_s"] / r["latency_s"]) if r["roofline_s"] is not None and r["latency_s"] else "-",
                      "/".join(sorted(r["bounds"])))
    return table


def render(profile: Profile, console: Any = None, max_rows: int = 15) -> None:
    """Print the profile: summary, layers, ops by type, what each number measures, notes."""
    console = console or Console()
    console.print(summary_table(profile))
    if any(m.depth > 0 for m in profile.modules):
        console.print(layers_table(profile))
    if profile.ops:
        console.print(ops_table(profile, max_rows))
    for key, text in profile.measures.items():
        console.print(f"[dim]{key}: {escape(text)}[/]")
    console.print(f"[dim]convention: {escape(profile.convention)}[/]")
    for note in profile.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")


# ------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------
def save_json(profile: Profile, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_json(), indent=1, allow_nan=False) + "\n")
    return path


def load_json(path: str | Path) -> Profile:
    """Read a profile written by `save_json`; raises ValueError on another format version."""
    return Profile.from_json(json.loads(Path(path).read_text()))


# ------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    # why: matplotlib takes ~1.7 s to import (measured): only plots need it
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    # why: matplotlib takes ~1.7 s to import (measured): only plots need it
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    """Lay out `fig`, write it to `path` (making its directory) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


_KIND_COLORS = {"matmul": "tab:blue", "attention": "tab:red", "conv": "tab:purple", "normalization": "tab:green",
                "softmax": "tab:orange", "elementwise": "tab:olive", "reduction": "tab:cyan", "kernel": "tab:pink",
                "data": "tab:gray", "unknown": "black"}


def plot_roofline(profile: Profile, path: str | Path) -> Path:
    """Roofline PNG: every timed op as a point (intensity, achieved FLOP/s) under the memory
    slope and the matmul ceilings; raises ValueError without ceilings or timed ops."""
    if profile.ceilings is None:
        raise ValueError("profile has no ceilings (run with roofline=True)")
    points = [op for op in profile.ops if op.latency is not None and op.total_flops > 0 and op.bytes > 0]
    if not points:
        raise ValueError("profile has no timed ops that do arithmetic")
    plt = _pyplot()
    c = profile.ceilings
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    xs = [op.total_flops / op.bytes for op in points]
    lo, hi = min(xs + [0.01]) / 2, max(xs + [1000.0]) * 2
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for dtype, peak in sorted(c.matmul_flops_per_s.items()):
        ax.plot(grid, [min(peak, c.memory_bytes_per_s * x) for x in grid], lw=1.5, label=f"roof {dtype}: {si(peak, 'FLOP/s')}")
    by_kind: dict[str, list[Any]] = defaultdict(list)
    for op in points:
        by_kind[op.kind].append(op)
    for kind, ops in sorted(by_kind.items()):
        ax.scatter([o.total_flops / o.bytes for o in ops], [o.total_flops / o.latency.median_s for o in ops],  # type: ignore[union-attr]
                   s=18, alpha=0.7, color=_KIND_COLORS.get(kind, "black"), label=f"{kind} ({len(ops)})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte, matrix + vector FLOPs over minimum bytes)")
    ax.set_ylabel("achieved FLOP/s")
    skipped = len(profile.ops) - len(points)
    ax.set_title(f"{profile.name} on {profile.device}\nmemory {si(c.memory_bytes_per_s, 'B/s')}; "
                 f"{skipped} ops without arithmetic or timing not shown", fontsize=9)
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, path)


def plot_layers(profile: Profile, path: str | Path) -> Path:
    """Per-layer latency bar chart (median, with p90 whiskers), layers as in `layers()`;
    raises ValueError when the profile has no per-module latency."""
    rows = [m for m in layers(profile) if m.latency is not None]
    if not rows:
        raise ValueError(f"profile {profile.name!r} ({profile.mode}) has no per-module latency")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.35 * len(rows) + 1.5)), dpi=110)
    names = [m.path or "(root)" for m in rows][::-1]
    med = [m.latency.median_s * 1e3 for m in rows][::-1]  # type: ignore[union-attr]
    p90 = [m.latency.p90_s * 1e3 for m in rows][::-1]  # type: ignore[union-attr]
    ax.barh(names, med, xerr=[[0] * len(med), [max(b - a, 0.0) for a, b in zip(med, p90)]], color="tab:blue", alpha=0.8)
    ax.set_xlabel("latency per inference (ms): median, whisker to p90; sum of the layer's op latencies")
    ax.set_title(f"{profile.name}: per-layer latency on {profile.device}", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    return _save(plt, fig, path)


def plot_latency(profile: Profile, path: str | Path) -> Path:
    """Histogram of whole-model latency samples with median and p90 marked."""
    if profile.latency is None or not profile.latency.samples_s:
        raise ValueError("profile has no whole-model latency samples")
    plt = _pyplot()
    lat = profile.latency
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.hist([s * 1e3 for s in lat.samples_s], bins=min(30, max(5, lat.n // 2)), color="tab:gray")
    ax.axvline(lat.median_s * 1e3, color="tab:blue", label=f"median {ms(lat.median_s)}")
    ax.axvline(lat.p90_s * 1e3, color="tab:red", label=f"p90 {ms(lat.p90_s)}")
    ax.set_xlabel(f"whole-model latency (ms), {profile.latency_method}")
    ax.set_ylabel("inferences")
    ax.set_title(f"{profile.name} ({profile.mode}) on {profile.device}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def write_plots(profile: Profile, directory: str | Path) -> tuple[list[Path], list[str]]:
    """Every plot the profile supports, into `directory`; returns (written, skipped-with-reason)."""
    try:
        _pyplot()
    except ImportError:
        return [], ["all plots: matplotlib is not installed (pip install matplotlib)"]
    directory = Path(directory)
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in profile.name)
    written, skipped = [], []
    for suffix, fn in (("roofline", plot_roofline), ("layers", plot_layers), ("latency", plot_latency)):
        try:
            written.append(fn(profile, directory / f"{stem}-{suffix}.png"))
        except ValueError as exc:
            skipped.append(f"{suffix}: {exc}")
    return written, skipped


__all__ = ["render", "save_json", "load_json", "plot_roofline", "plot_layers", "plot_latency", "write_plots", "layers",
           "op_types", "si", "ms", "pct"]
