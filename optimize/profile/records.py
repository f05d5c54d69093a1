"""What a profile holds: per-op and per-module records, latency, memory, ceilings, NVML.

Every record is a plain dataclass of numbers, strings and lists, so `Profile.to_json()` and
`Profile.from_json()` round-trip exactly (tested) and a profile written by one machine can be
rendered, plotted or compared on another.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

PROFILE_FORMAT_VERSION = 1

#: The FLOP convention, printed with every report so nobody has to guess it.
FLOP_CONVENTION = (
    "flops = matrix-product FLOPs: 2·M·N·K per product (one multiply and one add per "
    "multiply-accumulate), as torch.utils.flop_counter, fvcore and the TFLOP/s figures of "
    "FlashAttention use; attention counts its two products (4·B·H·pairs·D), causal attention only "
    "the visible (query, key) pairs. vector_flops = elementwise, normalization, softmax and "
    "reduction arithmetic, one per add/mul/exp/compare per element (kiln kernels' convention), "
    "reported separately and never folded into flops. bytes = minimum traffic: each input read "
    "once (broadcast inputs at their stored size), each output written once; views move nothing."
)

T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass `cls` from JSON, recursing into fields typed as nested records."""
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        value = data[f.name]
        nested = _NESTED.get((cls.__name__, f.name))
        if nested is not None and value is not None:
            value = [_from_dict(nested, v) for v in value] if isinstance(value, list) else _from_dict(nested, value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _finite(x: float | None) -> float | None:
    """JSON has no inf/nan; a value that is not finite is stored as null."""
    return x if x is None or math.isfinite(x) else None


@dataclass
class LatencyStats:
    """Distribution of measured durations, in seconds. `samples_s` is kept for whole-model
    latency (the distribution plot) and left empty for per-op and per-module records."""

    n: int
    median_s: float
    p90_s: float
    mean_s: float
    min_s: float
    max_s: float
    std_s: float
    samples_s: list[float] = field(default_factory=list)

    @classmethod
    def from_samples(cls, samples: list[float], keep_samples: bool = False) -> LatencyStats:
        """Stats of `samples` (seconds); raises ValueError when there are none."""
        if not samples:
            raise ValueError("LatencyStats needs at least one sample")
        s = sorted(samples)
        n = len(s)
        mean = sum(s) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / n)
        return cls(n=n, median_s=percentile(s, 50), p90_s=percentile(s, 90), mean_s=mean, min_s=s[0],
                   max_s=s[-1], std_s=std, samples_s=list(samples) if keep_samples else [])


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of an ascending list."""
    if not sorted_values:
        raise ValueError("percentile of an empty list")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class OpRecord:
    """One op call at dispatch level (an `aten::` or `kernels::` op), in execution order.

    `counted` is False when no formula knows the op's FLOPs: its flops are then unknown (0 here)
    and the op is listed in `Profile.uncounted`. `latency` is None when ops were not timed
    (e.g. FLOPs taken from the source program of an engine whose backend runs its own graph).
    """

    index: int
    op: str
    module: str
    kind: str
    flops: int
    vector_flops: int
    bytes: int
    dtype: str
    shapes: list[list[int]]
    counted: bool = True
    latency: LatencyStats | None = None
    bound: str | None = None
    roofline_s: float | None = None
    roofline_fraction: float | None = None

    @property
    def total_flops(self) -> int:
        return self.flops + self.vector_flops

    @property
    def intensity(self) -> float | None:
        """FLOP per byte moved (matrix and vector FLOPs together); None for ops that move nothing."""
        return self.total_flops / self.bytes if self.bytes else None


@dataclass
class ModuleRecord:
    """One module of the model's hierarchy; every number is inclusive of its submodules.

    `latency` is the sum of its ops' measured latencies per repeat (median and p90 over
    repeats): the same definition for `nn.Module`s and for exported graphs, whose modules exist
    only as metadata on graph nodes.
    """

    path: str
    type: str
    parent: str | None
    depth: int
    order: int
    ops: int = 0
    flops: int = 0
    vector_flops: int = 0
    bytes: int = 0
    latency: LatencyStats | None = None
    roofline_s: float | None = None
    roofline_fraction: float | None = None


@dataclass
class UncountedOp:
    """An op the FLOP counter has no formula for; never silently counted as zero."""

    op: str
    calls: int
    example_shapes: list[list[int]]
    reason: str


@dataclass
class MemoryStats:
    """Memory of the profiled run, in bytes. `peak_bytes` is peak allocated device memory on
    GPU, peak resident set size of the process on CPU; `method` says which and how."""

    device: str
    weights_bytes: int
    peak_bytes: int | None
    baseline_bytes: int | None
    method: str


@dataclass
class Ceilings:
    """Device ceilings measured by the built-in micro-benchmark (see `roofline.py`)."""

    device: str
    key: str
    memory_bytes_per_s: float
    matmul_flops_per_s: dict[str, float]
    method: str
    torch: str
    threads: int | None = None
    measured_unix: float = 0.0

    def peak_flops(self, dtype: str) -> tuple[float, str]:
        """Matmul FLOP/s ceiling for `dtype` and the dtype it came from (float32 when
        `dtype` was not measured)."""
        if dtype in self.matmul_flops_per_s:
            return self.matmul_flops_per_s[dtype], dtype
        return self.matmul_flops_per_s["float32"], "float32"


@dataclass
class NvmlSummary:
    """GPU counters sampled by NVML in a background thread while the model ran. With
    `available` False only `reason` is set (no GPU, no driver, no nvidia-ml-py, CPU run)."""

    available: bool
    reason: str = ""
    device: str = ""
    samples: int = 0
    duration_s: float = 0.0
    gpu_util_pct_mean: float | None = None
    gpu_util_pct_max: float | None = None
    memory_used_bytes_max: int | None = None
    power_w_mean: float | None = None
    power_w_max: float | None = None
    sm_clock_mhz_mean: float | None = None
    sm_clock_mhz_min: float | None = None
    sm_clock_mhz_max: float | None = None
    energy_j: float | None = None
    energy_method: str = ""
    inferences: int = 0
    energy_per_inference_j: float | None = None


@dataclass
class Totals:
    """Whole-model sums over ops. `ops_latency_s` is the sum of per-op medians; the rest of the
    whole-model median (`outside_ops_s`) is time no op accounts for (Python, dispatch, launch)."""

    ops: int = 0
    flops: int = 0
    vector_flops: int = 0
    bytes: int = 0
    uncounted_calls: int = 0
    ops_latency_s: float | None = None
    outside_ops_s: float | None = None
    achieved_flops_per_s: float | None = None
    roofline_s: float | None = None
    roofline_fraction: float | None = None


@dataclass
class Profile:
    """Everything `optimize.profile` measured for one model at one input shape.

    `mode` names what was profiled; `measures` says in words what each number means in that
    mode (read it before comparing profiles of different modes).
    """

    name: str
    mode: str
    measures: dict[str, str]
    device: str
    inputs: dict[str, dict[str, Any]]
    convention: str = FLOP_CONVENTION
    totals: Totals = field(default_factory=Totals)
    latency: LatencyStats | None = None
    latency_method: str = ""
    memory: MemoryStats | None = None
    ceilings: Ceilings | None = None
    nvml: NvmlSummary | None = None
    ops: list[OpRecord] = field(default_factory=list)
    modules: list[ModuleRecord] = field(default_factory=list)
    uncounted: list[UncountedOp] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    format_version: int = PROFILE_FORMAT_VERSION

    @property
    def has_hierarchy(self) -> bool:
        """True when ops were timed and attributed to submodules (per-layer numbers exist)."""
        return any(m.latency is not None for m in self.modules if m.depth > 0)

    def module(self, path: str) -> ModuleRecord:
        """The module record at `path`; raises KeyError naming the known paths' count."""
        for m in self.modules:
            if m.path == path:
                return m
        raise KeyError(f"no module {path!r} in profile {self.name!r} ({len(self.modules)} modules)")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        _sanitize(data)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        """Inverse of `to_json`; raises ValueError on another format version."""
        version = data.get("format_version")
        if version != PROFILE_FORMAT_VERSION:
            raise ValueError(f"profile format_version {version!r}; this kiln reads {PROFILE_FORMAT_VERSION}")
        return _from_dict(cls, data)


def _sanitize(value: Any) -> None:
    """Replace non-finite floats by None in place (JSON has no inf/nan)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in list(items):
        if isinstance(item, float):
            value[key] = _finite(item)
        elif isinstance(item, (dict, list)):
            _sanitize(item)


_NESTED: dict[tuple[str, str], type] = {
    ("Profile", "totals"): Totals,
    ("Profile", "latency"): LatencyStats,
    ("Profile", "memory"): MemoryStats,
    ("Profile", "ceilings"): Ceilings,
    ("Profile", "nvml"): NvmlSummary,
    ("Profile", "ops"): OpRecord,
    ("Profile", "modules"): ModuleRecord,
    ("Profile", "uncounted"): UncountedOp,
    ("OpRecord", "latency"): LatencyStats,
    ("ModuleRecord", "latency"): LatencyStats,
}
