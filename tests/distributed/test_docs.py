"""docs/distributed.md's script runs as written (as one rank, with the cheap backend) and shows its buckets."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import torch.distributed as dist

from tests.steps import FAST

DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"


def test_the_guides_script_runs_and_explain_shows_two_buckets(monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert code.count("dm.StepConfig(") == 1
    code = code.replace("dm.StepConfig(", f"dm.StepConfig(compile_options={FAST!r}, ")  # no C++ compile here
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)  # what torchrun would set
    try:
        exec(compile(code, str(DOC), "exec"), {"__name__": "__main__"})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    out = capsys.readouterr().out
    assert "1 processes, 16 updates" in out
    assert "collectives in the graph: none; gradients summed here, reduced once at the update" in out
    assert "collectives in the graph: 2 all_reduce over 1 ranks; gradients in 2 buckets of at most 0.25 MiB" in out
