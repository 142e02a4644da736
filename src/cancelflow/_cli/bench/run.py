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
from typing import Any

from .census import final_leftovers, snapshot
from .harness import Bench, Settings, progress
from .plan import availability, cell_rows
from .results import Row, brief, row_json
from .scenarios import SCENARIOS, SYSTEM_TITLES, SYSTEMS, Scenario, Variant
from .scenarios.pool_group import GROUP, run_pool_group


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
            group = [cell for cell in GROUP if cell[0] in settings.scenarios]
            if group:  # system by system, each on one long-lived pool
                for system in SYSTEMS:
                    reason = _skip_reason(settings, available, system)
                    if reason is not None:
                        rows.extend(_skipped(scn, var, system, reason) for scn, var in group)
                    else:
                        rows.extend(run_pool_group(bench, system, group))
            for scenario in SCENARIOS:
                if scenario.key not in settings.scenarios:
                    continue
                for variant in scenario.variants:
                    if (scenario.key, variant.key) in GROUP:
                        continue
                    for system in SYSTEMS:
                        rows.extend(_run_cell(bench, scenario, variant, system, available))
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
    }


def _run_cell(
    bench: Bench,
    scenario: Scenario,
    variant: Variant,
    system: str,
    available: dict[str, str | None],
) -> list[Row]:
    name = f"{scenario.key}/{variant.key}"
    reason = _skip_reason(bench.settings, available, system)
    if reason is not None:
        return [_skipped(scenario.key, variant.key, system, reason)]
    try:
        plan = cell_rows(bench, scenario, variant, system)
    except ImportError as exc:
        r = Row(scenario.key, variant.key, system, SYSTEM_TITLES[system], status="skipped")
        r.reason = f"cannot import: {exc}"
        return [r]
    out: list[Row] = []
    for row, fill in plan:
        out.append(row)
        if fill is None:
            continue
        started = time.perf_counter()
        try:
            with bench.leaks.track(system, f"{name} {row.label[:40]}"):
                fill()
        except ImportError as exc:
            row.status, row.reason = "skipped", f"cannot import: {exc}"
        except Exception as exc:  # noqa: BLE001 - a failing cell is reported, the run goes on
            row.error(f"{type(exc).__name__}: {exc}")
        progress(f"  [{name:<18}] {system:<20} {time.perf_counter() - started:6.1f}s  {brief(row)}")
    return out


def _skip_reason(settings: Settings, available: dict[str, str | None], system: str) -> str | None:
    if system not in settings.systems:
        return "not selected (--systems)"
    return available[system]


def _skipped(scenario: str, variant: str, system: str, reason: str) -> Row:
    return Row(scenario, variant, system, SYSTEM_TITLES[system], status="skipped", reason=reason)
