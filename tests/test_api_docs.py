"""The API page documents every public name; each docstring has its sections and an example that runs."""

import doctest
import importlib
import inspect
import re
from pathlib import Path

import pytest

import dualmode as dm

API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"
# The sections a docstring needs, by kind of name (napoleon renders them). A class takes Args or Attributes;
# an exception says when it is raised, in prose; a record that only dualmode builds (Explanation) raises nothing.
SECTIONS = {"function": ("Args:", "Returns:", "Raises:", "Example:"),
            "class": ("Raises:", "Example:"),
            "record": ("Attributes:", "Example:"),
            "exception": ("Example:",)}
RECORDS = {"Explanation"}


def kind(name: str) -> str:
    obj = getattr(dm, name)
    if name in RECORDS:
        return "record"
    if inspect.isclass(obj) and issubclass(obj, (Exception, Warning)):
        return "exception"
    return "class" if inspect.isclass(obj) else "function"


def test_every_public_name_is_on_the_api_page():
    directive = r"^\.\. auto(?:function|class|exception):: dualmode\.(\w+)$"
    documented = re.findall(directive, API_PAGE.read_text(), re.MULTILINE)
    assert sorted(documented) == sorted(dm.__all__)


@pytest.mark.parametrize("name", dm.__all__)
def test_docstring_has_its_sections(name):
    doc = inspect.getdoc(getattr(dm, name)) or ""
    missing = [s for s in SECTIONS[kind(name)] if not re.search(rf"^{s}$", doc, re.MULTILINE)]
    assert not missing, f"dualmode.{name}: the docstring lacks {missing}"
    if kind(name) == "class":
        assert re.search(r"^(Args|Attributes):$", doc, re.MULTILINE), f"dualmode.{name}: neither Args nor Attributes"


def test_docstring_examples_run():
    modules = sorted({getattr(dm, name).__module__ for name in dm.__all__})
    for module in modules:
        result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module
