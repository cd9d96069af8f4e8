"""How close graph mode comes to eager mode on torch's optimizer table: the largest differences per optimizer.

Runs the configurations of tests/graph/test_optim_db.py (torch's optim_db on CPU, three steps, two lr_scale groups,
ExponentialLR) in both modes, every configuration in float32 and float64, and records the largest absolute and
relative difference over parameters and optimizer state, and the compiles.

Run:  python benchmarks/optim_parity.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: tests.*
from tests.graph.test_optim_db import CASES, run
from tests.steps import snapshot


def differences(a, b) -> tuple[float, float]:
    pairs = [(a[0][k], b[0][k]) for k in a[0]]
    pairs += [(a[1][i][k], b[1][i][k]) for i in a[1] for k in a[1][i] if isinstance(a[1][i][k], torch.Tensor)]
    worst_abs = max(float((x - y).abs().max()) for x, y in pairs if x.numel())
    worst_rel = max(float(((x - y).abs() / y.abs().clamp_min(1e-30)).max()) for x, y in pairs if x.numel())
    return worst_abs, worst_rel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    seen, rows = set(), []
    for case in CASES:
        cls, kwargs, _ = case.values
        for dtype in (torch.float32, torch.float64):
            if (case.id.rsplit("-", 1)[0], dtype) in seen:
                continue
            seen.add((case.id.rsplit("-", 1)[0], dtype))
            eager, graph = run("eager", cls, kwargs, dtype), run("graph", cls, kwargs, dtype)
            worst_abs, worst_rel = differences(snapshot(eager), snapshot(graph))
            rows.append({"case": case.id.rsplit("-", 1)[0], "optimizer": cls.__name__, "dtype": str(dtype),
                         "max_abs": worst_abs, "max_rel": worst_rel, "compiles": graph.compile_count})
    summary = {}
    for r in rows:
        s = summary.setdefault((r["optimizer"], r["dtype"]), {"configs": 0, "max_abs": 0.0, "compiles": set()})
        s["configs"] += 1
        s["max_abs"] = max(s["max_abs"], r["max_abs"])
        s["compiles"].add(r["compiles"])
    print("| optimizer | dtype | configurations | largest abs. difference | compiles each |")
    print("| --- | --- | --- | --- | --- |")
    for (name, dtype), s in sorted(summary.items()):
        print(f"| {name} | {dtype.replace('torch.', '')} | {s['configs']} | {s['max_abs']:.1e} | "
              f"{sorted(s['compiles'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
