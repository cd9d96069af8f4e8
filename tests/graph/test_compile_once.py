"""Graph mode compiles once: a short last batch runs the same compiled step (symbolic batch dimension), and
what still recompiles says how to avoid it. Every run is compared with eager mode on the same batches."""

import pytest
import torch

import dualmode as dm
from tests.steps import FAST, Step, assert_same_state, snapshot, tiny_groups, tiny_net


def loader(sizes, features=6, seed=1):
    """Batches as a DataLoader without drop_last gives them: full ones, then a short last one."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, features, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def run(step_class, mode, batches, compile_options=FAST, **config):
    model = tiny_net()
    optimizer = torch.optim.SGD(tiny_groups(model), lr=0.1, momentum=0.9)
    step = step_class(model, optimizer, mode=mode,
                      config=dm.StepConfig(compile_options=dict(compile_options), **config))
    losses = [step(x, y) for x, y in batches]
    return step, losses


def assert_matches_eager(step_class, batches, graph_step, graph_losses):
    eager_step, eager_losses = run(step_class, "eager", batches)
    assert_same_state(snapshot(eager_step), snapshot(graph_step))
    torch.testing.assert_close(torch.stack(graph_losses), torch.stack(eager_losses), rtol=1e-4, atol=1e-5)


def dynamo_graphs() -> int:
    """Graphs compiled by the backend in this process (AOTAutograd counts each one), whoever asked."""
    return torch._dynamo.utils.counters["aot_autograd"]["total"]


def test_short_last_batch_does_not_recompile_and_matches_eager():
    batches = loader([64, 64, 29])
    before = dynamo_graphs()
    step, losses = run(Step, "graph", batches)  # filterwarnings=error: a RecompileWarning would fail here
    assert step.compile_count == 1
    assert dynamo_graphs() - before == 1  # no recompile hidden inside torch.compile either
    assert step.explain().compiles[0].batch == "symbolic (input 0, input 1)"
    assert_matches_eager(Step, batches, step, losses)


def test_evaluation_graph_takes_any_batch_size():
    model = tiny_net()
    step = Step(model, mode="graph")
    for x, _ in loader([16, 5]):
        torch.testing.assert_close(step(x, None), model(x).detach())
    assert step.compile_count == 1


class FixedBatchStep(Step):
    """build() reshapes to a literal batch size: the trace cannot keep the batch symbolic."""

    def build(self, x, y):
        loss = self.loss_fn(self.model(x.reshape(64, 6)), y)
        loss.backward()
        return loss


def test_batch_fixed_by_build_recompiles_with_a_drop_last_hint():
    step, _ = run(FixedBatchStep, "graph", loader([64]))
    assert step.explain().compiles[0].batch.startswith("fixed by build()")
    x, y = loader([29])[0]
    warns = pytest.warns(dm.RecompileWarning, match=r"new input shape: input 0 \(64, 6\) -> \(29, 6\).*drop_last")
    with pytest.raises(dm.TraceError), warns:  # reshape(64, 6) of 29 rows cannot work in any mode
        step(x, y)


class BranchOnBatchStep(Step):
    """build() takes a branch on the batch size: the compiled step holds for the sizes on that branch only."""

    def build(self, x, y):
        out = self.model(x)
        if x.shape[0] > 20:
            out = out * 2.0
        loss = self.loss_fn(out, y)
        loss.backward()
        return loss


def test_a_condition_on_the_batch_size_is_checked_and_recompiles_when_it_fails():
    batches = loader([64, 29, 8, 8])
    model = tiny_net()
    step = BranchOnBatchStep(model, torch.optim.SGD(tiny_groups(model), lr=0.1, momentum=0.9), mode="graph")
    losses = [step(*batches[0]), step(*batches[1])]  # both > 20: one compile
    assert step.compile_count == 1
    with pytest.warns(dm.RecompileWarning, match=r"input 0 \(batch, 6\) -> \(8, 6\).*drop_last=True"):
        losses.append(step(*batches[2]))
    losses.append(step(*batches[3]))
    assert step.compile_count == 2
    assert_matches_eager(BranchOnBatchStep, batches, step, losses)


class SequenceStep(Step):
    """Inputs (batch, time, features): the time dimension is not the batch and stays a constant."""

    def build(self, x, y):
        loss = self.loss_fn(self.model(x).mean(1), y)
        loss.backward()
        return loss


def test_other_shape_changes_recompile_with_a_warning_that_says_how_to_avoid_it():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (8,), generator=g)
    step, _ = run(SequenceStep, "graph", [(torch.randn(8, 5, 6, generator=g), y)])
    with pytest.warns(dm.RecompileWarning, match=r"\(batch, 5, 6\) -> \(batch, 7, 6\); only the first \(batch\) "
                                                 r"dimension may change without a recompile"):
        step(torch.randn(8, 7, 6, generator=g), y)
    step(torch.randn(3, 7, 6, generator=g), y[:3])  # a new batch size of the new shape: no compile
    assert step.compile_count == 2


def test_dynamic_batch_false_keys_on_the_batch_size():
    step, _ = run(Step, "graph", loader([16]), dynamic_batch=False)
    with pytest.warns(dm.RecompileWarning, match="drop_last=True"):
        step(*loader([5])[0])
    assert step.compile_count == 2


@pytest.mark.inductor
def test_short_last_batch_with_inductor_matches_eager():
    batches = loader([64, 64, 29])
    options = {"backend": "inductor", "mode": None, "dynamic": False, "options": None}
    before = dynamo_graphs()
    step, losses = run(Step, "graph", batches, compile_options=options)
    assert step.compile_count == 1 and dynamo_graphs() - before == 1
    assert_matches_eager(Step, batches, step, losses)


@pytest.mark.inductor
def test_the_same_step_compiled_again_is_a_hit_in_aotautograds_cache():
    # What makes a warm first call cheap: AOTAutograd's cache returns the compiled graph without tracing it again.
    # Its key pickles the traced module (compile.py drops make_fx's ShapeEnv, which it cannot pickle) and, with
    # compile.compiling's setting, reads the placeholder names as they are instead of renaming them.
    options = {"backend": "inductor", "mode": None, "dynamic": False, "options": None}
    hits = torch._dynamo.utils.counters["aot_autograd"]
    run(Step, "graph", loader([16]), compile_options=options)
    before = hits["autograd_cache_hit"]
    step, losses = run(Step, "graph", loader([16, 7]), compile_options=options)
    assert hits["autograd_cache_hit"] == before + 1 and step.compile_count == 1
    assert_matches_eager(Step, loader([16, 7]), step, losses)


def test_the_compile_settings_hold_for_the_compile_only():
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    from dualmode.graph.compile import compiling

    def settings():
        return (inductor_config.size_asserts, inductor_config.max_fusion_buffer_group_pairwise_attempts,
                functorch_config.autograd_cache_normalize_inputs)

    before = settings()
    with compiling(None):
        assert settings() == (False, 8, False)
        with inductor_config.patch(max_fusion_buffer_group_pairwise_attempts=64):  # as compile_options["options"]
            assert inductor_config.max_fusion_buffer_group_pairwise_attempts == 64
    assert settings() == before


@pytest.mark.parametrize("optimizer", [
    lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, dampening=0.1),
    lambda g: torch.optim.Adam(g, lr=1e-2),
], ids=["sgd-momentum-dampening", "adam"])
def test_gradient_accumulation_compiles_two_graphs_once_and_matches_eager(optimizer):
    # Two graphs (add the micro-batch; add and update), each compiled once: benchmarks/accumulation.py measured
    # one graph with a runtime flag slower per micro-step and no cheaper to compile (docs/modes.md).
    batches = loader([16, 16, 16, 16, 16, 16, 16, 5])  # two full windows of 3, then two micro-steps, one short
    results = {}
    for mode in ("eager", "graph"):
        graphs_before = dynamo_graphs()
        model = tiny_net()
        step = Step(model, optimizer(tiny_groups(model)), mode=mode,
                    config=dm.StepConfig(compile_options=dict(FAST), grad_accumulation_steps=3))
        for i, (x, y) in enumerate(batches):
            before = [p.detach().clone() for p in model.parameters()]
            step(x, y)
            if i % 3 != 2:  # not the k-th micro-step: nothing is updated, bit for bit, and no state is created
                assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
                if i < 2:
                    assert not step.optimizer.state
        results[mode] = snapshot(step), [p.grad for p in model.parameters()], step.step_count
        if mode == "graph":
            assert step.compile_count == 2 and dynamo_graphs() - graphs_before == 2
            assert [c.phase for c in step.explain().compiles] == ["accumulate", "apply"]
    eager_state, eager_grads, eager_count = results["eager"]
    graph_state, graph_grads, graph_count = results["graph"]
    assert eager_count == graph_count == 2
    assert_same_state(eager_state, graph_state)
    for a, b in zip(eager_grads, graph_grads):  # the gradients of the unfinished window, summed alike
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
