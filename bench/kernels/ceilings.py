"""Measured device ceilings: the bandwidth and FLOP rate every kernel number is divided by.

Datasheet peaks are not reachable (an H100 SXM's "3.35 TB/s" copies at about 2.9-3.0 TB/s;
its "989 TFLOP/s" dense bf16 sustains roughly 600-750 in cuBLAS), so a kernel at "80 % of
peak" says little. Here the ceilings are what this device does today: a large device-to-device
copy and a large bf16 matmul, each timed once per session with CUDA events.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

__all__ = ["Ceilings", "measure_ceilings", "measure_copy_bandwidth", "measure_matmul_flops", "device_time_ms"]

# 1 GiB per buffer: far beyond L2 (50 MB on H100, 40 MB on A100), so the copy streams HBM.
_COPY_BYTES = 1 << 30
# 8192^3 bf16: about 1.1 TFLOP per call, long enough that launch overhead is noise, and the
# size cuBLAS reaches its plateau at on A100 and H100.
_MATMUL_N = 8192


def device_time_ms(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median device time of ``fn()`` in milliseconds, CUDA events, L2 flushed between calls
    (``triton.testing.do_bench``)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


@dataclass(frozen=True)
class Ceilings:
    """What one GPU sustains, measured.

    Attributes:
        device: ``torch.cuda.get_device_name``.
        copy_bytes_per_s: device-to-device copy rate, bytes read plus bytes written per second.
        bf16_flops_per_s: dense bf16 matmul rate, FLOP per second (2 n^3 per n x n product).
    """

    device: str
    copy_bytes_per_s: float
    bf16_flops_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def measure_copy_bandwidth(device: torch.device, nbytes: int = _COPY_BYTES) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` of ``nbytes`` (read + write counted)."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = device_time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def measure_matmul_flops(device: torch.device, n: int = _MATMUL_N) -> float:
    """FLOP per second of an ``n x n`` by ``n x n`` bf16 matmul."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    ms = device_time_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3)


@functools.lru_cache(maxsize=None)
def measure_ceilings(device_index: int = 0) -> Ceilings:
    """Measure (once per process and device) the copy and matmul ceilings of a CUDA device."""
    device = torch.device("cuda", device_index)
    return Ceilings(
        device=torch.cuda.get_device_name(device),
        copy_bytes_per_s=measure_copy_bandwidth(device),
        bf16_flops_per_s=measure_matmul_flops(device),
    )
