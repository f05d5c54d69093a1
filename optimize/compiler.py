"""`optimize.compile`: source → capture → backend → verified engine directory.

One backend is built by `optimize.build.build_engine`; `--backend auto` (`optimize.auto`) builds
every candidate with it, times the verified ones and keeps the fastest.
"""

from __future__ import annotations

from pathlib import Path

from optimize.auto import compile_auto
from optimize.build import build_engine
from optimize.reporter import Reporter, Silent
from optimize.runtime.config import CompileConfig
from optimize.runtime.engine import Engine
from optimize.tuning import TuningCache


def compile(  # noqa: A001 - the public verb of the package, like torch.compile
    source: str | Path,
    out_dir: str | Path,
    config: CompileConfig | None = None,
    *,
    name: str | None = None,
    reporter: Reporter | None = None,
    tuning: TuningCache | None = None,
) -> Engine:
    """Compile `source` (HF directory, `.pt2` file or `module:function`) into an engine at
    `out_dir` and return it loaded.

    The engine is verified against the fp32 eager model on fresh random inputs at several
    shapes (and on held-out real sentences for text models) before it is moved into place;
    `out_dir` is only replaced by a verified engine. A backend that cannot run on this machine
    (TensorRT without a GPU) still builds ahead of time: verification is skipped, the manifest's
    accuracy entry says why, and the returned engine raises `EngineError` when run.
    Backend `auto` builds every candidate and keeps the fastest (`optimize.auto`); `tuning`
    (a `optimize.tuning.TuningCache`) lets it reuse the choice it made for this machine and model.
    Raises `SourceError`, `ConfigError`, `CaptureError` or `AccuracyError` (all `OptimizeError`).
    """
    config = config or CompileConfig()
    reporter = reporter or Silent()
    if config.backend == "auto":
        return compile_auto(source, Path(out_dir), config, name=name, reporter=reporter, tuning=tuning)
    return build_engine(source, out_dir, config, name=name, reporter=reporter)


__all__ = ["compile", "Reporter"]
