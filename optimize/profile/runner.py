"""`profile()`: the phases of a profile, in the order they run.

1. warm-up (untimed);
2. memory: one inference inside `PeakMemory`;
3. whole-model latency: `repeats` inferences, NVML sampled in the background;
4. ops: one instrumented warm-up, then `op_repeats` instrumented inferences (the first also
   counted); an engine without a program only has its source-equivalent counted, once;
5. roofline: ceilings from the cache or the micro-benchmark, every op placed against them;
6. chrome trace (optional): one more inference under `torch.profiler`.
Instrumented runs are never used for whole-model numbers: the dispatch mode costs time.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from optimize.profile.memory import PeakMemory
from optimize.profile.nvml import NvmlSampler
from optimize.profile.recorder import ROOT, Recording, record
from optimize.runtime.errors import ConfigError
from optimize.profile.records import (
    LatencyStats,
    ModuleRecord,
    OpRecord,
    Profile,
    Totals,
    UncountedOp,
)
from optimize.profile.roofline import ceilings_for, place
from optimize.profile.roofline import device_name
from optimize.profile.target import Target, resolve
from optimize.profile.timing import Stopwatch, time_calls, warm_up


@dataclass
class ProfileOptions:
    """How much to measure. `op_repeats` defaults to min(repeats, 10): per-op timing runs
    under the dispatch mode and costs more than a plain inference. Raises `ConfigError` (a
    `ValueError`) naming the field on a bad value."""

    warmup: int = 3
    repeats: int = 20
    op_repeats: int | None = None
    roofline: bool = True
    refresh_ceilings: bool = False
    ceilings_dir: Path | None = None
    nvml: bool = True
    nvml_interval_s: float = 0.01
    trace: Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup must be an integer >= 0; got {self.warmup!r}")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise ConfigError(f"repeats must be an integer >= 1; got {self.repeats!r}")
        if self.op_repeats is None:
            self.op_repeats = min(self.repeats, 10)
        if not isinstance(self.op_repeats, int) or self.op_repeats < 1:
            raise ConfigError(f"op_repeats must be an integer >= 1; got {self.op_repeats!r}")
        if not self.nvml_interval_s > 0:
            raise ConfigError(f"nvml_interval_s must be > 0; got {self.nvml_interval_s!r}")
        if self.trace is not None:
            self.trace = Path(self.trace)


def profile(model_or_engine: Any, inputs: Any = None, *, batch: int | None = None, seq: int | None = None,
            device: str | torch.device | None = None, options: ProfileOptions | None = None,
            **option_overrides: Any) -> Profile:
    """Profile a model or an engine on `inputs` and return a `Profile`.

    `model_or_engine`: an `nn.Module` (then `inputs` is a dict of keyword tensors, a tuple of
    positional ones, or a tensor), an `Engine`, an engine directory or a model source; for the
    last three `inputs` may be omitted and are then made at `batch` × `seq`. Keyword options
    (`warmup=`, `repeats=`, `trace=`, ...) override fields of `options` (`ProfileOptions`).
    The profile's `measures` says what each number means for this kind of target.
    Raises `ConfigError` on bad options or inputs, `OptimizeError`s of loading otherwise.
    """
    opts = dataclasses.replace(options or ProfileOptions(), **option_overrides)
    target = resolve(model_or_engine, inputs, batch=batch, seq=seq, device=device, seed=opts.seed)
    return profile_target(target, opts)


def profile_target(target: Target, opts: ProfileOptions) -> Profile:
    """Run every phase on a resolved target (see the module docstring)."""
    cuda = target.device.type == "cuda"
    method = Stopwatch(cuda).method
    assert opts.op_repeats is not None
    warm_up(target.run, opts.warmup, cuda)

    with PeakMemory(target.device) as peak:
        target.run()
    memory = peak.stats(target.weights_bytes)

    sampler = NvmlSampler(target.sample_device or target.device, opts.nvml_interval_s) if opts.nvml else None
    if sampler is not None:
        with sampler:
            samples = time_calls(target.run, opts.repeats, cuda)
    else:
        samples = time_calls(target.run, opts.repeats, cuda)
    latency = LatencyStats.from_samples(samples, keep_samples=True)
    nvml = sampler.summary(opts.repeats) if sampler is not None else None

    timed = target.program is not None
    recording = Recording()
    counted_program = target.program or target.flop_program
    if counted_program is not None:
        runs = opts.op_repeats + 1 if timed else 1  # one instrumented warm-up, dropped below
        recording = record(counted_program, target.args, target.kwargs, cuda=cuda and timed, runs=runs, time_ops=timed)
        recording.durations = recording.durations[1:]

    ops, modules, uncounted, totals = _records(recording, latency)
    prof = Profile(
        name=target.name,
        mode=target.mode,
        measures=_measures(target, opts, method, memory.method),
        device=_device_name(target.device),
        inputs={k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in target.inputs.items()},
        totals=totals,
        latency=latency,
        latency_method=method,
        memory=memory,
        nvml=nvml,
        ops=ops,
        modules=modules,
        uncounted=uncounted,
        notes=list(target.notes) + ([f"{recording.dropped_runs} instrumented run(s) dropped: they ran different ops"]
                                    if recording.dropped_runs else []),
        settings={"warmup": opts.warmup, "repeats": opts.repeats, "op_repeats": opts.op_repeats if timed else 0,
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "seed": opts.seed},
    )
    if opts.roofline:
        dtypes = {op.dtype for op in ops if op.flops > 0}
        prof.ceilings = ceilings_for(target.device, dtypes, directory=opts.ceilings_dir, refresh=opts.refresh_ceilings)
        apply_roofline(prof)
    if opts.trace is not None:
        write_trace(target, opts.trace)
        prof.notes.append(f"chrome trace of one inference: {opts.trace}")
    return prof


def count(model_or_engine: Any, inputs: Any = None, *, batch: int | None = None, seq: int | None = None,
          device: str | torch.device | None = None, seed: int = 0) -> Profile:
    """FLOPs and bytes only: one instrumented inference, no timing, memory, roofline or NVML.
    Same targets and arguments as `profile`; the result has ops, modules and uncounted ops."""
    target = resolve(model_or_engine, inputs, batch=batch, seq=seq, device=device, seed=seed)
    program = target.program or target.flop_program
    recording = record(program, target.args, target.kwargs, cuda=False, runs=1, time_ops=False) if program else Recording()
    ops, modules, uncounted, totals = _records(recording, None)
    flops = _measures(target, ProfileOptions(), "", "")["flops"]
    return Profile(name=target.name, mode=target.mode, device=_device_name(target.device),
                   measures={"flops": flops, "latency": "not measured (count only)"},
                   inputs={k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                           for k, v in target.inputs.items()},
                   totals=totals, ops=ops, modules=modules, uncounted=uncounted, notes=list(target.notes))


def _device_name(device: torch.device) -> str:
    return f"{device.type}: {device_name(device)}"


def _measures(target: Target, opts: ProfileOptions, method: str, memory_method: str) -> dict[str, str]:
    latency = f"whole inference, {method}, {opts.warmup} warm-up + {opts.repeats} timed"
    if target.program is not None:
        what = "the engine's exported program (program.pt2), the code the engine runs" if target.mode.startswith("engine") \
            else "the module's eager forward"
        return {
            "flops": f"every op dispatched by {what}, at dispatch level",
            "latency": latency + (" (the program called directly; Engine.run adds input validation only)"
                                  if target.mode.startswith("engine") else ""),
            "op_latency": f"each op timed around its dispatch ({method}) in {opts.op_repeats} instrumented inferences "
                          "after one instrumented warm-up",
            "module_latency": "sum of the module's op latencies in each instrumented inference (time between ops, "
                              "e.g. Python, is in totals.outside_ops_s)",
            "memory": memory_method,
        }
    backend = target.mode.partition(":")[2]
    return {
        "flops": ("the source-equivalent program (the engine's source model at the same shapes), counted on "
                  f"{target.device.type}, not timed: {backend} runs its own, possibly fused, graph of the same math")
        if target.flop_program is not None else "not counted (source program unavailable)",
        "latency": latency + f" through Engine.run ({backend}; input validation and host copies included)",
        "op_latency": f"none: {backend} runs its own graph; no per-op timing",
        "module_latency": f"none: {backend} engines have no module hierarchy; compare whole-engine latency",
        "memory": memory_method + "; weights_bytes = engine payload on disk",
    }


def _records(recording: Recording, whole: LatencyStats | None) -> tuple[list[OpRecord], list[ModuleRecord], list[UncountedOp], Totals]:
    runs = recording.durations
    ops: list[OpRecord] = []
    for i, ev in enumerate(recording.events):
        lat = LatencyStats.from_samples([run[i] for run in runs]) if runs else None
        ops.append(OpRecord(index=i, op=ev.op, module=ev.module, kind=ev.count.kind, flops=ev.count.flops,
                            vector_flops=ev.count.vector_flops, bytes=ev.bytes, dtype=ev.dtype, shapes=ev.shapes,
                            counted=ev.count.counted, latency=lat))

    infos = recording.modules
    depth: dict[str, int] = {}

    def depth_of(path: str) -> int:
        if path not in depth:
            parent = infos[path].parent if path in infos else None
            depth[path] = 0 if parent is None else depth_of(parent) + 1
        return depth[path]

    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    times: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(runs))
    for i, op in enumerate(ops):
        path: str | None = op.module if op.module in infos else ROOT
        while path is not None:
            s = sums[path]
            s[0] += 1
            s[1] += op.flops
            s[2] += op.vector_flops
            s[3] += op.bytes
            t = times[path]
            for r, run in enumerate(runs):
                t[r] += run[i]
            path = infos[path].parent
    modules = []
    for path, info in sorted(infos.items(), key=lambda kv: kv[1].order):
        if path not in sums and path != ROOT:
            continue  # a module that dispatched no op (e.g. a container)
        n, fl, vfl, nb = sums.get(path, [0, 0, 0, 0])
        modules.append(ModuleRecord(path=path, type=info.type, parent=info.parent, depth=depth_of(path), order=info.order,
                                    ops=n, flops=fl, vector_flops=vfl, bytes=nb,
                                    latency=LatencyStats.from_samples(times[path]) if runs and path in times else None))

    grouped: dict[tuple[str, str], list[int]] = {}
    for i, ev in enumerate(recording.events):
        if not ev.count.counted:
            grouped.setdefault((ev.op, ev.count.reason), []).append(i)
    uncounted = [UncountedOp(op=op, calls=len(idx), example_shapes=recording.events[idx[0]].shapes, reason=reason)
                 for (op, reason), idx in grouped.items()]

    totals = Totals(ops=len(ops), flops=sum(o.flops for o in ops), vector_flops=sum(o.vector_flops for o in ops),
                    bytes=sum(o.bytes for o in ops), uncounted_calls=sum(u.calls for u in uncounted))
    if runs:
        totals.ops_latency_s = sum(o.latency.median_s for o in ops if o.latency is not None)
        if whole is not None:
            totals.outside_ops_s = whole.median_s - totals.ops_latency_s
    if whole is not None and whole.median_s > 0 and ops:
        totals.achieved_flops_per_s = totals.flops / whole.median_s
    return ops, modules, uncounted, totals


def apply_roofline(prof: Profile) -> None:
    """Place every op, module and the whole model against `prof.ceilings`."""
    ceilings = prof.ceilings
    assert ceilings is not None
    bound_by_module: dict[str, float] = defaultdict(float)
    parents = {m.path: m.parent for m in prof.modules}
    for op in prof.ops:
        seconds = op.latency.median_s if op.latency is not None else None
        op.bound, op.roofline_s, op.roofline_fraction = place(op.total_flops, op.bytes, seconds, op.dtype, ceilings)
        path: str | None = op.module if op.module in parents else ROOT
        while path is not None:
            bound_by_module[path] += op.roofline_s or 0.0
            path = parents.get(path)
    for m in prof.modules:
        m.roofline_s = bound_by_module.get(m.path, 0.0)
        m.roofline_fraction = m.roofline_s / m.latency.median_s if m.latency is not None and m.latency.median_s else None
    if prof.ops:
        prof.totals.roofline_s = sum(op.roofline_s or 0.0 for op in prof.ops)
        if prof.latency is not None and prof.latency.median_s:
            prof.totals.roofline_fraction = prof.totals.roofline_s / prof.latency.median_s


def write_trace(target: Target, path: Path) -> Path:
    """A chrome trace (chrome://tracing, Perfetto) of one inference, via torch.profiler."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if target.device.type == "cuda" else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch_profile(activities=activities, record_shapes=True) as prof:
        target.run()
        Stopwatch(target.device.type == "cuda").sync()
    prof.export_chrome_trace(str(path))
    return path


__all__ = ["profile", "profile_target", "count", "ProfileOptions", "apply_roofline", "write_trace"]
