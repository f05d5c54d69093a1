"""`--compare A B`: speed-up of B over A, per layer where both have layers, else whole-model.

Per-layer numbers need a module hierarchy with timed ops in both profiles (nn.Modules, model
sources, eager engines). Engines whose backend runs its own graph (ONNX Runtime, TensorRT) have
none, so only whole-model latency is compared, and the comparison says so.

Module paths differ by wrapper prefixes (a source's `model.encoder.layer.0` is an eager
engine's `module.model.encoder.layer.0`), so paths are matched after stripping the leading
segments that make the two hierarchies overlap most.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from optimize.profile.records import Profile
from optimize.profile.report import layers, ms

_MAX_STRIP = 3


@dataclass
class LayerSpeedup:
    """One layer in both profiles: median latency in each, `speedup` = a_s / b_s (> 1: B faster)."""

    path: str
    type: str
    a_s: float
    b_s: float
    speedup: float


@dataclass
class Comparison:
    """B against A. `per_layer` False means only whole-model latency was comparable; `reason`
    says why."""

    a: str
    b: str
    a_mode: str
    b_mode: str
    a_s: float
    b_s: float
    speedup: float
    per_layer: bool
    reason: str = ""
    layers: list[LayerSpeedup] = field(default_factory=list)
    a_flops: int = 0
    b_flops: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _strip(path: str, k: int) -> str | None:
    parts = path.split(".")
    return ".".join(parts[k:]) if len(parts) > k else None


def _alignment(a: list[str], b: list[str]) -> tuple[int, int]:
    """Leading segments to strip from A's and B's paths so the most paths coincide."""
    best = (0, 0, -1)
    for ka in range(_MAX_STRIP + 1):
        sa = {_strip(p, ka) for p in a} - {None}
        for kb in range(_MAX_STRIP + 1):
            overlap = len(sa & ({_strip(p, kb) for p in b} - {None}))
            if overlap > best[2] or (overlap == best[2] and ka + kb < best[0] + best[1]):
                best = (ka, kb, overlap)
    return best[0], best[1]


def _why_no_layers(p: Profile) -> str:
    if any(m.depth > 0 for m in p.modules) or p.measures.get("module_latency", "").startswith("none"):
        return f"{p.name} ({p.mode}) has no per-layer latency: {p.measures.get('module_latency', 'not measured')}"
    why = next((n for n in p.notes if "module hierarchy" in n), "")
    return f"{p.name} ({p.mode}) has no submodules to compare" + (f" ({why})" if why else "")


def compare(a: Profile, b: Profile) -> Comparison:
    """Speed-up of profile `b` over profile `a` (both must have whole-model latency)."""
    if a.latency is None or b.latency is None:
        raise ValueError("both profiles need whole-model latency")
    result = Comparison(a=a.name, b=b.name, a_mode=a.mode, b_mode=b.mode, a_s=a.latency.median_s, b_s=b.latency.median_s,
                        speedup=a.latency.median_s / b.latency.median_s, per_layer=False,
                        a_flops=a.totals.flops, b_flops=b.totals.flops)
    missing = [p for p in (a, b) if not p.has_hierarchy]
    if missing:
        result.reason = "; ".join(_why_no_layers(p) for p in missing) + " — whole-model latency compared only"
        return result
    a_mods = [m for m in a.modules if m.depth > 0 and m.latency is not None]
    b_mods = {m.path: m for m in b.modules if m.depth > 0 and m.latency is not None}
    ka, kb = _alignment([m.path for m in a_mods], list(b_mods))
    b_by_key = {_strip(p, kb): m for p, m in b_mods.items() if _strip(p, kb) is not None}
    wanted = {m.path for m in layers(a)}
    for m in a_mods:
        key = _strip(m.path, ka)
        other = b_by_key.get(key)
        if m.path not in wanted or other is None or m.latency is None or other.latency is None:
            continue
        result.layers.append(LayerSpeedup(path=key or m.path, type=m.type, a_s=m.latency.median_s,
                                          b_s=other.latency.median_s,
                                          speedup=m.latency.median_s / other.latency.median_s))
    result.per_layer = bool(result.layers)
    if not result.per_layer:
        result.reason = "no layer of one profile matches a layer of the other — whole-model latency compared only"
    return result


def render_comparison(c: Comparison, console: Any = None) -> None:
    """Print the comparison as a table (per layer) or one line (whole model only)."""
    console = console or Console()
    table = Table(title=escape(f"speed-up of B = {c.b} ({c.b_mode}) over A = {c.a} ({c.a_mode})"), title_justify="left")
    for col in ("layer", "type", "A median", "B median", "speed-up"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for row in c.layers:
        table.add_row(escape(row.path), escape(row.type), ms(row.a_s), ms(row.b_s), f"{row.speedup:.2f}×")
    table.add_row("[bold]whole model[/]", "", ms(c.a_s), ms(c.b_s), f"[bold]{c.speedup:.2f}×[/]")
    console.print(table)
    if c.reason:
        console.print(f"[yellow]note:[/] {escape(c.reason)}")
    if c.a_flops and c.b_flops and c.a_flops != c.b_flops:
        console.print(f"[yellow]note:[/] the two count different matrix FLOPs ({c.a_flops} vs {c.b_flops}): "
                      "they do not run the same math")


__all__ = ["compare", "Comparison", "LayerSpeedup", "render_comparison"]
