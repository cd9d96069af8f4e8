"""dualmode: per-layer learning rates for PyTorch, eager or compiled, from one definition.

`import dualmode` loads torch but neither dynamo nor inductor: graph mode imports them on its first call.
"""

from dualmode._version import __version__ as __version__
from dualmode.graph.report import Explanation
from dualmode.graph.report import RecompileLimitError
from dualmode.graph.report import RecompileWarning
from dualmode.graph.report import TraceError
from dualmode.groups.describe import describe
from dualmode.groups.resolver import param_groups
from dualmode.groups.unwrap import bare_model
from dualmode.step.checkpoint import load_checkpoint
from dualmode.step.checkpoint import save_checkpoint
from dualmode.step.config import StepConfig
from dualmode.step.cpu_memory import keep_freed_memory
from dualmode.step.state import CheckpointError
from dualmode.step.train_graph import TrainGraph

__all__ = [
    "CheckpointError",
    "Explanation",
    "RecompileLimitError",
    "RecompileWarning",
    "StepConfig",
    "TraceError",
    "TrainGraph",
    "bare_model",
    "describe",
    "keep_freed_memory",
    "load_checkpoint",
    "param_groups",
    "save_checkpoint",
]
