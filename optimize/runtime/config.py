"""`CompileConfig`: everything that decides how an engine is built, serializable into its manifest."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from optimize.runtime.errors import ConfigError
from optimize.runtime.specs import Dim

# int8: weights and activations in int8 (calibrated Q/DQ); int8-weight: weights only, no calibration.
# auto: whichever precision keeps the accuracy guard (only with backend auto, see optimize.auto).
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int8-weight", "fp8", "auto")
# Precisions whose error random inputs exaggerate: they are judged on real samples when the
# source has them (see optimize.samples).
QUANTIZED_PRECISIONS = frozenset({"int8", "int8-weight", "fp8"})
# What a precision needs beyond a backend that lists it, said when another backend is asked for it.
PRECISION_NEEDS = {"fp8": "fp8 (E4M3) needs backend tensorrt and an SM89+ GPU (Ada, Hopper, Blackwell)"}
CALIBRATION_METHODS = ("percentile", "entropy", "minmax")
CONFIG_VERSION = 1


@dataclass(frozen=True)
class Tolerance:
    """How far an engine may drift from the fp32 eager model: every output element within
    `max_abs_error` (None or inf: unbounded, the cosine alone judges), and every output
    (flattened per sample) at least `min_cosine` similar.

    `same_labels`: a classifier must also give the same label (arg-max of its logits) as the
    fp32 model on every real sample and token. `real_samples_only`: judge on the held-out real
    texts alone when the source has them (random token ids make activations no text produces,
    which exaggerates rounding error); quantized precisions are judged that way anyway. The
    guards `--precision auto` uses per task are in `optimize.guards`."""

    max_abs_error: float
    min_cosine: float
    same_labels: bool = False
    real_samples_only: bool = False

    def __post_init__(self) -> None:
        if self.max_abs_error is None:
            object.__setattr__(self, "max_abs_error", math.inf)
        if not 0.0 < self.min_cosine <= 1.0:
            raise ConfigError(f"min_cosine must lie in (0, 1]; got {self.min_cosine}")
        if not self.max_abs_error >= 0.0:  # 0 asks for bit-exact outputs
            raise ConfigError(f"max_abs_error must not be negative; got {self.max_abs_error}")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = dataclasses.asdict(self)
        if math.isinf(self.max_abs_error):
            data["max_abs_error"] = None  # JSON has no infinity
        return data


# fp32 engines differ from eager only by kernel summation order; reduced precisions by their
# rounding (fp16 has 11 significant bits, bf16 8), int8 by quantization noise.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs_error=1e-3, min_cosine=0.9999),
    "fp16": Tolerance(max_abs_error=5e-2, min_cosine=0.999),
    "bf16": Tolerance(max_abs_error=2e-1, min_cosine=0.995),
    "int8": Tolerance(max_abs_error=5e-1, min_cosine=0.99),
    "int8-weight": Tolerance(max_abs_error=5e-1, min_cosine=0.99),
    "fp8": Tolerance(max_abs_error=1.0, min_cosine=0.98),
}
# "auto" takes the task's guard (optimize.guards) unless a tolerance is given.
AUTO_PRECISION = "auto"


@dataclass
class CompileConfig:
    """How to build an engine.

    Shape ranges are given as batch and sequence bounds; `dims` derives the `Dim`s every
    TensorSpec, export and profile uses. `opt_*` default to a typical serving shape inside the
    range. `calibration` is a data set file (see `optimize.samples`; None = built-in sentences)
    used by calibrated precisions and the fp16 overflow guard. `backend_options` holds settings
    only one backend understands (each backend validates its own). Raises `ConfigError` (a
    `ValueError`) naming the field on a bad value.
    """

    backend: str = "onnxruntime"
    precision: str = "fp32"
    max_batch: int = 32
    max_seq: int = 256
    min_batch: int = 1
    min_seq: int = 1
    opt_batch: int | None = None
    opt_seq: int | None = None
    passes: dict[str, bool] = field(default_factory=dict)
    verify_passes: bool = False
    tolerance: Tolerance | None = None
    verify_samples: int = 4
    seed: int = 0
    calibration: str | None = None
    calibration_method: str = "percentile"
    calibration_samples: int = 256
    backend_options: dict[str, Any] = field(default_factory=dict)
    # Which head of a Hugging Face model to build (optimize.sources.tasks); None: the one the
    # directory describes.
    task: str | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"calibration_method must be one of {', '.join(CALIBRATION_METHODS)}; got {self.calibration_method!r}"
            )
        if self.calibration is not None:
            self.calibration = str(self.calibration)
        for name in ("max_batch", "max_seq", "min_batch", "min_seq", "verify_samples", "calibration_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer; got {value!r}")
        if self.min_batch > self.max_batch:
            raise ConfigError(f"min_batch ({self.min_batch}) exceeds max_batch ({self.max_batch})")
        if self.min_seq > self.max_seq:
            raise ConfigError(f"min_seq ({self.min_seq}) exceeds max_seq ({self.max_seq})")
        if self.opt_batch is None:
            self.opt_batch = min(max(self.min_batch, 8), self.max_batch)
        if self.opt_seq is None:
            self.opt_seq = min(max(self.min_seq, 128), self.max_seq)
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"opt_batch must lie in [{self.min_batch}, {self.max_batch}]; got {self.opt_batch}")
        if not self.min_seq <= self.opt_seq <= self.max_seq:
            raise ConfigError(f"opt_seq must lie in [{self.min_seq}, {self.max_seq}]; got {self.opt_seq}")
        if isinstance(self.tolerance, dict):
            self.tolerance = Tolerance(**self.tolerance)
        if self.precision == AUTO_PRECISION and self.backend != "auto":
            raise ConfigError("precision 'auto' (whichever precision keeps the accuracy guard) needs backend 'auto'")
        if self.tolerance is None and self.precision != AUTO_PRECISION:  # auto: the task's guard, set by optimize.auto
            self.tolerance = DEFAULT_TOLERANCES[self.precision]

    @property
    def dims(self) -> dict[str, Dim]:
        """The `batch` and `seq` dims every token-shaped tensor uses."""
        assert self.opt_batch is not None and self.opt_seq is not None
        return {
            "batch": Dim("batch", self.min_batch, self.opt_batch, self.max_batch),
            "seq": Dim("seq", self.min_seq, self.opt_seq, self.max_seq),
        }

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["tolerance"] = self.tolerance.to_json() if self.tolerance else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CompileConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown CompileConfig field(s): {', '.join(unknown)}")
        return cls(**data)
