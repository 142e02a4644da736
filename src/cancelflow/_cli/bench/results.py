"""A row of results (one system in one scenario variant), its statistics and its JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .load import NOISY_BACKGROUND, NOISY_SPREAD, noisy_reasons
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
    #: one entry per fill (round): ``round``, ``position`` (in that round's order),
    #: ``start`` (how many samples of each metric there were before it) and the load
    rounds: list[dict[str, Any]] = field(default_factory=list)

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


def rounds_json(row: Row) -> list[dict[str, Any]]:
    """The row's rounds: the samples each took (``n``, ``p50`` per metric) and the load."""
    out: list[dict[str, Any]] = []
    for index, entry in enumerate(row.rounds):
        end = row.rounds[index + 1]["start"] if index + 1 < len(row.rounds) else None
        n: dict[str, int] = {}
        p50: dict[str, float] = {}
        for key, values in row.samples.items():
            start = entry["start"].get(key, 0)
            stop = len(values) if end is None else end.get(key, 0)  # absent: none before
            part = values[start:stop]
            n[key] = len(part)
            if part:
                p50[key] = percentile(part, 0.5)
        out.append(
            {
                **{k: v for k, v in entry.items() if k != "start"},
                "n": n,
                "p50": p50,
            }
        )
    return out


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
    rounds = rounds_json(row)
    why = noisy_reasons(rounds) if status in ("ok", "error") and metrics else []
    loads = [r["background_cpu"] for r in rounds if r.get("background_cpu") is not None]
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
        "rounds": rounds,
        "background_cpu": max(loads) if loads else None,
        "noisy": bool(why),
        "noisy_why": why,
        "noisy_thresholds": {"background_cpu": NOISY_BACKGROUND, "p50_spread": NOISY_SPREAD},
    }
