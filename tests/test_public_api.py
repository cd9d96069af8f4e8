"""Every public name imports, and the docstring examples run."""

import doctest
import importlib

import pytest

import dualmode as dm


def test_every_name_in_all_is_importable_and_public():
    assert sorted(dm.__all__) == dm.__all__
    for name in dm.__all__:
        assert getattr(dm, name) is not None
        assert not name.startswith("_")


@pytest.mark.parametrize("module", ["dualmode.step.train_graph", "dualmode.groups.resolver"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
