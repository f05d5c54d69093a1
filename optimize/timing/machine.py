"""The machine's CPU use while timing, read from /proc (Linux): what the worker did not use was
used by other processes."""

from __future__ import annotations

import os


def cpu_jiffies() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs since boot from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already counted in user]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def loadavg() -> float | None:
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def others_share(before: tuple[float, float] | None, after: tuple[float, float] | None, ours_ms: float,
                  wall_s: float, cpus: int) -> float | None:
    """The share of all CPUs that processes other than the worker used between two /proc/stat
    readings: machine busy time minus the worker's CPU time, over wall time x CPUs."""
    if before is None or after is None or wall_s <= 0:
        return None
    busy_s = (after[0] - before[0]) / _TICKS
    return min(1.0, max(0.0, (busy_s - ours_ms / 1e3) / (wall_s * cpus)))
