"""Plots of an evaluation run (pareto.png) and of the theoretical front (front.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..methods import static_line_weight


def _plot_methods(ax, methods: list[dict], x_key: str, y_key: str, with_ci: bool = False) -> None:
    """One point per method; the static-ensemble sweep as a line in order of w.

    A method's colour comes from its place in `methods`, so it is the same in every panel
    even where a panel has no point for another method (ar has no acceptance rate).
    """
    # tab20 and three markers: up to 60 methods stay distinguishable in one legend.
    colours = {m["method"]: (f"tab20:{i % 20}", "osD"[(i // 20) % 3]) for i, m in enumerate(methods)}
    points = [m for m in methods if m.get(x_key) is not None and m.get(y_key) is not None]
    sweep = sorted((m for m in points if static_line_weight(m["method"]) is not None), key=lambda m: static_line_weight(m["method"]))
    if len(sweep) > 1:
        ax.plot([m[x_key] for m in sweep], [m[y_key] for m in sweep], "-", color="grey", alpha=0.5, label="static sweep")
    for m in points:
        yerr = None
        if with_ci and m.get("quality_ci95"):
            low, high = m["quality_ci95"]
            yerr = [[max(0.0, m[y_key] - low)], [max(0.0, high - m[y_key])]]
        # A legend, not labels beside the points: methods at nearly the same point (a head
        # that behaves like one static weight) would print their labels over each other.
        colour, marker = colours[m["method"]]
        ax.errorbar(m[x_key], m[y_key], yerr=yerr, fmt=marker, capsize=3, color=_colour(colour), label=m["method"])


def _colour(name: str):
    import matplotlib

    cmap, index = name.split(":")
    return matplotlib.colormaps[cmap](int(index))


def plot_eval(summary: dict[str, Any], path: Path) -> None:
    """pareto.png: quality vs acceptance rate, and quality vs seconds per example."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 6))
    metric = summary["metric"]
    _plot_methods(left, summary["methods"], "acceptance_rate", "quality", with_ci=True)
    left.set(xlabel="acceptance rate (accepted / drafted)", ylabel=metric, title="quality vs acceptance")
    _plot_methods(right, summary["methods"], "seconds_per_example", "quality", with_ci=True)
    right.set(xlabel="seconds per example", ylabel=metric, title="quality vs latency")
    if all(m.get("seconds_per_example") is None for m in summary["methods"]):
        right.text(0.5, 0.5, "no timed rows\n(lockstep rows carry no timing)", ha="center", va="center", transform=right.transAxes)
    # One legend for both panels: ar has no acceptance rate, lockstep rows have no timing.
    handles = {}
    for ax in (left, right):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    rows = -(-len(handles) // 3)
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="lower center", ncol=3)
    fig.suptitle(f"{summary['task']} ({summary['n_examples']} examples, T={summary['settings']['temperature']:g}, N={summary['settings']['draft_length']})")
    fig.tight_layout(rect=(0, min(0.5, 0.035 * rows + 0.02), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_front(front: dict[str, Any], path: Path, summary: dict[str, Any] | None = None) -> None:
    """front.png: the theoretical front, with an eval run's measured points when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = front["front"]
    ax.plot([p["rejection"] for p in points], [p["bias"] for p in points], "-o", color="tab:blue", label="static ensemble, theory (reference text)")
    for p in points:
        ax.annotate(f"w={p['w']:g}", (p["rejection"], p["bias"]), textcoords="offset points", xytext=(4, 2), fontsize=7)
    if summary is not None:
        measured = [m for m in summary["methods"] if m.get("rejection_per_position") is not None]
        for m in measured:
            ax.plot(m["rejection_per_position"], m["bias_per_position"], "s", color="tab:red")
            ax.annotate(m["method"], (m["rejection_per_position"], m["bias_per_position"]), textcoords="offset points", xytext=(4, -10), fontsize=8, color="tab:red")
        if measured:
            ax.plot([], [], "s", color="tab:red", label="measured (eval run, own samples)")
    ax.set(xlabel="rejection probability per position", ylabel="bias per position (TV to target)",
           title=f"{front['task']}: mean TV(p, q) = {front['mean_tv']:.3f} over {front['positions']} positions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
