"""Memory: peak allocated device memory on GPU, peak resident set size on CPU, weights size."""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path
from types import TracebackType

import torch

from optimize.profile.records import MemoryStats

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def weights_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (tied weights)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            key = (id(t), 0)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _PROC_STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed.
    Writing 5 to /proc/self/clear_refs does it (Linux ≥ 4.0, proc(5))."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: peak memory of the code it wraps.

    GPU: `torch.cuda.max_memory_allocated` after resetting the peak (tensors of the caching
    allocator; cuBLAS workspaces and the CUDA context are not included). CPU: the process's peak
    RSS (VmHWM) after resetting it, so it is this code's peak, not the process's; where the reset
    is not allowed, the peak since the process started, and `method` says so.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.baseline: int | None = None
        self.peak: int | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated (caching allocator; context and workspaces excluded)"
        else:
            rss = _status_kib("VmRSS")
            self.baseline = rss * 1024 if rss is not None else None
            if _reset_peak_rss():
                self.method = "peak RSS of the process during the run (VmHWM, reset before it)"
            else:
                self.method = "peak RSS since the process started (ru_maxrss; VmHWM could not be reset)"
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        hwm = _status_kib("VmHWM") if self.method.startswith("peak RSS of") else None
        if hwm is not None:
            self.peak = hwm * 1024
        else:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak = maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux

    def stats(self, weights: int) -> MemoryStats:
        return MemoryStats(device=str(self.device), weights_bytes=weights, peak_bytes=self.peak,
                           baseline_bytes=self.baseline, method=self.method)


__all__ = ["PeakMemory", "weights_bytes"]
