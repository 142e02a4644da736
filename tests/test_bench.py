"""Tests of ``cancelflow bench``: the quick run fills every cell and reports leftovers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cancelflow._cli.bench.scenarios import SCENARIOS, SYSTEMS

# The peers the issue names: each must be reported, measured or with a reason.
PEERS = (
    "raw",
    "pebble",
    "loky",
    "concurrent.futures",
    "multiprocessing.Pool",
    "anyio",
    "trio-parallel",
    "asyncio",
)


def _check_row(row: dict[str, Any], metrics: list[dict[str, Any]]) -> list[str]:
    where = f"{row['scenario']}/{row['variant']} {row['system']} ({row['label']})"
    if row["status"] in ("cannot", "skipped"):
        return [] if isinstance(row["reason"], str) and row["reason"] else [f"{where}: no reason"]
    if row["status"] != "ok":
        return [f"{where}: {row['status']}: {row['reason']}"]
    problems = []
    for metric in metrics:
        cell = row["metrics"].get(metric["key"])
        if cell is None:
            problems.append(f"{where}: no {metric['key']}")
        elif "samples" in cell:
            samples = cell["samples"]
            if (
                not samples
                or cell["n"] != len(samples)
                or not all(math.isfinite(x) for x in samples)
            ):
                problems.append(f"{where}: bad samples for {metric['key']}")
        elif not (isinstance(cell.get("cannot"), str) and cell["cannot"]):
            problems.append(f"{where}: {metric['key']} has neither numbers nor a reason")
    return problems


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_quick_fills_every_cell(tmp_path: Path) -> None:
    """Test that ``cancelflow bench --quick`` gives every scenario x system cell numbers or
    an explicit "cannot"/"skipped" with a reason, and reports leftovers per system."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cancelflow", "bench", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "## Headline" in proc.stdout
    assert "machine:" in proc.stdout
    data = json.loads(out.read_text())
    assert set(PEERS) <= set(data["systems"]) == set(SYSTEMS)
    assert {s["key"] for s in data["scenarios"]} == {s.key for s in SCENARIOS}
    assert data["machine"]["cpu_count"]
    assert data["versions"]["cancelflow"]
    assert data["date"]

    problems: list[str] = []
    for scenario in data["scenarios"]:
        for variant in scenario["variants"]:
            rows = [
                r
                for r in data["rows"]
                if (r["scenario"], r["variant"]) == (scenario["key"], variant["key"])
            ]
            for system in data["systems"]:
                mine = [r for r in rows if r["system"] == system]
                if not mine:
                    problems.append(f"{scenario['key']}/{variant['key']}: {system} missing")
                for row in mine:
                    problems.extend(_check_row(row, variant["metrics"]))
    assert not problems, "\n".join(problems)

    measured = {r["system"] for r in data["rows"] if r["status"] != "skipped"}
    for system in measured:
        entry = data["leaks"][system]
        assert {"processes", "zombies", "threads", "shm", "killed_by_benchmark", "leaked"} <= set(
            entry
        )
    assert data["leaks"]["cancelflow"]["processes"] == []
    # The suite itself leaves no process behind (threads of a peer's idle cache may linger).
    assert data["leftovers_after_run"]["processes"] == []


@pytest.mark.timeout(120)
def test_missing_peers_are_named_once_with_the_install_command(tmp_path: Path) -> None:
    """Test that without the peers installed (hidden here by modules that fail to import),
    the report says once which are missing and how to install them, instead of a
    "skipped" line per cell."""
    for module in ("pebble", "loky", "trio", "trio_parallel", "anyio"):
        (tmp_path / f"{module}.py").write_text('raise ImportError("not installed here")\n')
    environment = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "cancelflow", "bench", "--quick", "--scenarios", "1"],
        capture_output=True,
        text=True,
        timeout=110,
        env=environment,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = proc.stdout[proc.stdout.index("cancelflow bench (") :]
    [line] = [x for x in report.splitlines() if "not installed" in x]
    assert "pebble, loky, anyio, trio-parallel" in line
    assert "pip install 'cancelflow[bench]'" in line
    assert "skipped" not in report
