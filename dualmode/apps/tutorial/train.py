"""The layer-wise learning-rate tutorial, one mode at a time: model, param groups, step, training loop.

OneFlow's tutorial trains MobileNetV2 with three param groups, features / adaptive_avg_pool2d / classifier:

- eager: absolute lrs (1e-3, 1e-4, 1e-5, i.e. base lr x 1, 1/10, 1/100), each multiplied by its group's decay
  factor (0.9, 0.8, 0.7) after batch 0, 10, 20, ... of each epoch. The tutorial names that factor `lr_scale`;
  in dualmode `lr_scale` always means "effective lr = lr x lr_scale", so the decay factor is named `lr_decay`.
- graph: one base lr and `lr_scale` 0.9, 0.8, 0.7, a constant baked into the compiled step.

Both run through the same `dm.TrainGraph` subclass (the tutorial's `GraphMobileNetV2`), in mode "eager" or "graph".
See docs/tutorial.md.
"""

from __future__ import annotations

import itertools
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import dualmode as dm
from dualmode.apps.launch import Launch
from dualmode.apps.models import mobilenet_v2
from dualmode.apps.tutorial import resume

GROUPED_MODULES = ("features", "adaptive_avg_pool2d", "classifier")
EAGER_LR_RATIOS = (1.0, 0.1, 0.01)  # the tutorial's 1e-3, 1e-4, 1e-5 for a base lr of 1e-3
EAGER_LR_DECAYS = (0.9, 0.8, 0.7)   # the tutorial's eager-mode "lr_scale": lr *= factor every 10 batches
GRAPH_LR_SCALES = (0.9, 0.8, 0.7)   # the tutorial's graph-mode lr_scale: effective lr = lr x lr_scale
LOG_EVERY = 5                       # the tutorial prints the loss every 5 batches


@dataclass(frozen=True)
class TutorialSettings:
    """What one run of the tutorial trains with (the command line's options, checked)."""

    lr: float
    momentum: float
    batch_size: int
    epochs: int
    max_steps: int | None
    width_mult: float
    decay_every: int
    seed: int
    backend: str
    bn_batches: int
    checkpoint: str | None = None  # a folder: save every `checkpoint_every` steps, resume from it when restarted
    checkpoint_every: int = 50
    trace_cache: bool = False  # graph mode's config.trace_cache: a restarted run loads the traced step


@dataclass
class ModeResult:
    """What one mode's training gave: the loss and time of every step, compiles, held-out accuracy."""

    mode: str
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    compiles: int = 0
    trace_seconds: float | None = None
    accuracy: float | None = None             # eval mode, after BatchNorm statistics were re-estimated
    accuracy_running_bn: float | None = None  # eval mode, with the running statistics kept during training

    @property
    def steady_samples_per_second(self) -> float | None:
        """Samples per second over the steps after the first call (which compiles in graph mode)."""
        if len(self.step_seconds) < 2:
            return None
        return sum(self.batch_sizes[1:]) / sum(self.step_seconds[1:])


class MobileNetV2Step(dm.TrainGraph):
    """The tutorial's `GraphMobileNetV2`: forward, loss, `loss.backward()`; TrainGraph does the update."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, *,
                 mode: str, config: dm.StepConfig):
        super().__init__(mode=mode, config=config)
        self.model = model
        self.loss_fn = loss_fn
        self.add_optimizer(optimizer)

    def build(self, x, y):
        y_pred = self.model(x)
        loss = self.loss_fn(y_pred, y)
        loss.backward()
        return loss


def tutorial_model(num_classes: int, width_mult: float) -> nn.Module:
    """MobileNetV2 with the classifier the tutorial meant to put on it."""
    model = mobilenet_v2(num_classes=num_classes, width_mult=width_mult)
    # The tutorial writes `model.classifer = ...`: a typo that adds an unused attribute and keeps the old
    # classifier. What it meant is to replace the classifier:
    model.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(model.last_channel, num_classes))
    return model


def tutorial_rules(model: nn.Module, mode: str, lr: float) -> list[dict]:
    """The tutorial's three groups for `mode`; the second, adaptive_avg_pool2d, has no parameters (kept as is)."""
    modules = [getattr(model, name) for name in GROUPED_MODULES]
    if mode == "eager":
        return [{"params": module, "lr": lr * ratio, "lr_decay": decay}
                for module, ratio, decay in zip(modules, EAGER_LR_RATIOS, EAGER_LR_DECAYS)]
    return [{"params": module, "lr_scale": scale} for module, scale in zip(modules, GRAPH_LR_SCALES)]


