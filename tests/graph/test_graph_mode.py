"""Graph mode's promises beyond parity: recompiles that are reported, tied weights, accumulation, clipping,
autocast, evaluation graphs, saving and loading, mode switches, and errors that name the culprit."""

import pytest
import torch
from torch import nn

import dualmode as dm
from tests.steps import FAST, Step, assert_same_state, batches, snapshot, tiny_groups, tiny_net


def make_step(mode="graph", optimizer=lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9), **config):
    model = tiny_net()
    cfg = dm.StepConfig(compile_options=dict(FAST), **config)
    return Step(model, optimizer(tiny_groups(model)), mode=mode, config=cfg)


# Recompiles: exactly one per perturbation, with a warning that names the cause -----------------------------

def test_changing_lr_scale_recompiles_once_and_says_why():
    step = make_step()
    (x, y), = batches(1)
    step(x, y)
    step.optimizer.param_groups[1]["lr_scale"] = 3.0
    with pytest.warns(dm.RecompileWarning, match=r"lr_scale changed \(group 1: 2.0 -> 3.0\)"):
        step(x, y)
    step(x, y)
    assert step.compile_count == 2
    assert step.explain().recompiles == ["lr_scale changed (group 1: 2.0 -> 3.0)"]


def test_new_input_shape_recompiles_once_and_old_shape_is_cached():
    step = make_step(dynamic_batch=False)
    (x, y), = batches(1)
    step(x, y)
    with pytest.warns(dm.RecompileWarning, match=r"new input shape: input 0 \(16, 6\) -> \(5, 6\).*drop_last=True"):
        step(x[:5], y[:5])
    step(x, y)  # back to the first shape: cached, no compile
    assert step.compile_count == 2


def test_add_param_group_recompiles_and_trains_the_new_group():
    model = tiny_net()
    model.fc2.requires_grad_(False)
    groups = dm.param_groups(model, [{"params": "fc1.*", "lr_scale": 0.5}], default={})
    step = Step(model, torch.optim.SGD(groups, lr=0.1), mode="graph")
    (x, y), = batches(1)
    step(x, y)
    model.fc2.requires_grad_(True)
    step.optimizer.add_param_group({"params": list(model.fc2.parameters())})  # unfreezing, as fine-tuning does
    before = model.fc2.weight.detach().clone()
    with pytest.warns(dm.RecompileWarning, match="requires_grad of 'model.fc2.weight' changed: False -> True"):
        step(x, y)
    assert step.compile_count == 2
    assert not torch.equal(before, model.fc2.weight)


def test_frozen_then_unfrozen_layer_matches_eager():
    results = {}
    for mode in ("eager", "graph"):
        step = make_step(mode, optimizer=lambda g: torch.optim.Adam(g, lr=1e-2))
        step.model.fc2.requires_grad_(False)
        for i, (x, y) in enumerate(batches(4)):
            if i == 2:
                step.model.fc2.requires_grad_(True)
            if mode == "graph" and i == 2:
                with pytest.warns(dm.RecompileWarning, match="requires_grad of 'model.fc2.weight'"):
                    step(x, y)
            else:
                step(x, y)
        results[mode] = snapshot(step)
    assert_same_state(results["eager"], results["graph"])


def test_recompile_limit_raises_instead_of_falling_back():
    step = make_step(max_recompiles=1, dynamic_batch=False)
    (x, y), = batches(1)
    step(x, y)
    with pytest.warns(dm.RecompileWarning):
        step(x[:4], y[:4])
    with pytest.raises(dm.RecompileLimitError, match=r"new input shape.*max_recompiles=1"):
        step(x[:3], y[:3])


def test_many_instances_each_keep_their_own_compiled_step():
    # With dynamo's per-code-object cache limit at 1, a shared cache would raise (fullgraph=True) on the 2nd.
    (x, y), = batches(1)
    steps = [make_step() for _ in range(3)]
    with torch._dynamo.config.patch(recompile_limit=1):
        for step in steps:
            step(x, y)
            step(x, y)
    assert [s.compile_count for s in steps] == [1, 1, 1]


# Shapes of models and steps ---------------------------------------------------------------------------------

