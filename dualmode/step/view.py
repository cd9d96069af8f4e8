"""What graph mode is given of a TrainGraph for one call: its name, modules, optimizer, config, and build()."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dualmode.step.config import StepConfig


@dataclass(frozen=True)
class StepView:
    """One call's view of a step; graph mode reads the step through this and nothing else.

    Attributes:
        name: the TrainGraph subclass's name, for messages.
        modules: the step's nn.Module attributes, as (attribute name, module).
        optimizer: the optimizer, or None for an evaluation graph.
        config: the step's StepConfig.
        run_build: runs build(*args, **kwargs) under the config's autocast.
    """

    name: str
    modules: list[tuple[str, nn.Module]]
    optimizer: torch.optim.Optimizer | None
    config: StepConfig
    run_build: Callable[[tuple, dict], Any]
