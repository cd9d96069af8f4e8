"""What `build()` returns: which value is the loss, and detaching what goes back to the user."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map


def loss_of(out):
    """The loss among build()'s outputs: the scalar tensor itself, a sequence's first item, or a dict's "loss".

    Returns None when there is no such tensor (an evaluation graph may return anything).
    """
    if isinstance(out, torch.Tensor):
        return out if out.numel() == 1 else None
    if isinstance(out, (tuple, list)) and out:
        return loss_of(out[0])
    if isinstance(out, dict) and "loss" in out:
        return loss_of(out["loss"])
    return None


def detached(out):
    """build()'s outputs with every tensor detached from autograd."""
    if type(out) is torch.Tensor:  # the usual case, without pytree's walk
        return out.detach()
    return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, out)
