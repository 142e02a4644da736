"""The latency distributions as a PNG (needs matplotlib, imported only here)."""

from __future__ import annotations

import math
from typing import Any


def write_plot(data: dict[str, Any], path: str) -> str:
    """Write the latency distributions as PNG; return a line saying what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib not installed"
    panels: list[tuple[str, str, list[tuple[str, list[float]]]]] = []
    for scenario in data["scenarios"]:
        for variant in scenario["variants"]:
            for metric in variant["metrics"]:
                series = [
                    (
                        r["system"] + ("" if r["primary"] else " (2)"),
                        r["metrics"][metric["key"]]["samples"],
                    )
                    for r in data["rows"]
                    if r["scenario"] == scenario["key"]
                    and r["variant"] == variant["key"]
                    and "samples" in r["metrics"].get(metric["key"], {})
                ]
                if series:
                    panels.append(
                        (
                            f"{scenario['key']} {variant['key']}: {metric['title']}",
                            metric["unit"],
                            series,
                        )
                    )
    if not panels:
        return "plot skipped: no samples"
    cols = 3
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 0.45 * 9 * rows_n + 1), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, unit, series) in zip(axes.flat, panels, strict=False):
        labels = [name for name, _ in series]
        ax.boxplot([vals for _, vals in series], vert=False, showfliers=True)
        ax.set_yticks(range(1, len(labels) + 1), labels)
        for y, (_, vals) in enumerate(series, start=1):
            ax.scatter(vals, [y] * len(vals), s=6, alpha=0.4)
        if unit in ("ms", "ns") and all(min(vals) > 0 for _, vals in series):
            ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(unit)
        ax.tick_params(labelsize=7)
    fig.suptitle(
        f"cancelflow bench ({data['mode']}), {data['date']}, {data['machine']['python']}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"plot written to {path}"
