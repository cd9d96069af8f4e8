"""The bare model inside the wrappers that data parallelism and torch.compile put around it.

`DistributedDataParallel` (and `DataParallel`) hold the model as `.module`, `torch.compile`'s `OptimizedModule`
as `._orig_mod`; their parameter names carry that prefix (`module.fc2.weight`). Rules are written for the
model the user defined, so the resolver and `describe()` look through these wrappers, however nested.
"""

from __future__ import annotations

import sys

from torch import nn


def bare_model(model: nn.Module) -> nn.Module:
    """The model inside any DistributedDataParallel, DataParallel and torch.compile wrappers.

    Args:
        model: an `nn.Module`, wrapped (however deeply) or not.

    Returns:
        The innermost module: the model as the user defined it, whose parameter names the rules of
        `dm.param_groups` use (`fc2.weight`, not `module.fc2.weight`). A bare model is returned as it is.

    Raises:
        Nothing: any module is accepted.

    Example:
        >>> import torch, dualmode as dm
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> dm.bare_model(torch.nn.DataParallel(model)) is model
        True
    """
    while True:
        inner = _wrapped(model)
        if inner is None:
            return model
        model = inner


def _wrapped(model: nn.Module) -> nn.Module | None:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    # An OptimizedModule exists only once dynamo is loaded; looking it up here never loads dynamo itself.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return model._orig_mod
    return None
