"""TrainGraph: one training step, defined once by `build()`, run eagerly or as one compiled graph.

Eager mode runs `build()` and then the optimizer's own `step()` with each group's lr multiplied by its
`lr_scale` for the length of that call: torch.optim itself is the ground truth. Graph mode (dualmode.graph) traces
the same `build()` and an equivalent update into one compiled graph. Everything that outlives a call (the
parameters, the optimizer's state and param groups, the scheduler, the step count, gradients being
accumulated) lives in the ordinary PyTorch objects, so the mode can change between any two calls.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dualmode.graph.report import Explanation
from dualmode.step import ddp, finite, grads, policy, state
from dualmode.step.config import StepConfig
from dualmode.step.outputs import detached, loss_of
from dualmode.step.view import StepView

MODES = ("graph", "eager")


class TrainGraph:
    """A training (or evaluation) step: subclass it, assign modules, add an optimizer, write `build()`.

    Example:
        >>> import torch, dualmode as dm
        >>> class Step(dm.TrainGraph):
        ...     def __init__(self, model, optimizer):
        ...         super().__init__(mode="eager")
        ...         self.model = model
        ...         self.add_optimizer(optimizer)
        ...     def build(self, x, y):
        ...         loss = torch.nn.functional.mse_loss(self.model(x), y)
        ...         loss.backward()
        ...         return loss
        >>> model = torch.nn.Linear(3, 1)
        >>> step = Step(model, torch.optim.SGD(dm.param_groups(model), lr=0.1))
        >>> loss = step(torch.randn(8, 3), torch.randn(8, 1))
        >>> step.step_count
        1

    Args:
        mode: "graph" (compile the whole step with torch.compile on the first call) or "eager".
        config: a `StepConfig`; a default one if None.

    Returns:
        Calling the step runs one step (or micro-batch) and returns what `build()` returned, detached.
    Raises:
        ValueError: an unknown mode, a second optimizer, a scheduler built on another optimizer, no module.
        TypeError: a config that is not a StepConfig, an optimizer that is not a torch.optim.Optimizer.
        FloatingPointError: with `config.check_finite`, a non-finite loss; that step's update is skipped.
    """

    def __init__(self, *, mode: str = "graph", config: StepConfig | None = None):
        self.config = config if config is not None else StepConfig()
        if not isinstance(self.config, StepConfig):
            raise TypeError(f"config must be a dualmode.StepConfig, got {type(self.config).__name__}")
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scheduler = None
        self.step_count = 0
        self._micro_steps = 0
        self._graph = None  # the GraphRunner, made on the first graph-mode call (it loads dynamo and inductor)
        self.mode = mode

    # Definition -------------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """ "graph" or "eager"; may be changed between calls without losing any state."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be 'graph' or 'eager', got {value!r}")
        self._mode = value

    def add_optimizer(self, optimizer: torch.optim.Optimizer, *, lr_sch=None) -> None:
        """Train with `optimizer` (and step `lr_sch`, a torch.optim.lr_scheduler built on it, after each update)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"add_optimizer expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self.optimizer is not None:
            raise ValueError(f"{type(self).__name__} already has an optimizer; a TrainGraph steps exactly one")
        if lr_sch is not None:
            if not callable(getattr(lr_sch, "step", None)):
                raise TypeError(f"lr_sch must be a torch.optim.lr_scheduler object, got {type(lr_sch).__name__}")
            if getattr(lr_sch, "optimizer", None) is not optimizer:
                raise ValueError(f"lr_sch ({type(lr_sch).__name__}) was built on another optimizer than the one given")
        policy.check_groups(optimizer.param_groups)
        policy.check_steppable(optimizer)
        self.optimizer = optimizer
        self.lr_scheduler = lr_sch

    def build(self, *args, **kwargs):
        """The step: forward, `loss.backward()`, return the loss (or outputs). Subclasses define it."""
        raise NotImplementedError(f"{type(self).__name__} must define build(self, ...)")

    # Running ----------------------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        """Run one step (or one micro-batch of it); return what build() returned, detached."""
        modules = self._check_ready()
        phase = self._phase()
        if self._mode == "graph":
            out = self._graph_runner().run(self._view(modules), phase, args, kwargs)  # check_finite: in the graph
            if phase in ("step", "apply"):
                policy.mark_stepped(self.optimizer)
            if phase == "apply":
                self.optimizer.zero_grad(set_to_none=True)
        else:
            # A build() or update that raises leaves p.grad as before the call (summed micro-batches kept).
            with grads.restored_on_error(grads.every_param(self.optimizer, self._modules_of_step())):
                out = self._eager(phase, args, kwargs)
        return self._finish(phase, out)

    def _check_ready(self) -> list[tuple[str, nn.Module]]:
        """The step's modules, once the config, the modules and the groups are checked."""
        self.config.validate()
        modules = self._modules_of_step()
        if not modules:
            raise ValueError(f"{type(self).__name__} has no nn.Module attribute: assign the model in __init__")
        if self.optimizer is not None:
            policy.check_groups(self.optimizer.param_groups)
        return modules

    def _graph_runner(self):
        if self._graph is None:
            from dualmode.graph.runner import GraphRunner

            self._graph = GraphRunner()
        return self._graph

    def _view(self, modules: list[tuple[str, nn.Module]]) -> StepView:
        return StepView(type(self).__name__, modules, self.optimizer, self.config, self._run_build, owner=self)

    def _phase(self) -> str:
        """eval (no optimizer), step (update now), accumulate (add gradients only) or apply (add, then update)."""
        if self.optimizer is None:
            return "eval"
        k = self.config.grad_accumulation_steps
        if k == 1:
            return "step"
        return "apply" if self._micro_steps + 1 >= k else "accumulate"

    def _eager(self, phase: str, args: tuple, kwargs: dict):
        if phase == "eval":
            with torch.no_grad():
                return self._run_build(args, kwargs)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        with torch.enable_grad(), ddp.no_sync([m for _, m in self._modules_of_step()], phase == "accumulate"):
            out = self._run_build(args, kwargs)
        if all(p.grad is None for p in params):
            raise policy.no_gradient_error(type(self).__name__)
        if self.config.check_finite:  # a refusal leaves p.grad as before the call (grads.restored_on_error)
            self._check_finite(out, [p for p in params if p.grad is not None])
        if phase in ("step", "apply"):
            self._clip_eager()
            with _effective_lr(self.optimizer):
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return out

    def _run_build(self, args: tuple, kwargs: dict):
        """build() under the config's autocast; graph mode calls this while tracing."""
        dtype = self.config.autocast_dtype
        autocast = contextlib.nullcontext() if dtype is None else torch.autocast(self._device_type(), dtype=dtype)
        with autocast, policy.optimizer_calls_refused(self.optimizer, type(self).__name__):
            return self.build(*args, **kwargs)

    def _check_finite(self, out, params: list) -> None:
        name = type(self).__name__
        loss = finite.loss_for_check(out, name)
        flags = finite.finite_flags(loss, [p.grad for p in params])
        here = bool(flags.all())
        bad_ranks = ddp.ranks_not_finite(here, [m for _, m in self._modules_of_step()])  # None without DDP
        if here and not bad_ranks:
            return
        names = state.tensor_names(self)
        named = [finite.on_rank(r) for r in bad_ranks or []]
        named += finite.culprits(flags, loss, [names.get(id(p), "a parameter") for p in params])
        raise finite.refusal(name, self.step_count, named, "the update was skipped and gradients restored")

    def _clip_eager(self) -> None:
        groups = self.optimizer.param_groups
        for clip in policy.clip_sets(groups, self.config):
            params = [p for i in clip.groups for p in groups[i]["params"] if p.grad is not None]
            if params:
                nn.utils.clip_grad_norm_(params, clip.max_norm, clip.norm_type)

    def _finish(self, phase: str, out):
        out = detached(out)
        if phase == "accumulate":
            self._micro_steps += 1
        elif phase in ("step", "apply"):
            self._micro_steps = 0
            self.step_count += 1
            if self.lr_scheduler is not None:
                if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    loss = loss_of(out)
                    if loss is None:
                        raise ValueError("ReduceLROnPlateau needs the loss: build() must return it (a scalar "
                                         "tensor, a sequence starting with it, or a dict with a 'loss' entry)")
                    self.lr_scheduler.step(float(loss))
                else:
                    self.lr_scheduler.step()
        return out

    def _modules_of_step(self) -> list[tuple[str, nn.Module]]:
        return [(name, v) for name, v in vars(self).items() if isinstance(v, nn.Module)]

    def _device_type(self) -> str:
        for _, module in self._modules_of_step():
            for p in module.parameters():
                return p.device.type
        return "cpu"

    # Inspection -------------------------------------------------------------------------------------------

    @property
    def compile_count(self) -> int:
        """How many times graph mode traced and compiled the step so far (0 in eager mode)."""
        return 0 if self._graph is None else self._graph.compile_count

    @property
    def graph_module(self) -> torch.fx.GraphModule | None:
        """The traced step (forward, backward and update) last compiled; None before the first graph call."""
        return None if self._graph is None else self._graph.graph_module

    @property
    def effective_lrs(self) -> list[float]:
        """The lr each group is updated with at the next step, that is group["lr"] x group["lr_scale"]."""
        if self.optimizer is None:
            return []
        return [policy.effective_lr(g, i) for i, g in enumerate(self.optimizer.param_groups)]

    def explain(self) -> Explanation:
        """What graph mode compiled: graphs, breaks, compiles and the reason of each recompile."""
        if self._graph is None:
            return Explanation(self._mode)
        return Explanation(self._mode, list(self._graph.records), self._graph.graphs, self._graph.buffers.state())

    def __repr__(self) -> str:
        from dualmode.groups.describe import describe

        return describe(self)

    # Saving and loading -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Modules, optimizer, scheduler, step count and an accumulation window in progress (its micro-step count
        and summed gradients), with the layout of the groups, as live references (like torch's state_dict)."""
        return state.build(self)

    def load_state_dict(self, saved: dict) -> None:
        """Load what `state_dict()` gave, from either mode; copies, so nothing is shared with the source.

        Everything is checked before anything is loaded: a mismatch raises `dm.CheckpointError` naming it and
        leaves this step unchanged.
        """
        state.check(self, saved)
        state.load(self, saved)


@contextlib.contextmanager
def _effective_lr(optimizer: torch.optim.Optimizer):
    """For the length of one optimizer.step(): group["lr"] becomes lr x lr_scale, then exactly what it was."""
    saved = [g["lr"] for g in optimizer.param_groups]
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = policy.scaled_lr(group["lr"], group, i)
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr

