"""Model sources: turn what the user points at into a `Source` the compiler can capture."""

from __future__ import annotations

from pathlib import Path

from optimize.runtime.config import CompileConfig
from optimize.runtime.errors import SourceError
from optimize.sources.base import Source
from optimize.sources.factory import is_factory, load_factory
from optimize.sources.hf import is_hf_directory, load_hf_directory
from optimize.sources.pt2 import load_pt2

EXPECTED = "a Hugging Face model directory (config.json + *.safetensors), an exported .pt2 program, or a module:function factory"


def load_source(source: str | Path, config: CompileConfig) -> Source:
    """Load `source`; raises `SourceError` with one line naming what was expected."""
    text = str(source)
    path = Path(text)
    if config.task is not None and not is_hf_directory(path):
        raise SourceError(f"{text}: --task applies to Hugging Face model directories; "
                          "a .pt2 program or a factory already fixes its outputs")
    if path.exists():
        if is_hf_directory(path):
            return load_hf_directory(path, config)
        if path.is_file() and path.suffix == ".pt2":
            return load_pt2(path, config)
        what = "directory without config.json" if path.is_dir() else f"unsupported file type '{path.suffix or path.name}'"
        raise SourceError(f"{text}: {what}; expected {EXPECTED}")
    if is_factory(text):
        return load_factory(text, config)
    raise SourceError(f"{text}: no such file or directory; expected {EXPECTED}")


__all__ = ["Source", "load_source", "EXPECTED"]