class TiedLM(nn.Module):
    """An output layer tied to the embedding, and one block reached under two names."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.block = nn.Linear(8, 8)
        self.again = self.block
        self.out = nn.Linear(8, 11, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.again(torch.tanh(self.block(self.embed(tokens))))))


@pytest.mark.parametrize("make_optimizer", [lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9),
                                            lambda g: torch.optim.AdamW(g, lr=1e-2)], ids=["sgd", "adamw"])
def test_tied_and_shared_parameters_are_updated_once_with_their_group_lr(make_optimizer):
    g = torch.Generator().manual_seed(0)
    tokens, targets = torch.randint(0, 11, (4, 5), generator=g), torch.randint(0, 11, (4, 5), generator=g)
    results = {}
    for mode in ("eager", "graph"):
        torch.manual_seed(0)
        model = TiedLM()
        groups = dm.param_groups(model, [{"params": "embed.*", "lr_scale": 3.0}], default={})
        assert sum(len(gr["params"]) for gr in groups) == 3  # embed.weight (= out.weight), block.weight, block.bias
        step = Step(model, make_optimizer(groups), mode=mode)
        step.build = lambda t, y, s=step: _lm_loss(s, t, y)
        for _ in range(3):
            step(tokens, targets)
        assert model.out.weight is model.embed.weight
        results[mode] = snapshot(step)
    assert_same_state(results["eager"], results["graph"])


def _lm_loss(step, tokens, targets):
    loss = nn.functional.cross_entropy(step.model(tokens).flatten(0, 1), targets.flatten())
    loss.backward()
    return loss


def test_evaluation_graph_returns_outputs_without_gradients():
    model = tiny_net()
    model.eval()
    (x, _), = batches(1)
    expected = model(x)
    for mode in ("eager", "graph"):
        step = Step(model, None, mode=mode)
        out = step(x, None)
        torch.testing.assert_close(out, expected.detach())
        assert not out.requires_grad and all(p.grad is None for p in model.parameters())
        assert step.step_count == 0


@pytest.mark.parametrize("k", [2, 3])
def test_gradient_accumulation_matches_eager(k):
    results = {}
    for mode in ("eager", "graph"):
        step = make_step(mode, grad_accumulation_steps=k)
        for x, y in batches(2 * k):
            step(x, y)
        assert step.step_count == 2
        results[mode] = snapshot(step)
    assert_same_state(results["eager"], results["graph"])


def test_accumulation_can_switch_mode_in_the_middle_of_a_window():
    results = {}
    for switch in (False, True):
        step = make_step("eager", grad_accumulation_steps=2)
        for i, (x, y) in enumerate(batches(4)):
            if switch:
                step.mode = "graph" if i % 2 else "eager"
            step(x, y)
        results[switch] = snapshot(step)
    assert_same_state(results[False], results[True])


@pytest.mark.parametrize("where", ["config", "group"])
def test_gradient_clipping_matches_torch_clip_grad_norm(where):
    results = {}
    for mode in ("eager", "graph"):
        extra = {"clip_grad_max_norm": 0.05, "clip_grad_norm_type": 2.0} if where == "config" else {}
        step = make_step(mode, **extra)
        if where == "group":
            step.optimizer.param_groups[0].update(clip_grad_max_norm=0.01, clip_grad_norm_type=1.0)
        for x, y in batches(3):
            step(x, y)
        results[mode] = snapshot(step)
    assert_same_state(results["eager"], results["graph"])
    unclipped = make_step("eager")
    for x, y in batches(3):
        unclipped(x, y)
    with pytest.raises(AssertionError):  # clipping did change the result
        assert_same_state(results["eager"], snapshot(unclipped))


def test_bf16_autocast_runs_in_both_modes_and_keeps_float32_parameters():
    losses = {}
    for mode in ("eager", "graph"):
        step = make_step(mode, autocast_dtype=torch.bfloat16)
        losses[mode] = [step(x, y).float().item() for x, y in batches(3)]
        assert all(p.dtype == torch.float32 for p in step.model.parameters())
    torch.testing.assert_close(torch.tensor(losses["graph"]), torch.tensor(losses["eager"]), rtol=2e-2, atol=2e-2)


def test_non_finite_loss_raises_and_leaves_state_unchanged():
    for mode in ("eager", "graph"):
        step = make_step(mode, check_finite=True)
        (x, y), = batches(1)
        step(x, y)
        before = snapshot(step)
        with pytest.raises(FloatingPointError, match="the loss is nan"):
            step(x * float("nan"), y)
        after = snapshot(step)
        assert_same_state(before, after, rtol=0, atol=0)
        assert step.step_count == 1


# Switching modes, saving, loading ---------------------------------------------------------------------------

def test_switching_modes_keeps_all_state():
    reference = make_step("eager", optimizer=lambda g: torch.optim.Adam(g, lr=1e-2))
    reference.lr_scheduler = None
    mixed = make_step("graph", optimizer=lambda g: torch.optim.Adam(g, lr=1e-2))
    for i, (x, y) in enumerate(batches(6)):
        mixed.mode = ("graph", "eager")[i // 2 % 2]
        reference(x, y)
        mixed(x, y)
    assert mixed.step_count == reference.step_count == 6
    assert_same_state(snapshot(reference), snapshot(mixed))


def test_state_dict_from_graph_mode_loads_into_eager_and_shares_nothing():
    source = make_step("graph", optimizer=lambda g: torch.optim.Adam(g, lr=1e-2))
    data = batches(5)
    for x, y in data[:3]:
        source(x, y)
    target = make_step("eager", optimizer=lambda g: torch.optim.Adam(g, lr=1e-2))
    target.load_state_dict(source.state_dict())
    assert target.step_count == 3
    source_ptrs = {t.data_ptr() for t in source.model.state_dict().values()}
    source_ptrs |= {t.data_ptr() for s in source.optimizer.state.values() for t in s.values()}
    target_ptrs = {t.data_ptr() for t in target.model.state_dict().values()}
    target_ptrs |= {t.data_ptr() for s in target.optimizer.state.values() for t in s.values()}
    assert not source_ptrs & target_ptrs
    for x, y in data[3:]:
        source(x, y)
        target(x, y)
    assert_same_state(snapshot(source), snapshot(target))


def test_load_state_dict_checks_everything_before_loading():
    step = make_step("eager")
    before = snapshot(step)
    bad = make_step("eager").state_dict()
    bad["modules"]["model"].pop("fc1.bias")
    with pytest.raises(ValueError, match=r"module 'model'.*missing \['fc1.bias'\]"):
        step.load_state_dict(bad)
    assert_same_state(before, snapshot(step), rtol=0, atol=0)


# Inspection and errors --------------------------------------------------------------------------------------

def test_graph_module_and_explain_describe_one_whole_step():
    step = make_step()
    assert step.graph_module is None
    (x, y), = batches(1)
    step(x, y)
    ops = {str(n.target) for n in step.graph_module.graph.nodes if n.op == "call_function"}
    assert "aten.addmm.default" in ops  # forward
    assert "aten.tanh_backward.default" in ops  # backward
    assert "aten._foreach_copy_.default" in ops  # the update written back into the parameters (one foreach copy)
    text = str(step.explain())
    assert "compiled graphs: 1" in text and "graph breaks: 0" in text and "recompiles: 0" in text


def test_repr_shows_mode_and_effective_lrs():
    step = make_step()
    assert step.effective_lrs == pytest.approx([0.05, 0.2, 0.1])
    text = repr(step)
    assert "graph" in text and "0.05" in text


def test_sparse_adam_is_named_in_graph_mode():
    step = make_step(optimizer=lambda g: torch.optim.SparseAdam([p for grp in g for p in grp["params"]], lr=0.1))
    (x, y), = batches(1)
    with pytest.raises(TypeError, match="graph mode cannot run SparseAdam: it steps sparse gradients only"):
        step(x, y)


def test_optimizer_hooks_are_refused_in_graph_mode():
    step = make_step()
    step.optimizer.register_step_post_hook(lambda *a: None)
    (x, y), = batches(1)
    with pytest.raises(TypeError, match="step hooks"):
        step(x, y)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_build_without_backward_is_an_error(mode):
    step = make_step(mode)
    step.build = lambda x, y: step.loss_fn(step.model(x), y)
    (x, y), = batches(1)
    with pytest.raises(RuntimeError, match=r"no gradient.*loss.backward\(\)"):
        step(x, y)


def test_bad_mode_and_bad_lr_scale_are_named():
    with pytest.raises(ValueError, match="mode must be 'graph' or 'eager', got 'fast'"):
        make_step(mode="fast")
    step = make_step()
    step.optimizer.param_groups[2]["lr_scale"] = -1.0
    (x, y), = batches(1)
    with pytest.raises(ValueError, match="param group 2: lr_scale must be a finite positive number, got -1.0"):
        step(x, y)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="grad_accumulation_steps"):
        dm.StepConfig(grad_accumulation_steps=0)
    with pytest.raises(ValueError, match="unknown keys \\['backnd'\\]"):
        dm.StepConfig(compile_options={"backnd": "inductor"})


@pytest.mark.parametrize("spoil", ["a field set", "compile_options changed in place"])
def test_a_config_spoiled_after_calls_is_named_at_the_next_call(spoil):
    # validate() skips a config unchanged since it passed: a set field or an in-place change is checked again.
    step = make_step()
    (x, y), = batches(1)
    step(x, y)
    if spoil == "a field set":
        step.config.max_recompiles = -1
    else:
        step.config.compile_options["backnd"] = "inductor"
    with pytest.raises(ValueError, match="max_recompiles must be|unknown keys \\['backnd'\\]"):
        step(x, y)


@pytest.mark.inductor
def test_inductor_compiles_the_whole_step_and_matches_eager():
    from torch._inductor.utils import run_and_get_code

    results = {}
    for mode in ("eager", "graph"):
        model = tiny_net()
        opt = torch.optim.Adam(tiny_groups(model), lr=1e-2)
        step = Step(model, opt, mode=mode, config=dm.StepConfig())  # the default backend: inductor
        data = batches(4)
        _, code = run_and_get_code(step, *data[0])
        for x, y in data[1:]:
            step(x, y)
        results[mode] = snapshot(step)
    assert step.compile_count == 1
    assert_same_state(results["eager"], results["graph"])
    # Graph mode checks every input's layout before the call (compile.compiling): no assert of inductor's own.
    assert len(code) == 1 and "assert_size_stride(" not in code[0]
    # A CPU step is built with inductor's C++ wrapper: the kernels and the wrapper in one library.
    assert "CppWrapperCodeCache" in code[0] and "async_compile.cpp_pybinding" not in code[0]


def test_optimizer_tensor_outside_the_step_modules_is_named_in_graph_mode():
    model = tiny_net()
    stray = torch.nn.Parameter(torch.randn(3, 64, 64))
    step = Step(model, torch.optim.SGD([{"params": list(model.parameters())}, {"params": [stray]}], lr=0.1))
    (x, y), = batches(1)
    with pytest.raises(ValueError, match=r"param group 1, parameter 0 \(shape \(3, 64, 64\)\) is not a parameter"):
        step(x, y)


def test_a_step_that_reads_tensor_values_is_refused_with_a_pointer_to_eager_mode():
    step = make_step()

    def build(x, y):
        loss = step.loss_fn(step.model(x), y)
        if loss.item() > 0:  # Python control flow on a tensor value
            loss.backward()
        return loss

    step.build = build
    (x, y), = batches(1)
    with pytest.raises(dm.TraceError, match=r"Step.build\(\) needs the Python value of a tensor \(at "
                                            r"test_graph_mode.py:\d+: `if loss.item\(\) > 0:.*`\).*mode='eager'"):
        step(x, y)
    step.mode = "eager"
    step(x, y)
    assert step.step_count == 1


def test_a_new_memory_layout_of_a_parameter_recompiles_with_its_name_and_matches_eager():
    results = {}
    for mode in ("eager", "graph"):
        step = make_step(mode, optimizer=lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9))
        for i, (x, y) in enumerate(batches(3)):
            if i == 1:  # the same values, stored transposed (as .to(memory_format=...) does for convolutions)
                w = step.model.fc1.weight
                w.data = w.data.t().contiguous().t()
            if mode == "graph" and i == 1:
                with pytest.warns(dm.RecompileWarning, match=r"strides of 'model.fc1.weight' changed: "
                                                             r"\(6, 1\) -> \(1, 8\)"):
                    step(x, y)
            else:
                step(x, y)
        results[mode] = snapshot(step)
    assert step.compile_count == 2
    assert_same_state(results["eager"], results["graph"])


def test_a_switch_change_recompiles_naming_the_switch_by_name():
    model = tiny_net()
    optimizer = torch.optim.SGD(tiny_groups(model), lr=0.1)
    step = Step(model, optimizer)
    (x, y), = batches(1)
    step(x, y)
    optimizer.param_groups[1]["momentum"] = 0.9
    with pytest.warns(dm.RecompileWarning, match=r"param group 1 changed its switches: momentum: False -> True"):
        step(x, y)
    assert step.compile_count == 2
