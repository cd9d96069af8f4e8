"""What `dualmode bench` makes of its timings: statistics, the targets, a table and a plot."""

from __future__ import annotations

import statistics

# The project's speed and memory goals for graph mode (benchmarks, not tests): see docs/bench.md.
# Per (model, batch), with the model's own entry for other batches.
STEP_VS_EAGER = {("mobilenet_v2", 64): 0.6, ("mobilenet_v2", 32): 0.75, "mobilenet_v2": 0.75, "mlp": 1.0}
STEP_VS_BEST_TORCH = {"mobilenet_v2": 0.8, "mlp": 1.0}
STEP_VS_FWD_BWD_COMPILE = 1.1
STEP_VS_FLOOR = 1.05
COLD_FIRST_CALL_VS_TORCH_COMPILE = 1.0
WARM_FIRST_CALL_S = 5.0
PEAK_MEMORY_VS_EAGER = 1.2
TORCH_ALTERNATIVES = ("torch-eager", "torch-compile")


def summarize(times_s: list[float], batch_size: int) -> dict:
    """Median and spread of step times (in ms), and samples per second at the median."""
    ms = sorted(t * 1000 for t in times_s)
    if len(ms) > 1:
        deciles = statistics.quantiles(ms, n=10, method="inclusive")
        quartiles = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        deciles, quartiles = [ms[0]] * 9, [ms[0]] * 3
    median = statistics.median(ms)
    return {"median_ms": median, "p10_ms": deciles[0], "p25_ms": quartiles[0], "p75_ms": quartiles[2],
            "p90_ms": deciles[8], "min_ms": ms[0], "max_ms": ms[-1], "mean_ms": statistics.fmean(ms),
            "samples_per_s": batch_size / (median / 1000), "times_ms": [t * 1000 for t in times_s]}


def cache_state(cache: dict) -> str:
    """'cold' (compiled from scratch), 'warm' (all from inductor's caches), 'mixed', or 'none' (nothing cached)."""
    hits = cache.get("fxgraph_hit", 0) + cache.get("aot_autograd_hit", 0)
    misses = cache.get("fxgraph_miss", 0) + cache.get("aot_autograd_miss", 0)
    if hits and misses:
        return "mixed"
    return "warm" if hits else "cold" if misses else "none"


def _limit(table: dict, model: str, batch: int | None) -> float | None:
    return table.get((model, batch), table.get(model))


def targets(model: str, variants: dict, batch: int | None = None) -> list[dict]:
    """Where graph mode stands against each goal that this run's variants can measure."""
    ok = {name: v for name, v in variants.items() if "error" not in v}
    graph = ok.get("graph")
    if graph is None:
        return []
    found = []

    def check(goal: str, value: float, limit: float, note: str = "") -> None:
        found.append({"target": goal, "value": round(value, 3), "limit": limit, "met": value <= limit, "note": note})

    step = graph["median_ms"]
    vs_eager, vs_torch = _limit(STEP_VS_EAGER, model, batch), _limit(STEP_VS_BEST_TORCH, model, batch)
    if "eager" in ok and vs_eager is not None:
        check(f"graph step / eager step <= {vs_eager}", step / ok["eager"]["median_ms"], vs_eager)
    alternatives = [name for name in TORCH_ALTERNATIVES if name in ok]
    if alternatives and vs_torch is not None:
        best = min(alternatives, key=lambda name: ok[name]["median_ms"])
        check(f"graph step / best PyTorch alternative <= {vs_torch}", step / ok[best]["median_ms"], vs_torch,
              f"best alternative: {best}")
    if "fwd-bwd-compile" in ok:
        check(f"graph step / compiled forward+backward alone <= {STEP_VS_FWD_BWD_COMPILE}",
              step / ok["fwd-bwd-compile"]["median_ms"], STEP_VS_FWD_BWD_COMPILE)
    if "floor-fused-update" in ok:
        check(f"graph step / the floor with a fused update <= {STEP_VS_FLOOR}",
              step / ok["floor-fused-update"]["median_ms"], STEP_VS_FLOOR)
    check("compiles in the run == 1", graph["compiles"], 1.0,
          f"{graph['compiles_after_first_call']} after the first call")
    state = graph["cache_state"]
    if state == "warm":
        check(f"first call with a warm cache <= {WARM_FIRST_CALL_S} s", graph["first_call_s"], WARM_FIRST_CALL_S)
    else:
        # The reference must have compiled from scratch too: torch.compile's forward+backward, alone or with
        # an eager update (which compiles nothing more).
        same = [name for name in ("fwd-bwd-compile", "torch-compile") if ok.get(name, {}).get("cache_state") == state]
        if same:
            check(f"first call / torch.compile's first forward+backward <= {COLD_FIRST_CALL_VS_TORCH_COMPILE}",
                  graph["first_call_s"] / ok[same[0]]["first_call_s"], COLD_FIRST_CALL_VS_TORCH_COMPILE,
                  f"{graph['first_call_s']:.1f} s vs {ok[same[0]]['first_call_s']:.1f} s ({same[0]}), caches {state}")
    saved = ok.get("graph-saved-trace", {})
    if saved.get("cache_state") == "warm" and saved.get("trace_source", "").startswith("loaded"):
        check(f"first call with a warm cache and the saved trace (config.trace_cache) <= {WARM_FIRST_CALL_S} s",
              saved["first_call_s"], WARM_FIRST_CALL_S, "graph-saved-trace")
    if "eager" in ok:
        for key, what in (("peak_timed_steps_mb", "during the timed steps"),
                          ("peak_through_warmup_mb", "through the first call and warm-up")):
            mine, theirs = graph["memory"][key], ok["eager"]["memory"][key]
            if mine is not None and theirs:
                check(f"peak RSS growth {what} / eager's <= {PEAK_MEMORY_VS_EAGER}", mine / theirs,
                      PEAK_MEMORY_VS_EAGER, f"{mine:.0f} MiB vs {theirs:.0f} MiB")
    return found


