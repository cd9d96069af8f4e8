"""Held-out accuracy for the tutorial: eval mode, no gradients, before and after re-estimating BatchNorm statistics.

After a one-minute run, MobileNetV2's BatchNorm running statistics (an exponential average, momentum 0.1, of
the batch statistics seen while the weights moved) describe the network poorly, and eval-mode accuracy with them
can sit near chance while the network itself has learned (docs/tutorial.md shows the numbers). So the tutorial
reports both: with the running statistics as training left them, and after re-estimating them with the final
weights on a few training batches (torch's `swa_utils.update_bn`; "precise BatchNorm" in Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021), which is what the model keeps.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.data import DataLoader

import dualmode as dm

EVAL_BATCH_SIZE = 256


class Prediction(dm.TrainGraph):
    """An evaluation step (no optimizer): `build` runs without gradients and returns the logits."""

    def __init__(self, model: nn.Module):
        super().__init__(mode="eager")
        self.model = model

    def build(self, x):
        return self.model(x)


def accuracy(model: nn.Module, data) -> float:
    """Share of `data` classified correctly, in eval mode (BatchNorm's running statistics, no dropout)."""
    model.eval()
    predict = Prediction(model)
    correct = 0
    for x, y in DataLoader(data, EVAL_BATCH_SIZE):
        correct += int((predict(x).argmax(dim=1) == y).sum())
    model.train()
    return correct / len(data)


def recalibrate_batchnorm(model: nn.Module, data, batches: int, batch_size: int, seed: int) -> int:
    """Re-estimate every BatchNorm's running mean and variance with the model's current weights.

    torch's `torch.optim.swa_utils.update_bn` on `batches` shuffled training batches: the running statistics
    are reset and replaced by the plain average of those batches' statistics (forward only, in train mode,
    without gradients); the weights do not change.

    Returns:
        How many images the statistics were taken from.
    """
    loader = DataLoader(data, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    chosen = list(itertools.islice(loader, batches))
    torch.optim.swa_utils.update_bn(chosen, model)
    return sum(len(y) for _, y in chosen)


def evaluate(model: nn.Module, train_data, test_data, settings, result, say) -> None:
    """Fill `result.accuracy_running_bn` and (unless `settings.bn_batches` is 0) `result.accuracy`; say them.

    The statistics are re-estimated on `settings.bn_batches` batches of `settings.batch_size` training images.
    """
    result.accuracy_running_bn = accuracy(model, test_data)
    line = f"held-out accuracy ({result.mode} mode): "
    running = f"{100 * result.accuracy_running_bn:.1f} %"
    if settings.bn_batches == 0:
        say(f"{line}{running} of {len(test_data)} images (BatchNorm running statistics from training)")
        return
    seen = recalibrate_batchnorm(model, train_data, settings.bn_batches, settings.batch_size, settings.seed + 1)
    result.accuracy = accuracy(model, test_data)
    say(f"{line}{100 * result.accuracy:.1f} % of {len(test_data)} images, with BatchNorm statistics re-estimated "
        f"on {seen} training images ({running} with the running statistics kept during training)")
