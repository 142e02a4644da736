"""A row of results (one system in one scenario variant), its statistics and its JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .scenarios import SCENARIOS


class Cannot(Exception):
    """The system cannot do what the cell measures; ``str(exc)`` says why."""


@dataclass
class Row:
    """One system (one way of using it) in one scenario variant."""

    scenario: str
    variant: str
    system: str
    label: str
    status: str = "ok"  # ok | cannot | skipped | error
    reason: str | None = None
    primary: bool = True  # the row used for ratios when a system has several
    tag: str = ""  # tells apart several rows of one system (shown in the headline)
    samples: dict[str, list[float]] = field(default_factory=dict)
    cannot: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def cannot_all(self, reason: str) -> None:
        self.status, self.reason = "cannot", reason

    def error(self, message: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(message)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "p99": percentile(values, 0.99),
        "max": max(values),
    }


def brief(row: Row) -> str:
    if row.status != "ok":
        return f"{row.status}: {row.reason}"
    parts = [f"{k} p50 {percentile(v, 0.5):.3g}" for k, v in row.samples.items() if v]
    if row.errors:
        parts.append(f"errors: {row.errors[0]}")
    return ", ".join(parts)


def row_json(row: Row) -> dict[str, Any]:
    variant = next(
        v for s in SCENARIOS if s.key == row.scenario for v in s.variants if v.key == row.variant
    )
    metrics: dict[str, Any] = {}
    status, reason = row.status, row.reason
    if status == "ok":
        for metric in variant.metrics:
            values = row.samples.get(metric.key)
            if values:
                metrics[metric.key] = {"unit": metric.unit, "samples": values, **summarize(values)}
                if metric.key in row.cannot:
                    metrics[metric.key]["note"] = row.cannot[metric.key]
            elif metric.key in row.cannot:
                metrics[metric.key] = {"unit": metric.unit, "cannot": row.cannot[metric.key]}
            elif (
                metric.key == "task_stopped" and row.system == "cancelflow" and row.scenario == "3"
            ):
                metrics[metric.key] = {"unit": metric.unit, "error": "no samples"}
            else:
                metrics[metric.key] = {"unit": metric.unit, "error": "no samples"}
        if row.errors:
            status = "error"
            reason = "; ".join(row.errors[:3])
        elif any("error" in m for m in metrics.values()):
            status, reason = "error", "a metric has no samples"
    return {
        "scenario": row.scenario,
        "variant": row.variant,
        "system": row.system,
        "label": row.label,
        "primary": row.primary,
        "tag": row.tag,
        "status": status,
        "reason": reason,
        "metrics": metrics,
        "notes": row.notes,
        "errors": row.errors,
        "extra": row.extra,
    }
