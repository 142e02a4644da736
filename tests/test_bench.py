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
    [line] = [x for x in report.splitlines() if "not installed:" in x]
    assert "pebble, loky, anyio, trio-parallel" in line
    assert "pip install 'cancelflow[bench]'" in line
    assert "skipped" not in report
    kill_line = next(x for x in report.splitlines() if x.startswith("kill, grace 0"))
    assert "not measured (pip install anyio)" in kill_line


# -- the pieces of issue 16: rounds, background load, the goals headline ----------------------
def test_rounds_split_the_samples_and_rotate_the_order() -> None:
    """Test that a cell's samples are split into near-equal rounds and that each round
    starts with another system, every system once per round."""
    from cancelflow._cli.bench.harness import rotated, split_samples

    assert split_samples(10, 3) == [4, 3, 3]
    assert split_samples(2, 5) == [1, 1]  # never an empty round
    systems = ["a", "b", "c", "d", "e", "f"]
    orders = [rotated(systems, r, 3) for r in range(3)]
    assert all(sorted(order) == systems for order in orders)
    assert [order[0] for order in orders] == ["a", "c", "e"]
    # more rounds than systems: each round still starts with the next one
    assert [rotated(["a", "b"], r, 3)[0] for r in range(3)] == ["a", "b", "a"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_run_interleaves_systems_round_by_round(tmp_path: Path) -> None:
    """Test that in a run with 2 rounds every system of a cell is measured in round 1
    before any is measured in round 2, in a rotated order, and that each row keeps its
    rounds with their background load, a noisy flag, and the goals."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cancelflow",
            "bench",
            "--quick",
            "--scenarios",
            "3",
            "7",
            "--systems",
            "cancelflow",
            "concurrent.futures",
            "--samples",
            "2",
            "--rounds",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["settings"]["rounds"] == 2
    order = data["order"]
    for cell in ({"3", "thread"}, {"7", "threads"}, {"7", "token_check"}):
        seen = [o for o in order if {o["scenario"], o["variant"]} == cell]
        rounds = [o["round"] for o in seen]
        assert rounds == sorted(rounds), seen  # round 2 starts once round 1 is done
        firsts = [next(o["system"] for o in seen if o["round"] == r) for r in (0, 1)]
        assert firsts[0] != firsts[1], seen
        for r in (0, 1):
            assert {o["system"] for o in seen if o["round"] == r} == {
                "cancelflow",
                "concurrent.futures",
            }
    measured = [r for r in data["rows"] if r["status"] == "ok"]
    assert measured
    for row in measured:
        assert [x["round"] for x in row["rounds"]] == [0, 1]
        assert all(x["background_cpu"] >= 0 for x in row["rounds"])
        assert sum(x["n"][k] for x in row["rounds"] for k in x["n"]) == sum(
            m["n"] for m in row["metrics"].values() if "n" in m
        )
        assert isinstance(row["noisy"], bool)
        assert row["background_cpu"] is not None
    by_key = {g["key"]: g for g in data["goals"]}
    assert by_key["check_cost"]["measured"]
    assert by_key["check_cost"]["ours"]["tag"] == "check_cancelled()"
    assert by_key["thread_tput_8"]["measured"]
    assert not by_key["process_tput_pebble"]["measured"]
    main_cells = {r["system"] for r in measured if r["variant"] == "processes_main"}
    assert main_cells == {"cancelflow", "concurrent.futures"}  # a __main__ function's tput
    assert "## Headline: goals" in proc.stdout


class _FakeClock:
    """Readers for ``LoadMeter``: each reading advances by a fixed step."""

    def __init__(self, step: float) -> None:
        self.value, self.step = 0.0, step

    def __call__(self) -> float:
        self.value += self.step
        return self.value


def _row_with_rounds(background_step: float, p50s: list[float]) -> dict[str, Any]:
    """A row measured in ``len(p50s)`` rounds through ``Bench.measured``, with a load meter
    whose machine-wide busy CPU grows by ``background_step`` per reading beyond ours."""
    from cancelflow._cli.bench.harness import Bench, Settings
    from cancelflow._cli.bench.load import LoadMeter
    from cancelflow._cli.bench.results import Row, row_json

    bench = Bench(Settings(quick=True, samples=3 * len(p50s), rounds=len(p50s)))
    try:
        ours = _FakeClock(0.5)
        busy = _FakeClock(0.5 + background_step)
        bench.load = LoadMeter(busy=busy, ours=ours, clock=_FakeClock(1.0))
        row = Row("3", "thread", "cancelflow", "a fake row")
        for round_, p50 in enumerate(p50s):
            with bench.measured(row, round_, 0, 3):
                for _ in range(bench.samples):
                    row.add("caller_raises", p50)
                    row.add("task_stopped", p50)
        return row_json(row)
    finally:
        bench.close()


def test_a_cell_is_noisy_when_the_background_load_is_high() -> None:
    """Test that a row is flagged noisy, with the reason, when other processes used more
    CPU than the threshold during one of its rounds, and is not when they did not."""
    from cancelflow._cli.bench.load import NOISY_BACKGROUND

    loaded = _row_with_rounds(NOISY_BACKGROUND * 2, [1.0, 1.0])
    assert loaded["noisy"] is True
    assert "background load" in loaded["noisy_why"][0]
    assert loaded["background_cpu"] > NOISY_BACKGROUND
    assert [r["n"]["caller_raises"] for r in loaded["rounds"]] == [3, 3]

    quiet = _row_with_rounds(0.0, [1.0, 1.0])
    assert quiet["noisy"] is False
    assert quiet["noisy_why"] == []
    assert quiet["background_cpu"] == 0.0


def test_a_cell_is_noisy_when_its_rounds_disagree() -> None:
    """Test that a quiet row whose rounds' p50s differ by more than the stated factor is
    flagged noisy, naming the metric."""
    from cancelflow._cli.bench.load import NOISY_SPREAD

    row = _row_with_rounds(0.0, [1.0, NOISY_SPREAD * 1.5])
    assert row["noisy"] is True
    assert any(why.startswith("caller_raises") for why in row["noisy_why"])
    assert _row_with_rounds(0.0, [1.0, NOISY_SPREAD * 0.9])["noisy"] is False


def _goal_data() -> dict[str, Any]:
    """A run's data with the goal cells filled by hand (anyio "not installed")."""
    from cancelflow._cli.bench.results import Row, row_json

    def row(
        scenario: str,
        variant: str,
        system: str,
        metric: str,
        value: float,
        tag: str = "",
        noisy: bool = False,
    ) -> dict[str, Any]:
        r = Row(scenario, variant, system, f"{system} {tag}".strip(), primary=not tag, tag=tag)
        for _ in range(3):
            r.add(metric, value)
        if scenario == "3" and variant == "thread":
            r.samples["task_stopped"] = [value] * 3
        data = row_json(r)
        data["noisy"] = noisy
        return data

    anyio_missing = []
    for scenario, variant in (("3", "process"), ("1", "loop")):
        skipped = Row(scenario, variant, "anyio", "anyio", status="skipped")
        skipped.reason = "cannot import anyio: ModuleNotFoundError()"
        anyio_missing.append(row_json(skipped))
    rows = [
        row("7", "threads", "cancelflow", "throughput", 30_000.0),
        row("7", "threads", "concurrent.futures", "throughput", 40_000.0),  # 0.75: met
        row("7", "threads8", "cancelflow", "throughput", 10_000.0, noisy=True),
        row("7", "threads8", "concurrent.futures", "throughput", 40_000.0),  # 0.25: unmet
        row("7", "token_check", "cancelflow", "check_cost", 26.0),
        row("7", "token_check", "cancelflow", "check_cost", 78.0, tag="check_cancelled()"),
        *anyio_missing,
    ]
    return {"rows": rows}


def test_the_headline_table_shows_one_line_per_goal() -> None:
    """Test that the headline has one line per goal, at most 100 columns, with both p50s,
    the ratio, the goal and whether it is met (NO when not), noisy values marked, and a
    missing peer as "not measured (pip install ...)"; the JSON goals say the same."""
    from cancelflow._cli.bench.report import GOALS, format_goals, goals

    items = goals(_goal_data())
    assert [g["key"] for g in items] == [g.key for g in GOALS]
    lines = format_goals(items)
    assert len(lines) == 1 + len(GOALS)
    assert all(len(line) <= 100 for line in lines)
    assert lines[0].split()[:3] == ["figure", "cancelflow", "p50"]
    by_key = dict(zip([g.key for g in GOALS], lines[1:], strict=True))

    assert by_key["thread_tput_2"].split()[-1] == "yes"
    assert "0.75x" in by_key["thread_tput_2"]
    assert by_key["thread_tput_8"].split()[-1] == "NO"
    assert "10,000/s~" in by_key["thread_tput_8"]  # noisy
    assert by_key["check_cost"].split()[-1] == "NO"  # 3x > 1.5x
    assert "78.0 ns" in by_key["check_cost"]
    assert "26.0 ns" in by_key["check_cost"]
    assert "not measured (pip install anyio)" in by_key["coop_process"]
    assert "not measured (pip install anyio)" in by_key["kill_caller"]
    assert "not measured" in by_key["process_tput_pebble"]

    json_goal = {g["key"]: g for g in items}
    assert json_goal["thread_tput_8"]["met"] is False
    assert json_goal["thread_tput_8"]["noisy"] is True
    assert json_goal["thread_tput_2"]["ratio"] == pytest.approx(0.75)
    assert json_goal["check_cost"]["ratio"] == pytest.approx(3.0)
    assert json_goal["coop_process"]["measured"] is False
    assert json_goal["coop_process"]["reason"] == "pip install anyio"
    json.dumps(items)  # JSON-able


def test_each_round_keeps_the_samples_it_took() -> None:
    """Test that a row's rounds count the samples each round added, also for a metric the
    first round did not produce."""
    from cancelflow._cli.bench.results import Row, rounds_json

    row = Row("1", "loop", "cancelflow", "a fake row")
    row.rounds.append({"round": 0, "position": 0, "start": {}, "background_cpu": 0.0})
    row.add("caller_unblocked", 1.0)
    row.rounds.append(
        {"round": 1, "position": 1, "start": {"caller_unblocked": 1}, "background_cpu": 0.0}
    )
    row.add("caller_unblocked", 2.0)
    row.add("next_task", 5.0)
    first, second = rounds_json(row)
    assert first["n"] == {"caller_unblocked": 1, "next_task": 0}
    assert first["p50"] == {"caller_unblocked": 1.0}
    assert second["n"] == {"caller_unblocked": 1, "next_task": 1}
    assert second["p50"] == {"caller_unblocked": 2.0, "next_task": 5.0}
