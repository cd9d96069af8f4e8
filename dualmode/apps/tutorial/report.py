"""The tutorial's summary: a table with one column per mode, and a plot of the loss against the step."""

from __future__ import annotations

import statistics

from dualmode.apps.tutorial.train import ModeResult

LAST_STEPS = 10


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f} %"


def _rows(result: ModeResult) -> list[tuple[str, str]]:
    losses = result.losses
    speed = result.steady_samples_per_second
    trace = result.trace_seconds
    return [
        ("steps", str(len(losses))),
        ("final loss", f"{losses[-1]:.4f}" if losses else "-"),
        (f"mean loss, last {LAST_STEPS} steps", f"{statistics.fmean(losses[-LAST_STEPS:]):.4f}" if losses else "-"),
        ("mean loss, all steps", f"{statistics.fmean(losses):.4f}" if losses else "-"),
        ("held-out accuracy", _percent(result.accuracy)),
        ("  with BN running statistics", _percent(result.accuracy_running_bn)),
        ("samples/s after the first call", "-" if speed is None else f"{speed:.1f}"),
        ("median step (s)", f"{statistics.median(result.step_seconds[1:]):.3f}" if len(losses) > 1 else "-"),
        ("first call (s)", _seconds(result.step_seconds[0] if losses else None)),
        ("  of which make_fx trace (s)", _seconds(trace)),
        ("training time (s)", f"{sum(result.step_seconds):.1f}"),
        ("compiles", str(result.compiles)),
    ]


def summary_table(results: list[ModeResult]) -> str:
    """One row per measure, one column per mode, as plain aligned text."""
    columns = [dict(_rows(r)) for r in results]
    labels = [label for label, _ in _rows(results[0])]
    width = max(len(label) for label in labels)
    cell = max(12, *(len(v) for c in columns for v in c.values()))
    lines = [" " * width + "".join(f"  {r.mode:>{cell}}" for r in results)]
    for label in labels:
        lines.append(f"{label:<{width}}" + "".join(f"  {c[label]:>{cell}}" for c in columns))
    return "\n".join(lines)


def plot_losses(results: list[ModeResult], path: str, title: str) -> None:
    """Write a PNG of the training loss against the step, one line per mode (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        for result in results:
            shown = result.accuracy if result.accuracy is not None else result.accuracy_running_bn
            label = result.mode if shown is None else f"{result.mode} (held-out accuracy {100 * shown:.1f} %)"
            axes.plot(range(1, len(result.losses) + 1), result.losses, label=label, linewidth=1.2)
        axes.set_xlabel("step (batch)")
        axes.set_ylabel("training loss (cross-entropy)")
        axes.set_title(title, fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
