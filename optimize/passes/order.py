"""The pass order: the one registry of every pass kiln runs, FX and ONNX alike, in the order
they run in, and the one loop that runs a stage of it.

A compile (`optimize.build`) runs the FX stage over the captured program
(`optimize.passes.run_passes`); for a backend that consumes ONNX it then exports the program and
runs the ONNX stage (`optimize.onnx.run_onnx_passes`) before the backend builds from the prepared
model. A backend names the passes of both stages it takes (`Backend.passes`). Both stages go
through `run_stage`: the same on/off by name, the same skip reasons, the same pass-by-pass
verification and the same `PassResult`, and the manifest's `passes` lists the whole order
(`full_report`) with each pass's stage, its matches and its time.

Naming: a pass is named for the rewrite it does, in snake_case with whole words
(`fuse_residual_layer_norm`, `fold_constants`); the same rewrite has the same name in both
stages, an ONNX pass with the prefix `onnx_` (`mixed_precision` / `onnx_mixed_precision`,
`quantize` / `onnx_quantize`). Its module carries the name without the prefix
(`optimize.passes.<name>`, `optimize.onnx.<name>`). Names from before this scheme (`RENAMED`)
are still accepted in `CompileConfig.passes` and `--enable-pass`/`--disable-pass`, with a
deprecation warning.
"""

from __future__ import annotations

import importlib
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from optimize.passes.base import FX, ONNX, Pass, PassResult
from optimize.runtime.config import Tolerance
from optimize.runtime.errors import AccuracyError, ConfigError


@dataclass(frozen=True)
class Step:
    """One pass of the order: its name, the stage (`FX` or `ONNX`) that runs it, and where its
    class is: "module:Class" (imported when the pass first runs, so an FX-only build never
    imports onnx), or the class itself for a pass registered at run time (`register`)."""

    name: str
    stage: str
    where: str | type[Pass]

    def pass_class(self) -> type[Pass]:
        """The pass's class; raises `TypeError` when it is not the pass the step names."""
        if isinstance(self.where, str):
            module, _, attr = self.where.partition(":")
            cls = getattr(importlib.import_module(module), attr)
        else:
            cls = self.where
        if not (isinstance(cls, type) and issubclass(cls, Pass) and cls.name == self.name and cls.stage == self.stage):
            raise TypeError(f"{self.where} is not the {self.stage} pass {self.name!r}")
        return cls


# FX: clean-ups first so the fusions see the simplest graph; embedding + LN before residual + LN
# (an embedding sum is an add too); bias + GELU before quantize so the GELU moves into the int8
# GEMM's epilogue; mixed precision after the fusions (it only wraps what is left of aten
# reductions); padding removal last, over the fused ops.
# ONNX: clean-ups and fusions first, so precision passes see the final structure (Q/DQ nodes
# would hide patterns from the fusions). ORT's fusions look for the exporter's attention
# pattern, so they run before the attention simplification rewrites it. Quantization
# calibrates on the fp32 graph; mixed precision comes last, so int8 engines can run their
# other ops in fp16.
PASS_ORDER: list[Step] = [
    *(Step(name, FX, f"optimize.passes.{name}:{cls}") for name, cls in (
        ("remove_dropout", "RemoveDropout"),
        ("fold_constants", "FoldConstants"),
        ("remove_dead_code", "RemoveDeadCode"),
        ("fuse_attention", "FuseAttention"),
        ("fuse_qkv", "FuseQKV"),
        ("fuse_embedding_layer_norm", "FuseEmbeddingLayerNorm"),
        ("fuse_residual_layer_norm", "FuseResidualLayerNorm"),
        ("fuse_bias_gelu", "FuseBiasGelu"),
        ("quantize", "Quantize"),
        ("mixed_precision", "MixedPrecision"),
        ("remove_padding", "RemovePadding"),
    )),
    *(Step(f"onnx_{name}", ONNX, f"optimize.onnx.{name}:{cls}") for name, cls in (
        ("fold_constants", "FoldConstants"),
        ("fuse_layer_norm", "FuseLayerNorm"),
        ("fuse_gelu", "FuseGelu"),
        ("ort_fusions", "OrtFusions"),
        ("simplify_attention", "SimplifyAttention"),
        ("quantize", "Quantize"),
        ("mixed_precision", "MixedPrecision"),
    )),
]
# Names passes had before the naming scheme, accepted with a deprecation warning.
RENAMED: dict[str, str] = {
    "constant_folding": "fold_constants",
    "dead_code": "remove_dead_code",
    "precision": "mixed_precision",
    "quantize_int8": "quantize",
    "onnx_fuse_layernorm": "onnx_fuse_layer_norm",
    "onnx_attention": "onnx_simplify_attention",
}


