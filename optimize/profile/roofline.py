"""Roofline: device ceilings from a built-in micro-benchmark, cached per device.

Ceilings are what this PyTorch build reaches on this device, not datasheet numbers: memory
bandwidth from a large device-to-device copy (read + write counted), matmul FLOP/s per dtype
from square `torch.mm`. They are measured once per device (and CPU thread count, and torch
version) and cached as JSON under the user cache dir, so a profile costs the benchmark once.

Each op is then placed against its bound: `max(flops / peak_flops[dtype], bytes / bandwidth)`
is the fastest it could run; `roofline_fraction` = that bound / measured time (1.0 = at the
roof). Vector FLOPs are placed against the matmul ceiling too, which makes the compute bound of
elementwise ops optimistic; those ops are memory-bound by a wide margin anyway.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import torch

from optimize.profile.records import Ceilings
from optimize.profile.timing import Stopwatch

CACHE_ENV = "KILN_CACHE_DIR"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Sizes: the copy must not fit in the last-level cache (EPYC Zen 3: 32 MiB L3; H100: 50 MiB L2),
# the matmul must be large enough to saturate the units yet take milliseconds, not seconds.
_COPY_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}
_MATMUL_N = {("cpu", "float32"): 1024, ("cpu", "bfloat16"): 512, ("cpu", "float16"): 512,
             ("cuda", "float32"): 4096, ("cuda", "bfloat16"): 8192, ("cuda", "float16"): 8192}
_REPEATS = 5


def cache_dir() -> Path:
    """`$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kiln"


def device_name(device: torch.device) -> str:
    """A human name: the GPU's, or the CPU model's with the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = match.group(1).strip() if match else model
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def device_key(device: torch.device) -> str:
    """Cache key: device name, torch version, and on GPU whether fp32 matmuls may use TF32."""
    parts = [device_name(device), f"torch{torch.__version__}"]
    if device.type == "cuda":
        parts.append("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee-fp32")
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", "-".join(parts)).strip("_")


def _best_seconds(fn, device: torch.device) -> float:
    """Fastest of `_REPEATS` timed calls after one warm-up (the ceiling is the best case)."""
    watch = Stopwatch(device.type == "cuda")
    fn()
    best = float("inf")
    for _ in range(_REPEATS):
        watch.sync()
        a = watch.mark()
        fn()
        b = watch.mark()
        watch.sync()
        best = min(best, watch.seconds(a, b))
    return best


def measure_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Bytes/s of a device-to-device copy of `nbytes` (each byte read once and written once)."""
    nbytes = nbytes or _COPY_BYTES[device.type]
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds


def measure_matmul(device: torch.device, dtype: str, n: int | None = None) -> float:
    """FLOP/s of an n×n×n `torch.mm` in `dtype` (2·n³ FLOPs)."""
    n = n or _MATMUL_N[(device.type, dtype)]
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=_DTYPES[dtype])
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=_DTYPES[dtype])
    out = torch.empty(n, n, device=device, dtype=_DTYPES[dtype])
    seconds = _best_seconds(lambda: torch.mm(a, b, out=out), device)
    return 2 * n**3 / seconds


def _cache_file(directory: Path, key: str) -> Path:
    return directory / "roofline" / f"{key}.json"


def _read(path: Path) -> Ceilings | None:
    try:
        data = json.loads(path.read_text())
        return Ceilings(**data)
    except (OSError, ValueError, TypeError):  # absent, corrupt or from another version: re-measure
        return None


def ceilings_for(device: torch.device | str, dtypes: set[str] | None = None, *, directory: Path | None = None,
                 refresh: bool = False) -> Ceilings:
    """The ceilings of `device`, from the cache when it has them, else measured and cached.

    `dtypes` lists the matmul dtypes wanted (float32 is always included; dtypes the benchmark
    does not know, such as int64, are ignored). A cached file missing a dtype gets it measured
    and added. `refresh` re-measures everything.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    wanted = ({"float32"} | set(dtypes or ())) & set(_DTYPES)
    key = device_key(device)
    path = _cache_file(directory or cache_dir(), key)
    cached = None if refresh else _read(path)
    if cached is not None and wanted <= set(cached.matmul_flops_per_s):
        return cached
    flops = dict(cached.matmul_flops_per_s) if cached else {}
    for dtype in sorted(wanted - set(flops)):
        flops[dtype] = measure_matmul(device, dtype)
    ceilings = Ceilings(
        device=device_name(device),
        key=key,
        memory_bytes_per_s=cached.memory_bytes_per_s if cached else measure_bandwidth(device),
        matmul_flops_per_s=flops,
        method=(f"best of {_REPEATS}: copy of {_COPY_BYTES[device.type] >> 20} MiB (read+write); square torch.mm "
                + ", ".join(f"{d} n={_MATMUL_N[(device.type, d)]}" for d in sorted(flops))),
        torch=torch.__version__,
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        measured_unix=time.time(),
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ceilings.__dict__, indent=2) + "\n")
        tmp.replace(path)
    except OSError:  # a read-only cache only costs re-measuring next time
        pass
    return ceilings


def place(total_flops: int, nbytes: int, seconds: float | None, dtype: str,
          ceilings: Ceilings) -> tuple[str | None, float | None, float | None]:
    """(bound, roofline_s, fraction) of work taking `seconds`: which resource bounds it
    ("compute" | "memory"), the fastest it could run, and that over the measured time."""
    if total_flops <= 0 and nbytes <= 0:
        return None, None, None
    peak, _ = ceilings.peak_flops(dtype)
    compute_s = total_flops / peak
    memory_s = nbytes / ceilings.memory_bytes_per_s
    bound_s = max(compute_s, memory_s)
    fraction = bound_s / seconds if seconds else None
    return ("compute" if compute_s >= memory_s else "memory"), bound_s, fraction


__all__ = ["ceilings_for", "place", "measure_bandwidth", "measure_matmul", "cache_dir", "device_key", "device_name"]
