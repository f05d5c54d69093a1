"""kiln's compiler: model source → captured program → backend → verified engine directory.

Entry points: `optimize.compile`, `optimize.load`, `optimize.profile`, and `python -m optimize`.
"""

from optimize.compiler import compile
from optimize.config import CompileConfig, Tolerance
from optimize.engine import Engine, load
from optimize.errors import OptimizeError
from optimize.specs import Dim, TensorSpec

from optimize import profile  # a callable package: optimize.profile(model_or_engine, inputs)

__all__ = ["compile", "load", "profile", "Engine", "CompileConfig", "Tolerance", "TensorSpec", "Dim", "OptimizeError"]
