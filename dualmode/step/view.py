"""What graph mode is given of a TrainGraph for one call: its name, modules, optimizer, config, and build()."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dualmode.step.config import StepConfig

# Attributes dualmode itself keeps on a TrainGraph: graph mode's guard does not watch them (the config and the
# optimizer's groups are in the cache key), except those that change at every call, which build() must not read.
OWN_ATTRIBUTES = frozenset({"config", "optimizer", "lr_scheduler", "step_count", "_micro_steps", "_graph", "_mode"})
PER_CALL_ATTRIBUTES = frozenset({"step_count", "_micro_steps"})


@dataclass(frozen=True)
class StepView:
    """One call's view of a step; graph mode reads the step through this and nothing else.

    Attributes:
        name: the TrainGraph subclass's name, for messages.
        modules: the step's nn.Module attributes, as (attribute name, module).
        optimizer: the optimizer, or None for an evaluation graph.
        config: the step's StepConfig.
        run_build: runs build(*args, **kwargs) under the config's autocast.
        owner: the TrainGraph itself, whose attributes build() reads (graph mode watches them).
    """

    name: str
    modules: list[tuple[str, nn.Module]]
    optimizer: torch.optim.Optimizer | None
    config: StepConfig
    run_build: Callable[[tuple, dict], Any]
    owner: Any = None
