"""lasting.py: descriptions of values that mean the same in another process (what a saved trace is checked
against), and the globals of the program's code that are read along the way."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from torch import nn

from dualmode.graph import lasting
from dualmode.graph.lasting import Describer, NotLasting

SCALE = 2.0
SETTINGS = argparse.Namespace(smoothing=0.1, name="run")


def uses_scale(x):
    return x * SCALE


def uses_helper(x):
    return uses_scale(x) + SETTINGS.smoothing


def scaled_by(factor):
    return lambda x: x * factor


def describer(model: nn.Module | None = None) -> Describer:
    model = model or nn.Linear(2, 2)
    labels = {id(m): name or "model" for name, m in model.named_modules()}
    return Describer(labels, {id(p): f"model.{n}" for n, p in model.named_parameters()})


def test_a_function_is_its_code_defaults_and_closure():
    d = describer()
    assert d.describe(scaled_by(2.0), "f") == d.describe(scaled_by(2.0), "f")  # two objects, one meaning
    assert d.describe(scaled_by(2.0), "f") != d.describe(scaled_by(3.0), "f")
    assert d.describe(uses_scale, "f") != d.describe(uses_helper, "f")
    assert d.describe(uses_scale, "f")[:3] == ("function", __name__, "uses_scale")


def test_tensors_modules_and_objects():
    model = nn.Linear(2, 2)
    d = describer(model)
    assert d.describe(model.weight, "w") == ("input", "model.weight")  # an input of the graph: by name
    assert d.describe(model, "m")[:2] == ("step", "model")
    mask = torch.ones(3)
    before = d.describe(mask, "mask")
    mask[0] = 0.0
    assert d.describe(mask, "mask") != before  # any other tensor: by its values
    assert d.describe(torch.float16, "t") == ("torch", "torch.float16")
    assert d.describe({"a": [1, (2.5, "x")]}, "d") == d.describe({"a": [1, (2.5, "x")]}, "d")
    assert d.describe(argparse.Namespace(a=1), "n") != d.describe(argparse.Namespace(a=2), "n")
    with pytest.raises(NotLasting, match=r"self.extra: a ReLU that is not one of the step's modules"):
        d.describe(nn.ReLU(), "self.extra")
    with pytest.raises(NotLasting, match=r"self.lock: a _thread.lock value"):
        import threading

        d.describe(threading.Lock(), "self.lock")


def test_the_globals_of_the_programs_code_are_described_transitively():
    d = describer()
    d.describe(uses_helper, "build")
    d.walk()
    assert d.globals[(__name__, "SCALE")] == 2.0  # read by uses_scale, which uses_helper calls
    assert d.globals[(__name__, "SETTINGS")] == d.describe(SETTINGS, "s")
    assert d.globals[(__name__, "uses_scale")][:3] == ("function", __name__, "uses_scale")
    assert os.path.realpath(__file__) in map(os.path.realpath, d.files)  # its source file, to be hashed


def test_which_files_belong_to_the_program():
    assert lasting.is_program_file(__file__)
    assert not lasting.is_program_file(torch.__file__)
    assert not lasting.is_program_file(os.__file__)  # the standard library
    assert not lasting.is_program_file(lasting.__file__)  # dualmode's own: in the key, by a hash of its sources
    assert not lasting.is_program_file("<stdin>")


def test_a_codes_hash_does_not_depend_on_the_string_hash_seed(tmp_path):
    import subprocess
    import sys

    script = ("from dualmode.graph.lasting import code_hash\n"
              "def f(x):\n    return x in {'alpha', 'beta', 'gamma', 'delta'} and (1.5, 'k')\n"
              "print(code_hash(f.__code__))")
    hashes = {subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                             capture_output=True, text=True, timeout=120, check=True).stdout for seed in (1, 2, 3)}
    assert len(hashes) == 1
