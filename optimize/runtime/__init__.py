"""kiln's engine runtime: open an engine directory and run it; all that serving needs.

The runtime never imports the build side of `optimize` (sources, capture, passes, ONNX export,
calibration, backend builders, verification, auto, profiler), so a process that only serves
engines loads none of it, nor the libraries only building needs (ARCHITECTURE.md, "Packages and
their imports").
"""

from optimize.runtime.config import CompileConfig, Tolerance
from optimize.runtime.engine import AheadOfTimeEngine, Engine
from optimize.runtime.errors import ConfigError, EngineError, OptimizeError
from optimize.runtime.loading import load
from optimize.runtime.specs import Dim, TensorSpec

__all__ = ["load", "Engine", "AheadOfTimeEngine", "CompileConfig", "Tolerance", "TensorSpec", "Dim",
           "OptimizeError", "EngineError", "ConfigError"]
