"""What each precision name means, written once: the float type its unquantized ops compute in,
what it quantizes, how it ranks by accuracy. The manifest records a precision by name
(`CompileConfig.precision`); every reader turns the name into these facts here instead of
comparing names. The build side resolves them, with the backend, into one
`optimize.precision.PrecisionPlan`; the runtime needs only a fact or two (OpenVINO's inference
precision, CTranslate2's compute type)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrecisionFacts:
    """One precision. `compute`: the float type of the ops it leaves unquantized (a backend
    may resolve a quantized precision's to another, see `optimize.precision`); `weights` and
    `activations`: the type they are quantized to, None when they stay float; `rank`: place in
    the accuracy order, 0 the most accurate; `needs`: what it requires beyond a backend that
    lists it, said when another backend is asked for it."""

    name: str
    compute: torch.dtype
    weights: torch.dtype | None = None
    activations: torch.dtype | None = None
    rank: int = 0
    needs: str = ""

    @property
    def quantized(self) -> bool:
        """Weights (and maybe activations) in int8 or fp8: error random inputs exaggerate, so
        these are judged on real samples when the source has them (see `optimize.samples`)."""
        return self.weights is not None

    @property
    def calibrated(self) -> bool:
        """Activations quantized too: their ranges come from calibration samples."""
        return self.activations is not None

    @property
    def reduced_float(self) -> bool:
        """A 16-bit float precision (fp16, bf16), not a quantized one."""
        return not self.quantized and self.compute != torch.float32


# int8: weights and activations in int8 (calibrated Q/DQ); int8-weight: weights only, no calibration.
FACTS: dict[str, PrecisionFacts] = {f.name: f for f in (
    PrecisionFacts("fp32", torch.float32, rank=0),
    PrecisionFacts("fp16", torch.float16, rank=1),
    PrecisionFacts("bf16", torch.bfloat16, rank=2),
    PrecisionFacts("int8", torch.float32, weights=torch.int8, activations=torch.int8, rank=4),
    PrecisionFacts("int8-weight", torch.float32, weights=torch.int8, rank=3),
    PrecisionFacts("fp8", torch.float32, weights=torch.float8_e4m3fn, activations=torch.float8_e4m3fn, rank=5,
                   needs="fp8 (E4M3) needs backend tensorrt and an SM89+ GPU (Ada, Hopper, Blackwell)"),
)}
# Not a precision: whichever precision keeps the accuracy guard (only with backend auto, see optimize.auto).
AUTO_PRECISION = "auto"
# The names `--precision` and `CompileConfig.precision` take (`rank` orders them by accuracy).
PRECISIONS = (*FACTS, AUTO_PRECISION)
# The float types a precision name can capture a program in, by name (`python -m optimize profile`).
FLOAT_NAMES: dict[str, torch.dtype] = {f.name: f.compute for f in FACTS.values() if not f.quantized}


def facts(precision: str) -> PrecisionFacts:
    """The facts of a precision name; raises `KeyError` for "auto" or an unknown name
    (`CompileConfig` has refused those before anyone asks)."""
    return FACTS[precision]


__all__ = ["PrecisionFacts", "FACTS", "PRECISIONS", "AUTO_PRECISION", "FLOAT_NAMES", "facts"]
