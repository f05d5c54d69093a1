"""The precision plan of one build: what the config's precision means for the backend that
builds it, resolved once (`optimize.build`) and read by every pass and backend instead of the
precision's name. The facts of each name are in `optimize.runtime.precision`; what a backend
adds is where the precision is applied (by capturing the program in it, or by graph passes
over an fp32 capture) and which float type a quantized precision leaves its other ops in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optimize.runtime.config import CompileConfig, Tolerance
from optimize.runtime.precision import FACTS, facts


@dataclass(frozen=True)
class PrecisionPlan:
    """How one engine computes.

    `capture`: the dtype the program is captured in (fp32 where the backend applies precision
    with graph passes: casts, Q/DQ nodes). `compute`: the float type of the engine's
    unquantized ops (fp32, fp16 or bf16; for a quantized precision the backend's choice, e.g.
    TensorRT's `quantized_fallback`). `weights`, `activations`: their quantized type, None when
    float. `tolerance`: what the engine is verified against (the config's, else the
    precision's default). `needs`: what the precision requires beyond a backend that lists it."""

    precision: str
    capture: torch.dtype
    compute: torch.dtype
    weights: torch.dtype | None
    activations: torch.dtype | None
    tolerance: Tolerance | None
    needs: str = ""

    @classmethod
    def resolve(cls, config: CompileConfig, *, captures_precision: bool = True,
                quantized_compute: torch.dtype = torch.float32) -> PrecisionPlan:
        """The plan for `config.precision` on a backend that captures in the precision (or
        not) and computes a quantized precision's float ops in `quantized_compute`; the
        defaults are a backend that casts the model itself (eager). Backends call this through
        `Backend.precision_plan`. Raises `KeyError` for precision "auto", which is no plan but
        a search over them (`optimize.auto`)."""
        f = facts(config.precision)
        compute = quantized_compute if f.quantized else f.compute
        return cls(precision=f.name, capture=compute if captures_precision else torch.float32, compute=compute,
                   weights=f.weights, activations=f.activations, tolerance=config.tolerance, needs=f.needs)

    @property
    def quantized(self) -> bool:
        """Weights in int8 or fp8; judged on real samples when the source has them, since
        random token ids exaggerate quantization error (`optimize.verify`)."""
        return self.weights is not None

    @property
    def calibrated(self) -> bool:
        """Activations quantized too: their ranges come from calibration samples."""
        return self.activations is not None

    @property
    def weight_only(self) -> bool:
        """Weights quantized, activations float: no calibration."""
        return self.quantized and not self.calibrated

    @property
    def fp8(self) -> bool:
        """Quantized to fp8 (E4M3), which only TensorRT on SM89+ runs."""
        return self.weights == torch.float8_e4m3fn


def admitted(precision: str) -> tuple[str, ...]:
    """The precisions at least as accurate as `precision` (that one included), in
    `CompileConfig`'s order: the candidates `--backend auto` tries when it is asked for
    (every precision for "auto")."""
    limit = facts(precision).rank if precision in FACTS else max(f.rank for f in FACTS.values())
    return tuple(name for name, f in FACTS.items() if f.rank <= limit)


def native_on_cpu(precision: str, cpu_bf16: bool) -> bool:
    """Whether a CPU computes `precision` natively: every precision but the 16-bit floats, and
    bf16 on CPUs with bf16 dot products (`cpu_bf16`); an emulated one is slower than fp32."""
    f = facts(precision)
    return not f.reduced_float or (f.compute == torch.bfloat16 and cpu_bf16)


__all__ = ["PrecisionPlan", "admitted", "native_on_cpu"]
