"""The README's example runs as written, and its effective learning rates are what it says."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.inductor
def test_readme_example_runs_in_both_modes():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    step, optimizer = scope["step"], scope["optimizer"]
    assert step.compile_count == 1 and step.mode == "eager"
    loss = step(scope["x"], scope["y"])  # the eager call after the compiled one
    assert step.step_count == 2 and loss.ndim == 0
    by_name = {n: g["lr_scale"] for g in optimizer.param_groups for n in g["names"]}
    assert by_name == {"fc2.bias": 20.0, "fc1.bias": 2.0, "fc2.weight": 10.0, "fc1.weight": 1.0}
