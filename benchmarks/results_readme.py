"""Write benchmarks/results/README.md: a markdown table of every `dualmode bench` JSON file recorded there."""

from __future__ import annotations

import glob
import json
import os


def load_results(results_dir: str) -> list[tuple[str, dict]]:
    """(file name, result) of each dualmode-bench JSON file, mlp before mobilenet_v2, then by batch and cache."""
    found = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        if isinstance(result, dict) and result.get("schema") == "dualmode-bench/1":
            found.append((os.path.basename(path), result))
    return sorted(found, key=lambda item: (item[1]["settings"]["model"], item[1]["settings"]["batch_size"],
                                           "_cold" in item[0], item[0]))


def _variant_rows(result: dict) -> list[str]:
    s, m = result["settings"], result["machine"]
    rows = []
    for variant, v in result["variants"].items():
        if "error" in v:
            rows.append(f"| {s['model']} | {s['batch_size']} | {variant} | failed: {v['error']} |||||||||")
            continue
        peak, speedup = v["memory"]["peak_timed_steps_mb"], v.get("speedup_vs_eager")
        speedup = "-" if speedup is None else f"{speedup:.2f}x"
        rows.append(
            f"| {s['model']} | {s['batch_size']} | {variant} | {v['median_ms']:.1f} | "
            f"{v['p10_ms']:.1f}-{v['p90_ms']:.1f} | {v['min_ms']:.1f} | {v['samples_per_s']:.0f} | {speedup} | "
            f"{v['first_call_s']:.1f} | {v['compiles']} | {v['cache_state']} | "
            f"{'-' if peak is None else f'{peak:.0f}'} | {m['foreign_load_timed_rounds']} |")
    return rows


def _target_rows(result: dict) -> list[str]:
    s = result["settings"]
    return [f"| {s['model']} b{s['batch_size']} | {t['target']} | {t['value']} | "
            f"{'met' if t['met'] else '**not met**'} | {t['note']} |" for t in result["targets"]]


def write_readme(results_dir: str, command: str) -> str:
    """Write README.md into `results_dir` from its JSON files; return its path."""
    results = load_results(results_dir)
    lines = [
        "# Recorded `dualmode bench` results",
        "",
        f"Reproduce all of them with `{command}` (from the repository root; about 30 minutes on 2 cores).",
        "Each JSON file holds the settings, the machine (CPU, cores, load average, the share of the cores other",
        "processes took during the run), torch's version, every step time and the exact `dualmode bench` command",
        "of its run. How to read them: [docs/bench.md](../../docs/bench.md).",
        "",
        "Times are ms per training step (median over the timed steps, p10-p90 spread, and the fastest step, the",
        "best estimate of the undisturbed cost when other processes shared the machine), first call is build +",
        "trace + compile + one step in seconds, peak is the RSS growth of the variant's own process during the",
        "timed steps (MiB), foreign is the share of the cores other processes used meanwhile.",
        "",
        "| model | batch | variant | median ms | p10-p90 ms | min ms | samples/s | vs eager | first call s | "
        "compiles | cache | peak MiB | foreign |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for _, result in results:
        lines += _variant_rows(result)
    lines += ["", "## Targets", "", "| run | target | value | status | note |", "| --- | --- | --- | --- | --- |"]
    for _, result in results:
        lines += _target_rows(result)
    lines += ["", "## Commands of each run", ""]
    for name, result in results:
        m = result["machine"]
        lines.append(f"- [{name}]({name}): `{result['command']}` ({result['created']}, {m['cpu_model']}, "
                     f"{m['usable_cores']} cores, torch {m['torch']}, load average "
                     f"{m['load_average_before'][0]:.2f} before, {m['load_average_after'][0]:.2f} after)")
    path = os.path.join(results_dir, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
