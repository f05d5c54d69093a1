"""One benchmark case: the Triton kernel against torch eager and torch.compile, same run.

Every case reports, in pytest-benchmark's ``extra_info`` (and so in its JSON):

* ``median_ms`` — median device time (CUDA events, L2 flushed) of each implementation;
* ``gb_per_s`` / ``tflop_per_s`` — the op's :class:`kernels.Cost` over that time, so the
  numbers agree with the profiler's;
* ``frac_copy_bw`` / ``frac_matmul`` — those rates over the measured ceilings, and
  ``frac_roofline`` — the roofline lower bound over the measured time;
* ``speedup_vs_<baseline>`` — baseline time over kernel time;
* device, dtype, shape, and the target from issue 3 where one applies.

pytest-benchmark's own ``stats`` time the kernel from the host with a device synchronize per
round, so they include launch overhead; the device-time medians are the numbers to quote.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from bench.kernels.ceilings import Ceilings, device_time_ms
from kiln_kernels import Cost

__all__ = ["run_case", "compiled"]


def compiled(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``torch.compile`` of a zero-argument baseline, static shapes, default mode."""
    return torch.compile(fn, dynamic=False)


def _flatten(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _check_same(got: Any, expected: Any, atol: float, rtol: float) -> None:
    for g, e in zip(_flatten(got), _flatten(expected), strict=True):
        torch.testing.assert_close(g.float(), e.float(), atol=atol, rtol=rtol)


def run_case(
    benchmark: Any,
    ceilings: Ceilings,
    *,
    op: str,
    cost: Cost,
    kernel: Callable[[], Any],
    baselines: dict[str, Callable[[], Any]],
    shape: dict[str, Any],
    dtype: torch.dtype,
    check_against: Optional[str] = "eager",
    atol: float = 2e-2,
    rtol: float = 2e-2,
    target: Optional[tuple[str, str, float]] = None,
) -> None:
    """Check, time and record one case.

    Args:
        benchmark: the pytest-benchmark fixture.
        ceilings: the session's measured ceilings.
        op: op name (also the pytest-benchmark group).
        cost: the op's cost for this shape, from the kernels' cost model.
        kernel: zero-argument call of the Triton path.
        baselines: name -> zero-argument call, e.g. ``{"eager": ..., "compile": ...}``.
        shape, dtype: recorded as they are.
        check_against: baseline whose output the kernel's must match first (None: no check).
        atol, rtol: tolerance of that check.
        target: ``(description, metric, threshold)`` recorded with ``meets_target``; metric is
            an ``extra_info`` key (e.g. ``"frac_copy_bw"``) or ``"speedup_vs_<name>"``.
    """
    if check_against is not None:
        _check_same(kernel(), baselines[check_against](), atol, rtol)

    times = {"kernel": device_time_ms(kernel)}
    errors = {}
    for name, fn in baselines.items():
        try:
            times[name] = device_time_ms(fn)
        except Exception as e:  # a baseline that fails (compile errors) must not hide the kernel's number
            errors[name] = f"{type(e).__name__}: {e}"[:300]

    t = times["kernel"] * 1e-3
    info: dict[str, Any] = {
        "op": op,
        "device": ceilings.device,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": shape,
        "median_ms": times,
        "flops": cost.flops,
        "bytes": cost.bytes,
        "gb_per_s": cost.bytes / t / 1e9,
        "tflop_per_s": cost.flops / t / 1e12,
        "frac_copy_bw": cost.bytes / t / ceilings.copy_bytes_per_s,
        "frac_matmul": cost.flops / t / ceilings.bf16_flops_per_s,
        "frac_roofline": cost.roofline_s(ceilings.bf16_flops_per_s, ceilings.copy_bytes_per_s) / t,
        "ceilings": ceilings.as_dict(),
    }
    for name in baselines:
        if name in times:
            info[f"speedup_vs_{name}"] = times[name] / times["kernel"]
    if errors:
        info["baseline_errors"] = errors
    if target is not None:
        description, metric, threshold = target
        value = info.get(metric)
        info["target"] = {"description": description, "metric": metric, "threshold": threshold,
                          "value": value, "met": value is not None and value >= threshold}
    benchmark.group = op
    benchmark.extra_info.update(info)

    def synced() -> None:
        kernel()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=50, warmup_rounds=5, iterations=1)


def row_op_target(width: int) -> Optional[tuple[str, str, float]]:
    """Issue 3's targets for memory-bound row ops: >= 90 % of the measured copy bandwidth for
    rows >= 4k wide, faster than torch.compile at BERT widths (384, 768)."""
    if width >= 4096:
        return ("memory-bound, rows >= 4k: >= 90% of measured copy bandwidth", "frac_copy_bw", 0.9)
    if width in (384, 768):
        return ("BERT width: faster than torch.compile", "speedup_vs_compile", 1.0)
    return None