def names(stage: str | None = None) -> list[str]:
    """The passes of `stage` (every stage for None), in order."""
    return [s.name for s in PASS_ORDER if stage is None or s.stage == stage]


def canonical_passes(toggles: Mapping[str, bool]) -> dict[str, bool]:
    """`CompileConfig.passes` with every old name replaced by its new one (warning that the
    old one is deprecated); raises `ConfigError` naming unknown passes and the known ones."""
    known = set(names())
    unknown = sorted(n for n in toggles if n not in known and n not in RENAMED)
    if unknown:
        raise ConfigError(f"unknown pass(es) {', '.join(unknown)}; available: {', '.join(names())}")
    out: dict[str, bool] = {}
    for name, on in toggles.items():
        if name in RENAMED:
            warnings.warn(f"pass {name!r} is now called {RENAMED[name]!r}; the old name will be removed",
                          FutureWarning, stacklevel=3)
            name = RENAMED[name]
        out[name] = on
    return out


def register(cls: type[Pass], after: str | None = None) -> type[Pass]:
    """Put the pass `cls` into the order, in its stage (at the stage's end, or right after the
    pass named `after`), replacing a pass of the same name; returns `cls`."""
    remove(cls.name)
    if after is None:
        last = max((i for i, s in enumerate(PASS_ORDER) if s.stage == cls.stage), default=len(PASS_ORDER) - 1)
    else:
        last = names().index(after)
    PASS_ORDER.insert(last + 1, Step(cls.name, cls.stage, cls))
    return cls


def remove(name: str) -> None:
    """Take the pass `name` out of the order (a pass a test registered)."""
    PASS_ORDER[:] = [s for s in PASS_ORDER if s.name != name]


T = TypeVar("T")
Apply = Callable[[Any, T], tuple[T, dict[str, int]]]
Verifier = Callable[[T], dict[str, Any]]


def run_stage(stage: str, target: T, ctx: Any, apply: Apply,
              allowed: Iterable[str] | None = None, verifier: Verifier | None = None,
              tolerance: Tolerance | None = None, label: str = "pass") -> tuple[T, list[PassResult]]:
    """Run the passes of `stage` in order over `target` (a graph module, an ONNX model);
    return the result and one `PassResult` per pass. A pass runs when it is in `allowed` (None:
    every pass of the stage), `ctx.config.passes` does not turn it off, and `applies(ctx)` is
    empty; `apply(pass, target)` runs it and returns (target, matches). With `verifier`, each
    pass that matched something is checked, and `AccuracyError` names the first that breaks
    `tolerance`."""
    toggles = canonical_passes(ctx.config.passes)
    allowed = set(names(stage) if allowed is None else allowed)
    results = []
    for step in [s for s in PASS_ORDER if s.stage == stage]:
        name = step.name
        p = step.pass_class()()
        reason = (f"not supported by backend {ctx.backend}" if name not in allowed
                  else "disabled in config" if not toggles.get(name, True) else p.applies(ctx))
        if reason:
            results.append(PassResult(name, skipped=reason, stage=stage))
            continue
        t0 = time.perf_counter()
        target, matches = apply(p, target)
        result = PassResult(name, matches, time.perf_counter() - t0, stage=stage)
        if verifier is not None and result.total:
            result.accuracy = verifier(target)
            acc = result.accuracy
            if tolerance is not None and "max_abs_error" in acc and not (
                    acc["max_abs_error"] <= tolerance.max_abs_error and acc["min_cosine"] >= tolerance.min_cosine):
                raise AccuracyError(
                    f"{label} {name} broke accuracy: max abs error {acc['max_abs_error']:.3g} "
                    f"(allowed {tolerance.max_abs_error:.3g}), min cosine {acc['min_cosine']:.6f} "
                    f"(allowed {tolerance.min_cosine})"
                )
        results.append(result)
    return target, results


def full_report(results: Iterable[PassResult], backend: str) -> list[PassResult]:
    """Every pass of the order, with the result of those that ran (or were skipped) and, for
    the rest, why not: the whole sequence the manifest records and the CLI shows."""
    by_name = {r.name: r for r in results}
    return [by_name.get(s.name) or PassResult(s.name, skipped=f"not supported by backend {backend}", stage=s.stage)
            for s in PASS_ORDER]


__all__ = ["FX", "ONNX", "Step", "PASS_ORDER", "RENAMED", "names", "canonical_passes", "register", "remove",
           "run_stage", "full_report"]
