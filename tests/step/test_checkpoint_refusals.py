"""Every state or checkpoint that does not fit is refused before anything changes, naming what differs.

Each case loads into a live eager step that is one micro-batch into an accumulation window (parameters,
AdamW state, OneCycleLR, a summed gradient); afterwards the step equals a deep copy taken before, bit for bit,
and trains on exactly like it.
"""

from __future__ import annotations

import copy
import io
import json
import re

import pytest
import torch
from torch import nn

import dualmode as dm
from dualmode.step import checkpoint
from tests.steps import FAST, Step, TinyNet, assert_bitwise, batches, tiny_groups, tiny_net

CALLS = 3  # with grad_accumulation_steps=2: one update, then one micro-batch into the next window


def make_step(model=None, *, groups=None, optimizer=None, scheduler="onecycle", accumulate=2):
    model = model if model is not None else tiny_net(0)
    groups = groups(model) if groups else tiny_groups(model)
    optimizer = (optimizer or (lambda g: torch.optim.AdamW(g, lr=1e-2)))(groups)
    if scheduler == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=20)
    elif scheduler == "steplr":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    step = Step(model, optimizer, scheduler, mode="eager",
                config=dm.StepConfig(grad_accumulation_steps=accumulate, compile_options=dict(FAST)))
    dtype = next(model.parameters()).dtype
    for x, y in batches(CALLS, seed=7, dtype=dtype):
        step(x, y)
    return step


def everything(step) -> dict:
    """What a refused load must leave as it was: the whole state, the gradients and the RNG."""
    return copy.deepcopy({"state": step.state_dict(), "grads": [p.grad for p in step.model.parameters()],
                          "rng": torch.get_rng_state()})


