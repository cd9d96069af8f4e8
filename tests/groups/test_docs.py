"""The param_groups guide, the example script and describe()'s docstring run as written."""

import doctest
import importlib
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_guide_examples_run():
    result = doctest.testfile(str(ROOT / "docs" / "param_groups.md"), module_relative=False,
                              optionflags=doctest.ELLIPSIS)
    assert result.attempted > 10 and result.failed == 0


def test_describe_docstring_runs():
    result = doctest.testmod(importlib.import_module("dualmode.groups.describe"))
    assert result.attempted > 0 and result.failed == 0


def test_example_script_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "param_groups_basics.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "SGD with 4 param groups"
    assert [line.split()[6] for line in lines[2:6]] == ["0.2", "0.02", "0.1", "0.01"]  # effective lr
    assert lines[-1].startswith("ValueError: rule 0 (tensor of shape (3, 64, 64)): the tensor is not a parameter")
