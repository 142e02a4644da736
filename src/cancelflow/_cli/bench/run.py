"""The run: every cell of the plan, one after the other, into one JSON-able dict."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any

from .census import final_leftovers, snapshot
from .harness import Bench, Settings, progress, rotated, split_samples
from .load import MIN_ROUND_SAMPLES, NOISY_BACKGROUND, NOISY_SPREAD
from .plan import availability, cell_rows
from .results import Row, brief, row_json
from .scenarios import SCENARIOS, SYSTEM_TITLES, SYSTEMS, Scenario, Variant
from .scenarios.pool_group import GROUP, group_rows, run_pool_group
from .scenarios.stop import finish_grand_row


def _versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in (
        "cancelflow",
        "pebble",
        "loky",
        "anyio",
        "trio",
        "trio-parallel",
        "psutil",
        "matplotlib",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": model,
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "loadavg_start": list(os.getloadavg()),
    }


def run_bench(settings: Settings) -> dict[str, Any]:
    """Run the suite; return everything (settings, machine, rows, leaks) as a JSON-able dict."""
    from loguru import logger

    from cancelflow._platform import set_child_subreaper

    started = time.perf_counter()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    machine = _machine()
    available = availability()
    logger.disable("cancelflow")
    subreaper = set_child_subreaper(True)
    before_run = snapshot()
    bench = Bench(settings)
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(bench.leaks.capture)
    asyncio_logger.propagate = False
    rows: list[Row] = []
    watcher_realtime = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = _run_all(bench, available)
        watcher_realtime = bench.watch.realtime
    finally:
        bench.close()
        logger.disable("cancelflow")  # the library's default
        asyncio_logger.removeHandler(bench.leaks.capture)
        asyncio_logger.propagate = True
    leftovers = final_leftovers(before_run)
    if subreaper:
        set_child_subreaper(False)
    machine["loadavg_end"] = list(os.getloadavg())
    return {
        "date": date,
        "mode": "quick" if settings.quick else "full",
        "settings": {
            "samples": settings.samples,
            "max_pause_ms": settings.max_pause * 1e3,
            "seed": settings.seed,
            "tasks": settings.tasks,
            "check_calls": settings.check_calls,
            "scenarios": list(settings.scenarios),
            "systems": list(settings.systems),
            "rounds": settings.rounds,
            "noisy_background_cpu": NOISY_BACKGROUND,
            "noisy_p50_spread": NOISY_SPREAD,
            "noisy_min_round_samples": MIN_ROUND_SAMPLES,
        },
        "machine": machine,
        "watcher_realtime": watcher_realtime,
        "versions": _versions(),
        "runtime_s": time.perf_counter() - started,
        "scenarios": [
            {
                "key": s.key,
                "title": s.title,
                "variants": [
                    {
                        "key": v.key,
                        "title": v.title,
                        "metrics": [
                            {
                                "key": m.key,
                                "title": m.title,
                                "unit": m.unit,
                                "higher_is_better": m.higher_is_better,
                            }
                            for m in v.metrics
                        ],
                    }
                    for v in s.variants
                ],
            }
            for s in SCENARIOS
            if s.key in settings.scenarios
        ],
        "systems": list(SYSTEMS),
        "rows": [row_json(r) for r in rows],
        "leaks": bench.leaks.as_json(),
        "leftovers_after_run": leftovers,
        "order": bench.order,
    }


def _run_all(bench: Bench, available: dict[str, str | None]) -> list[Row]:
    """Every cell, interleaved: each cell's samples are split into rounds, and in each
    round every system of the cell is measured in turn, in an order rotated per round,
    so that a loaded moment of the machine does not land on one system only.

    The pool group (scenarios 1, 2, 3/process, 6) runs the same way at the level of a
    system's block: in each round, system after system (rotated), each opens its
    1-worker pool, runs its share of every cell of the group on it and closes it.
    """
    settings = bench.settings
    shares = split_samples(settings.samples, settings.rounds)
    rows: list[Row] = []
    group = [cell for cell in GROUP if cell[0] in settings.scenarios]
    if group:
        planned: dict[str, list[tuple[Row, int]]] = {}
        for system in SYSTEMS:
            reason = _skip_reason(settings, available, system)
            if reason is not None:
                rows.extend(_skipped(scn, var, system, reason) for scn, var in group)
                continue
            planned[system] = group_rows(system, group, available["anyio"] is None)
            rows.extend(row for row, _ in planned[system])
        for round_, share in enumerate(shares):
            for position, system in enumerate(rotated(list(planned), round_, len(shares))):
                run_pool_group(bench, system, planned[system], round_, position, share)
    for scenario in SCENARIOS:
        if scenario.key not in settings.scenarios:
            continue
        for variant in scenario.variants:
            if (scenario.key, variant.key) in GROUP:
                continue
            plans: dict[str, list[tuple[Row, Callable[[], None] | None]]] = {}
            for system in SYSTEMS:
                plan = _plan_cell(bench, scenario, variant, system, available)
                rows.extend(row for row, _ in plan)
                if any(fill is not None for _, fill in plan):
                    plans[system] = plan
            for round_, share in enumerate(shares):
                for position, system in enumerate(rotated(list(plans), round_, len(shares))):
                    for row, fill in plans[system]:
                        if fill is not None and row.status == "ok":
                            _fill(bench, row, fill, round_, position, share)
    for row in rows:
        finish_grand_row(bench, row, row.variant)
    return rows


def _plan_cell(
    bench: Bench,
    scenario: Scenario,
    variant: Variant,
    system: str,
    available: dict[str, str | None],
) -> list[tuple[Row, Callable[[], None] | None]]:
    reason = _skip_reason(bench.settings, available, system)
    if reason is not None:
        return [(_skipped(scenario.key, variant.key, system, reason), None)]
    try:
        return cell_rows(bench, scenario, variant, system)
    except ImportError as exc:
        r = Row(scenario.key, variant.key, system, SYSTEM_TITLES[system], status="skipped")
        r.reason = f"cannot import: {exc}"
        return [(r, None)]


def _fill(
    bench: Bench, row: Row, fill: Callable[[], None], round_: int, position: int, share: int
) -> None:
    name = f"{row.scenario}/{row.variant} r{round_ + 1}"
    started = time.perf_counter()
    try:
        with (
            bench.leaks.track(row.system, f"{name} {row.label[:40]}"),
            bench.measured(row, round_, position, share),
        ):
            fill()
    except ImportError as exc:
        row.status, row.reason = "skipped", f"cannot import: {exc}"
    except Exception as exc:  # noqa: BLE001 - a failing cell is reported, the run goes on
        row.error(f"{type(exc).__name__}: {exc}")
    progress(f"  [{name:<21}] {row.system:<20} {time.perf_counter() - started:6.1f}s  {brief(row)}")


def _skip_reason(settings: Settings, available: dict[str, str | None], system: str) -> str | None:
    if system not in settings.systems:
        return "not selected (--systems)"
    return available[system]


def _skipped(scenario: str, variant: str, system: str, reason: str) -> Row:
    return Row(scenario, variant, system, SYSTEM_TITLES[system], status="skipped", reason=reason)