def resolve_groups(rules: list[dict], model: nn.Module, say) -> list[dict]:
    """`dm.param_groups(model, rules)`, with each warning it gives shown through `say` (not hidden, not raised).

    The tutorial's adaptive_avg_pool2d group selects nothing, and the resolver warns about it: the user should
    see that warning even where warnings are filtered or turned into errors.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = dm.param_groups(model, rules)
    for warning in caught:
        say(f"{warning.category.__name__}: {warning.message}")
    return groups


def adjust_learning_rate(optimizer: torch.optim.Optimizer) -> None:
    """The tutorial's eager-mode decay: each group's lr times its decay factor (`lr_decay` in dualmode)."""
    for param_group in optimizer.param_groups:
        param_group["lr"] *= param_group["lr_decay"]


def planned_steps(batches_per_epoch: int, settings: TutorialSettings) -> int:
    """How many steps the run takes: every batch of every epoch, or --max-steps if fewer."""
    total = batches_per_epoch * settings.epochs
    return total if settings.max_steps is None else min(total, settings.max_steps)


def tutorial_step(mode: str, model: nn.Module, settings: TutorialSettings, say) -> MobileNetV2Step:
    """The tutorial's optimizer (SGD over its three groups) in a `MobileNetV2Step` for `mode`; say what it is.

    `model` may be wrapped in DistributedDataParallel: the rules name the bare model's modules.
    """
    groups = resolve_groups(tutorial_rules(dm.bare_model(model), mode, settings.lr), model, say)
    optimizer = torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    config = dm.StepConfig(trace_cache=settings.trace_cache)
    config.compile_options["backend"] = settings.backend
    step = MobileNetV2Step(model, nn.CrossEntropyLoss(), optimizer, mode=mode, config=config)
    say(str(step))
    if mode == "eager":
        decays = ", ".join(f"{name} x{g['lr_decay']}" for name, g in zip(GROUPED_MODULES, optimizer.param_groups))
        say(f"lr decay every {settings.decay_every} batches: {decays}")
    return step


def _batches(loader: DataLoader, epochs: int, say):
    """(batch index within its epoch, x, y) for every batch of every epoch, saying when an epoch starts."""
    for t in range(epochs):
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(t)  # another shuffle each epoch, the same on every rank
        say(f"Epoch {t + 1}\n-------------------------------")
        for batch, (x, y) in enumerate(loader):
            yield batch, x, y


def train(mode: str, model: nn.Module, data, settings: TutorialSettings, console,
          launch: Launch | None = None) -> ModeResult:
    """Train `model` in `mode` ("eager" or "graph") with the tutorial's groups and loop; print as the tutorial does.

    `console` (tutorial_progress.Console) receives the tutorial's lines and shows the progress bar and the
    compile ticker. Under torchrun (`launch`), the model is wrapped in DistributedDataParallel, each rank
    trains on its shard of every global batch of `settings.batch_size`, and the loss shown is the global one.
    """
    console.say(f"\n=== {mode} mode ===")
    launch = launch if launch is not None else Launch()  # one process unless run under torchrun
    step = tutorial_step(mode, launch.wrap(model), settings, console.say)
    # A short last batch would be a new input shape, which graph mode compiles again: drop it there.
    loader = launch.loader(data, settings.batch_size, drop_last=(mode == "graph"), seed=settings.seed)
    result = ModeResult(mode)
    total = planned_steps(len(loader), settings)
    size = len(loader.dataset)
    path = settings.checkpoint and resume.checkpoint_path(settings.checkpoint, mode)
    done = resume.resume(path, step, result, settings, data.name) if path else 0
    if done:
        console.say(f"resumed from {path} after step {done} of {total}")
    model.train()
    with console.progress(max(0, total - done), mode) as bar:
        for i, (batch, x, y) in enumerate(itertools.islice(_batches(loader, settings.epochs, console.say), total)):
            if i < done:  # trained before the restart: draw the batch (same data order), skip the step
                continue
            compiling = mode == "graph" and step.compile_count == 0
            with console.compiling(settings.backend) if compiling else nullcontext():
                start = time.perf_counter()
                loss = step(x, y).item()
                result.step_seconds.append(time.perf_counter() - start)
            if compiling and settings.trace_cache:
                console.say(f"graph mode: trace: {step.explain().compiles[0].trace_source}")
            loss = launch.mean(loss)
            result.losses.append(loss)
            result.batch_sizes.append(len(y) * launch.world)
            current = batch * settings.batch_size
            if batch % LOG_EVERY == 0:
                console.say(f"loss: {loss:>7f}  [{current:>5d}/{size:>5d}]")
            if mode == "eager" and batch % settings.decay_every == 0:
                adjust_learning_rate(step.optimizer)
            bar.advance(loss)
            if path and ((i + 1) % settings.checkpoint_every == 0 or i + 1 == total):
                resume.save(path, step, result, i + 1, settings, data.name)
    result.compiles = step.compile_count
    records = step.explain().compiles
    if records:
        result.trace_seconds = records[0].trace_s
    return result
