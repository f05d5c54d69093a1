"""`optimize.profile`: FLOPs, bytes, latency, memory and roofline of a model or an engine.

    import optimize
    prof = optimize.profile(model, {"input_ids": ids, "attention_mask": mask})   # or an engine / dir
    optimize.profile.render(prof); optimize.profile.save_json(prof, "p.json")

The package is callable: `optimize.profile(...)` is `optimize.profile.profile(...)`, so the
function and its submodules (flops, bytes, timing, memory, roofline, nvml, report, compare)
live under one name. One module per job:

- `flops.py`    FLOP formulas at dispatch level (2·M·N·K; SDPA on every device; causal; kernels)
- `bytes.py`    minimum bytes moved per op → arithmetic intensity
- `recorder.py` the dispatch mode that costs, times and attributes ops to modules
- `timing.py`   CUDA events / perf_counter, warm-up and repeats
- `memory.py`   peak GPU memory / peak RSS, weights size
- `roofline.py` device ceilings micro-benchmark (cached per device), placement against them
- `nvml.py`     NVML sampler thread: utilization, memory, power, SM clock, energy
- `target.py`   what a module, a source or an engine lets the profiler measure
- `runner.py`   the phases of `profile()`
- `report.py`   rich tables, JSON, matplotlib plots
- `compare.py`  speed-ups of one profile over another
"""

from __future__ import annotations

import sys
import types
from typing import Any

from optimize.profile.compare import Comparison, compare, render_comparison
from optimize.profile.records import FLOP_CONVENTION, Ceilings, LatencyStats, ModuleRecord, OpRecord, Profile
from optimize.profile.report import load_json, plot_latency, plot_layers, plot_roofline, render, save_json, write_plots
from optimize.profile.runner import ProfileOptions, count, profile
from optimize.profile.target import resolve


class _CallableModule(types.ModuleType):
    """Makes `optimize.profile(...)` call `profile()` while `optimize.profile.report` etc.
    stay reachable (a function of the same name would shadow the package)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Profile:
        return profile(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "profile", "count", "ProfileOptions", "Profile", "OpRecord", "ModuleRecord", "LatencyStats", "Ceilings", "FLOP_CONVENTION",
    "render", "save_json", "load_json", "write_plots", "plot_roofline", "plot_layers", "plot_latency",
    "compare", "Comparison", "render_comparison", "resolve",
]
