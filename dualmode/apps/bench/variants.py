"""The variants `dualmode bench` times: one training step each, on the same model, data and update.

Every variant starts from the same seeded model and the same random batch, and (where it updates) uses SGD with
momentum 0.9 over the same three parameter groups with distinct `lr_scale`: the classifier 10x, the other
biases 2x, the rest 1x. The two dualmode variants run one `BenchStep` (a `TrainGraph` subclass) in each mode;
the others are the reference points written with PyTorch alone, where the lr of each group is set to
lr x lr_scale by hand, as torch.optim knows nothing of `lr_scale`. Under torchrun each variant's model is in
DistributedDataParallel (`distribute`) and each rank trains on its slice of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

import dualmode as dm
from dualmode.apps.models import mlp, mobilenet_v2

LR, MOMENTUM = 0.01, 0.9
MODELS = ("mlp", "mobilenet_v2")
NUM_CLASSES = 10


@dataclass(frozen=True)
class Variant:
    """One way of running the step: its name, what it is, and how to build it from `BenchSettings`."""

    name: str
    summary: str
    make: Callable[[BenchSettings], Callable]
    compiles: bool = False


@dataclass(frozen=True)
class BenchSettings:
    """What every variant is built from (sent to each worker process as JSON)."""

    model: str = "mlp"
    hidden: int = 512
    batch_size: int = 64
    seed: int = 0
    backend: str = "inductor"
    compile_mode: str | None = None
    keep_freed_memory: bool = False  # every variant's process calls dm.keep_freed_memory() first
    # Under torchrun: this process's rank among `world_size`; batch_size stays the global batch.
    distributed: bool = False
    world_size: int = 1
    rank: int = 0

    @property
    def compile_options(self) -> dict:
        """The torch.compile options of every compiled variant (graph mode's StepConfig takes the same)."""
        return {"backend": self.backend, "mode": self.compile_mode, "dynamic": False, "options": None}


def make_model(settings: BenchSettings) -> nn.Module:
    """The seeded model, in training mode."""
    torch.manual_seed(settings.seed)
    if settings.model == "mlp":
        return mlp(hidden=settings.hidden, num_classes=NUM_CLASSES).train()
    if settings.model == "mobilenet_v2":
        return mobilenet_v2(num_classes=NUM_CLASSES).train()
    raise ValueError(f"unknown model {settings.model!r}; choose one of {', '.join(MODELS)}")


def distribute(module: nn.Module, settings: BenchSettings) -> nn.Module:
    """Under torchrun, `module` in DistributedDataParallel over the worker's process group; else itself."""
    return nn.parallel.DistributedDataParallel(module) if settings.distributed else module


def _compiled(model: nn.Module, settings: BenchSettings) -> nn.Module:
    """torch.compile(model), inside DistributedDataParallel under torchrun.

    Not torch.compile(DDP(model)): in torch 2.13 dynamo breaks the graph in DDP's forward (its Logger, the skipped
    `_inside_ddp_forward`) and compiled nothing of the mlp (45 frames, no AOTAutograd graph), so that variant would
    be eager. Inside DDP the forward and backward are one compiled graph, and DDP's reducer all-reduces the
    gradients as they land after the compiled backward.
    """
    return distribute(torch.compile(model, **_torch_compile_kwargs(settings)), settings)


def make_batch(settings: BenchSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch of 32x32x3 images and labels of 10 classes: this rank's slice of the global batch."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    x = torch.randn(settings.batch_size, 3, 32, 32, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (settings.batch_size,), generator=generator)
    shard = settings.batch_size // settings.world_size
    mine = slice(settings.rank * shard, (settings.rank + 1) * shard)
    return x[mine], y[mine]


def make_groups(model: nn.Module) -> list[dict]:
    """Three groups with distinct lr_scale: the last Linear 10x, the other biases 2x, everything else 1x."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return dm.param_groups(model, [{"params": head, "lr_scale": 10.0}, {"params": "*.bias", "lr_scale": 2.0}],
                           default={})


def make_sgd(params) -> torch.optim.SGD:
    """SGD with momentum, the foreach implementation (torch's fast path; on CPU it is not the default)."""
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=True)


class BenchStep(dm.TrainGraph):
    """The step both dualmode variants run: cross-entropy of the model's output, backward."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, mode: str, config: dm.StepConfig):
        super().__init__(mode=mode, config=config)
        self.model = model
        self.add_optimizer(optimizer)

    def build(self, x, y):
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        return loss


def _dualmode_step(mode: str, recompute: bool = True, reuse: bool = True,
                   trace_cache: bool = False) -> Callable[[BenchSettings], Callable]:
    def make(settings: BenchSettings) -> Callable:
        model = distribute(make_model(settings), settings)
        config = dm.StepConfig(compile_options=settings.compile_options, recompute_activations=recompute,
                               reuse_buffers=reuse, trace_cache=trace_cache)
        return BenchStep(model, make_sgd(make_groups(model)), mode=mode, config=config)

    return make


def _torch_step(compiled: bool, update: bool) -> Callable[[BenchSettings], Callable]:
    def make(settings: BenchSettings) -> Callable:
        model = make_model(settings)
        forward = _compiled(model, settings) if compiled else distribute(model, settings)
        groups = make_groups(model)
        for group in groups:
            group["lr"] = LR * group["lr_scale"]
        optimizer = make_sgd(groups) if update else None

        def step(x, y):
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
            model.zero_grad(set_to_none=True)
            return loss.detach()

        step.model = forward  # what the worker's checksum reads, as it reads a TrainGraph's model
        return step

    return make


def _floor_step(settings: BenchSettings) -> Callable:
    """torch.compile(model)'s forward and backward, then one compiled update of every parameter at once.

    The update (SGD with momentum, lr x lr_scale baked per parameter) is one torch.compile'd function over all
    parameters, gradients and momentum buffers, so inductor fuses each parameter's update into one kernel and
    the whole update is one call: what graph mode's own fused update has to match. (Parameters as views into
    one flat buffer were tried first: the forward then sees inputs that alias each other, which AOTAutograd
    handles at a cost of about 10x the step.)
    """
    model = make_model(settings)
    forward = _compiled(model, settings)
    groups = make_groups(model)
    params = [p for g in groups for p in g["params"]]
    lrs = [LR * g["lr_scale"] for g in groups for _ in g["params"]]
    bufs = [torch.zeros_like(p) for p in params]

    @torch.compile(**_torch_compile_kwargs(settings))
    def update(params, grads, bufs):
        for p, g, buf, lr in zip(params, grads, bufs, lrs):
            buf.mul_(MOMENTUM).add_(g)
            p.sub_(buf * lr)

    def step(x, y):
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        with torch.no_grad():
            update(params, [p.grad for p in params], bufs)
        model.zero_grad(set_to_none=True)
        return loss.detach()

    step.model = forward
    return step


def _torch_compile_kwargs(settings: BenchSettings) -> dict:
    return {k: v for k, v in settings.compile_options.items() if v is not None}


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("eager", "dualmode TrainGraph, mode='eager': build(), then torch.optim SGD (foreach) with lr x lr_scale",
            _dualmode_step("eager")),
    Variant("graph", "dualmode TrainGraph, mode='graph': forward, backward and update compiled as one graph",
            _dualmode_step("graph"), compiles=True),
    Variant("torch-eager", "plain PyTorch: forward, backward, SGD foreach step, zero_grad",
            _torch_step(compiled=False, update=True)),
    Variant("torch-compile", "torch.compile(model) (forward and its backward), eager SGD foreach step",
            _torch_step(compiled=True, update=True), compiles=True),
    Variant("fwd-bwd-eager", "forward and backward only, no update (eager): the floor of an eager step",
            _torch_step(compiled=False, update=False)),
    Variant("fwd-bwd-compile", "forward and backward only, no update, torch.compile(model): the floor of a "
            "compiled step", _torch_step(compiled=True, update=False), compiles=True),
    Variant("floor-fused-update", "the floor with a fused update: torch.compile(model)'s forward and backward, "
            "then one compiled function updating every parameter (SGD momentum, one fused kernel each)", _floor_step,
            compiles=True),
    Variant("graph-no-recompute", "graph mode with config.recompute_activations=False: what the recompute pass "
            "(remat.py) buys", _dualmode_step("graph", recompute=False), compiles=True),
    Variant("graph-malloc", "graph mode with config.reuse_buffers=False: its step's buffers from malloc at every "
            "call, as before round 12 (what step_buffers.py buys)", _dualmode_step("graph", reuse=False),
            compiles=True),
    Variant("graph-saved-trace", "graph mode with config.trace_cache=True: a later process loads the traced step "
            "instead of tracing build() again (saved_trace.py; the first run saves it)",
            _dualmode_step("graph", trace_cache=True), compiles=True),
)}
# What a plain `dualmode bench` runs; the others are there to be asked for with --modes.
DEFAULT_VARIANTS = ("eager", "graph", "torch-eager", "torch-compile", "fwd-bwd-eager", "fwd-bwd-compile",
                    "floor-fused-update")