def twin_of(step):
    """A deep copy of the step, gradients included (deepcopy of a Parameter leaves out its .grad)."""
    twin = copy.deepcopy(step)
    for p, q in zip(step.model.parameters(), twin.model.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    return twin


def assert_untouched_and_trains_on(live, twin, before) -> None:
    assert_bitwise(before, everything(live), "live step after the refused load")
    for x, y in batches(3, seed=8):
        live(x, y)
        twin(x, y)
    assert_bitwise(everything(twin)["state"], everything(live)["state"], "live step trained on vs its copy")


@pytest.fixture
def live():
    step = make_step()
    assert step._micro_steps == 1 and step.model.fc1.weight.grad is not None
    return step


def two_groups(model):
    return dm.param_groups(model, [{"params": "fc1.*", "lr_scale": 0.5}], default={})


def moved_group(model):
    return dm.param_groups(model, [{"params": ["fc1.*", "fc2.bias"], "lr_scale": 0.5},
                                   {"params": "head.*", "lr_scale": 2.0}], default={})


def swapped_names(model):
    return dm.param_groups(model, [{"params": ["fc1.weight", "fc2.bias"], "lr_scale": 0.5},
                                   {"params": "head.*", "lr_scale": 2.0}], default={})


def wider_head():
    model = tiny_net(0)
    model.head = nn.Linear(8, 4)
    return model


def without(key):
    def edit(state):
        del state[key]
    return edit


def set_to(key, value):
    def edit(state):
        state[key] = value
    return edit


def lying_layout(state):  # claims SGD; the optimizer state is AdamW's
    state["layout"]["optimizer"] = "torch.optim.sgd.SGD"


def dropped_state_key(state):
    state["optimizer"]["state"][0].pop("exp_avg_sq")


def wrong_grad_shape(state):
    state["grads"]["model.fc1.weight"] = torch.zeros(2, 2)


# (id, source step factory, edit of the source's state or None, live step factory or None, error regex)
CASES = [
    ("group count", lambda: make_step(groups=two_groups), None, None,
     r"the state has 2 param groups, this step's optimizer has 3"),
    ("tensors per group", lambda: make_step(groups=moved_group), None, None,
     r"param group 0: the state has 3 parameters, this step has 2 \(\['model.fc1.weight', 'model.fc1.bias'\]\)"),
    ("parameter names", lambda: make_step(groups=swapped_names), None, None,
     r"param group 0, parameter 1: the state has 'model.fc2.bias', this step has 'model.fc1.bias'"),
    ("shape", lambda: make_step(wider_head()), None, None,
     r"param group 1, parameter 0 \('model.head.weight'\): this step has shape \(3, 8\), the state \(4, 8\)"),
    ("dtype", lambda: make_step(tiny_net(0, torch.float64)), None, None,
     r"param group 0, parameter 0 \('model.fc1.weight'\): this step has dtype torch.float32, the state "
     r"torch.float64"),
    ("optimizer class", lambda: make_step(optimizer=lambda g: torch.optim.Adam(g, lr=1e-2)), None,
     lambda: make_step(optimizer=lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9)),
     r"saved with optimizer torch.optim.adam.Adam, this step has torch.optim.sgd.SGD"),
    ("Adam state behind an SGD layout", make_step, lying_layout,
     lambda: make_step(optimizer=lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9)),
     r"param group 0: the optimizer state lacks \['dampening', 'momentum', 'nesterov'\], which this step's "
     r"SGD group has"),
    ("per-parameter state keys", make_step, dropped_state_key, None,
     r"optimizer state of 'model.fc1.weight': this step's AdamW keeps \['exp_avg', 'exp_avg_sq', 'step'\], the "
     r"state \['exp_avg', 'step'\]"),
    ("scheduler class", lambda: make_step(scheduler="steplr"), None, None,
     r"saved with lr_scheduler torch.optim.lr_scheduler.StepLR, this step has "
     r"torch.optim.lr_scheduler.OneCycleLR"),
    ("no scheduler", lambda: make_step(scheduler=None), None, None,
     r"saved with lr_scheduler None, this step has torch.optim.lr_scheduler.OneCycleLR"),
    ("scheduler entry missing", make_step, lambda s: s["lr_scheduler"].pop("total_steps"), None,
     r"the lr_scheduler state lacks \['total_steps'\], which this step's OneCycleLR has"),
    ("module entry missing", make_step, lambda s: s["modules"]["model"].pop("unused.bias"), None,
     r"the state of module 'model' does not match: missing \['unused.bias'\], unexpected \[\]"),
    ("step_count missing", make_step, without("step_count"), None, r"the state lacks \['step_count'\]"),
    ("layout missing", make_step, without("layout"), None, r"the state lacks \['layout'\]"),
    ("step_count not a count", make_step, set_to("step_count", 2.5), None,
     r"the state's step_count must be an int >= 0, got 2.5"),
    ("window longer than the config's", lambda: make_step(accumulate=4), None, None,
     r"the state is 3 micro-batches into an accumulation window, but this step's config.grad_accumulation_steps "
     r"is 2"),
    ("gradient of another shape", make_step, wrong_grad_shape, None,
     r"gradient of 'model.fc1.weight': this step has shape \(8, 6\), the state \(2, 2\)"),
    ("gradient of no parameter", make_step, lambda s: s["grads"].update(nope=torch.zeros(1)), None,
     r"a gradient for 'nope', which is not a parameter of this step's optimizer"),
    ("gradients outside a window", make_step, set_to("micro_steps", 0), None,
     r"gradients of .* but no accumulation window in progress"),
]


