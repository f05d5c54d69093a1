"""kiln's compiler: model source → captured program → backend → verified engine directory.

Entry points: `optimize.compile`, `optimize.load`, and `python -m optimize`.
"""

from optimize.compiler import compile
from optimize.config import CompileConfig, Tolerance
from optimize.engine import Engine, load
from optimize.errors import OptimizeError
from optimize.specs import Dim, TensorSpec

__all__ = ["compile", "load", "Engine", "CompileConfig", "Tolerance", "TensorSpec", "Dim", "OptimizeError"]