def format_table(result: dict) -> str:
    """The variants as a text table, then the targets."""
    settings = result["settings"]
    ranks = (f" ({settings['per_rank_batch']} per rank on {settings['world_size']} ranks)"
             if settings.get("distributed") else "")
    lines = [f"{settings['model']}, batch {settings['batch_size']}{ranks}, {settings['steps']} timed steps, "
             f"torch {result['machine']['torch']}, {result['machine']['usable_cores']} cores, "
             f"load average {result['machine']['load_average_before'][0]:.2f} -> "
             f"{result['machine']['load_average_after'][0]:.2f}, foreign load over the timed rounds "
             f"{result['machine']['foreign_load_timed_rounds']}",
             f"{'variant':18} {'median ms':>10} {'p10-p90 ms':>17} {'samples/s':>10} {'vs eager':>9} "
             f"{'first call s':>13} {'compiles':>9} {'cache':>6} {'peak MiB':>9}"]
    for name, v in result["variants"].items():
        if "error" in v:
            lines.append(f"{name:18} FAILED: {v['error']}")
            continue
        speedup = f"{v['speedup_vs_eager']:.2f}x" if v.get("speedup_vs_eager") else "-"
        peak = v["memory"]["peak_timed_steps_mb"]
        lines.append(f"{name:18} {v['median_ms']:10.1f} {v['p10_ms']:8.1f}-{v['p90_ms']:<8.1f} "
                     f"{v['samples_per_s']:10.1f} {speedup:>9} {v['first_call_s']:13.2f} {v['compiles']:9d} "
                     f"{v['cache_state']:>6} {'-' if peak is None else f'{peak:.0f}':>9}")
    for name, v in result["variants"].items():
        if v.get("ranks_agree") is False:
            lines.append(f"  WARNING: {name}: the parameters differ between the ranks after the steps")
    for t in result["targets"]:
        lines.append(f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['value']}"
                     + (f" ({t['note']})" if t["note"] else ""))
    return "\n".join(lines)


def write_plot(result: dict, path: str) -> None:
    """A bar chart of the median step time of each variant, p10-p90 as error bars (matplotlib, Agg)."""
    try:
        import matplotlib
    except ImportError as error:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ok = {name: v for name, v in result["variants"].items() if "error" not in v}
    names = list(ok)
    medians = [ok[n]["median_ms"] for n in names]
    spread = [[ok[n]["median_ms"] - ok[n]["p10_ms"] for n in names],
              [ok[n]["p90_ms"] - ok[n]["median_ms"] for n in names]]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    bars = ax.barh(names, medians, xerr=spread, color=["tab:orange" if n == "graph" else "tab:blue" for n in names])
    for bar, name in zip(bars, names):
        speedup = ok[name].get("speedup_vs_eager")
        ax.text(ok[name]["p90_ms"], bar.get_y() + bar.get_height() / 2,
                f"  {ok[name]['median_ms']:.1f} ms" + (f" ({speedup:.2f}x)" if speedup else ""), va="center")
    ax.invert_yaxis()
    ax.set_xlabel("median ms per step (bars: p10-p90); in brackets: speedup over eager")
    s, m = result["settings"], result["machine"]
    ax.set_title(f"{s['model']} batch {s['batch_size']}, torch {m['torch']}, {m['usable_cores']} cores, "
                 f"foreign load {m['foreign_load_timed_rounds']}")
    ax.set_xlim(0, max(ok[n]["p90_ms"] for n in names) * 1.45)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
