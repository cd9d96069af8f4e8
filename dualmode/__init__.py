"""dualmode: per-layer learning rates for PyTorch, eager or compiled, from one definition."""

from dualmode.config import StepConfig
from dualmode.graph import Explanation
from dualmode.graph import RecompileLimitError
from dualmode.graph import RecompileWarning
from dualmode.describe import describe
from dualmode.groups import param_groups
from dualmode.step import TrainGraph
from dualmode.trace import TraceError

__version__ = "0.1.0"

__all__ = [
    "Explanation",
    "RecompileLimitError",
    "RecompileWarning",
    "StepConfig",
    "TraceError",
    "TrainGraph",
    "describe",
    "param_groups",
]
