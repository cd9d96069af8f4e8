"""docs/checkpoints.md: every Python block runs as written, each on its own."""

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "docs" / "checkpoints.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)


def test_the_page_has_its_examples():
    assert len(BLOCKS) == 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_each_example_runs(index, capsys):
    exec(compile(BLOCKS[index], f"{PAGE}:block{index}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    expected = {0: "resumed at batch 6 - step 10",
                1: "this step has shape (3, 4), the state (2, 4)",
                2: "graph mode resumed an eager window: 3 updates, 2 compiles"}[index]
    assert expected in out
    if index == 1:
        assert "the file was altered after it was written" in out