@pytest.mark.parametrize("source, edit, target, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_load_state_dict_refuses_and_changes_nothing(source, edit, target, message):
    live = target() if target else make_step()
    state = copy.deepcopy(source().state_dict())
    if edit:
        edit(state)
    twin, before = twin_of(live), everything(live)
    with pytest.raises(dm.CheckpointError, match=message):
        live.load_state_dict(state)
    assert_untouched_and_trains_on(live, twin, before)


def write_state(path, state) -> None:
    """A checkpoint file with a valid header and checksum around a payload built by hand."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    checkpoint.write_payload(path, buffer.getvalue())


@pytest.mark.parametrize("source, edit, target, message", [c[1:] for c in CASES[:12:3]],
                         ids=[c[0] for c in CASES[:12:3]])
def test_load_checkpoint_refuses_a_file_that_does_not_fit(tmp_path, source, edit, target, message):
    live = target() if target else make_step()
    path = tmp_path / "c.ckpt"
    dm.save_checkpoint(path, source())
    if edit:
        payload = torch.load(io.BytesIO(checkpoint.read_payload(path)), weights_only=True)
        edit(payload["state"])
        write_state(path, payload)
    twin, before = twin_of(live), everything(live)
    with pytest.raises(dm.CheckpointError, match=rf"^{re.escape(str(path))}: (the state was )?{message}"):
        dm.load_checkpoint(path, live)
    assert_untouched_and_trains_on(live, twin, before)


def truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[:-100])


def flipped(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


def newer(path):
    header, _, payload = path.read_bytes().partition(b"\n")
    fields = json.loads(header)
    fields["version"] = checkpoint.VERSION + 1
    path.write_bytes(json.dumps(fields).encode() + b"\n" + payload)


def plain_torch_save(path):
    torch.save(make_step().state_dict(), path)


def no_rng(path):
    payload = torch.load(io.BytesIO(checkpoint.read_payload(path)), weights_only=True)
    del payload["rng"]
    write_state(path, payload)


def bad_rng(path):
    payload = torch.load(io.BytesIO(checkpoint.read_payload(path)), weights_only=True)
    payload["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)
    write_state(path, payload)


def unsafe_pickle(path):
    write_state(path, {"state": {}, "rng": {}, "mode": "eager", "extra": {"callback": nn.Linear(2, 2)}})


def not_torch(path):
    checkpoint.write_payload(path, b"hello, not a zip file")


@pytest.mark.parametrize("damage, message", [
    (truncated, r"the file is truncated: \d+ bytes of payload, the header says \d+"),
    (flipped, r"the checksum does not match .*: the file was altered after it was written"),
    (newer, rf"has format version {checkpoint.VERSION + 1} \(written by dualmode .*\); this dualmode .* reads up "
            rf"to version {checkpoint.VERSION}"),
    (plain_torch_save, r"is not a dualmode checkpoint"),
    (no_rng, r"the payload lacks entries; it holds \['extra', 'mode', 'state', 'step_class'\]"),
    (bad_rng, r"the torch CPU random number generator state is not a uint8 tensor"),
    (unsafe_pickle, r"the payload cannot be read \(UnpicklingError"),
    (not_torch, r"the payload cannot be read"),
], ids=lambda v: getattr(v, "__name__", ""))
def test_a_damaged_file_is_refused_and_changes_nothing(tmp_path, live, damage, message):
    path = tmp_path / "c.ckpt"
    dm.save_checkpoint(path, make_step())
    damage(path)
    twin, before = twin_of(live), everything(live)
    with pytest.raises(dm.CheckpointError, match=message):
        dm.load_checkpoint(path, live)
    assert_untouched_and_trains_on(live, twin, before)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(dm.CheckpointError, ValueError)


def test_a_good_state_loads_into_the_same_live_step_and_shares_nothing(live):
    source = make_step(tiny_net(4))
    live.load_state_dict(source.state_dict())
    assert_bitwise(everything(source)["state"], everything(live)["state"])
    ptrs = {t.data_ptr() for t in [*source.model.parameters(), *[p.grad for p in source.model.parameters()
                                                                  if p.grad is not None]]}
    assert not ptrs & {t.data_ptr() for t in [*live.model.parameters(), *[p.grad for p in live.model.parameters()
                                                                         if p.grad is not None]]}
    assert isinstance(live.model, TinyNet)


def test_cuda_rng_states_without_those_devices_load_with_a_warning(tmp_path, live):
    """A checkpoint from a GPU machine loads on this one; CUDA's RNG cannot be set here, and that is said."""
    path = tmp_path / "gpu.ckpt"
    dm.save_checkpoint(path, make_step(tiny_net(4)))
    payload = torch.load(io.BytesIO(checkpoint.read_payload(path)), weights_only=True)
    payload["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * (torch.cuda.device_count() + 1)
    write_state(path, payload)
    with pytest.warns(UserWarning, match=r"random states of \d+ CUDA devices, this process has \d+: they are not set"):
        dm.load_checkpoint(path, live)
    assert torch.equal(live.model.fc1.weight, make_step(tiny_net(4)).model.fc1.weight)
