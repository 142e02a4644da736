"""The text report: the headline (one line per goal of issue 16), a table per scenario
variant, every ratio, where a peer is faster (and why), and what each system left behind.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

from .load import MIN_ROUND_SAMPLES, NOISY_BACKGROUND, NOISY_SPREAD


@dataclass(frozen=True)
class Goal:
    """One line of the headline: cancelflow's row / a peer's row, for one metric."""

    key: str
    figure: str  # at most 42 characters
    scenario: str
    variant: str
    metric: str
    peer: str  # the system of the row compared against
    op: str  # ">=" (throughput), "<=" (latency, cost), "~" (about the same), "info"
    target: float = 1.0
    ours_tag: str | None = None  # None: cancelflow's primary row
    peer_tag: str | None = None  # None: the peer's primary row
    needs: str = ""  # what to pip install when its rows are missing (not planned)


#: A ratio within this factor of 1 meets a "~1x" goal.
ABOUT_THE_SAME = 1.25
#: The headline's lines, in order (issue 16's table).
GOALS: tuple[Goal, ...] = (
    Goal("thread_tput_2", "thread pool tput vs TPE, 2 threads", "7", "threads", "throughput",
         "concurrent.futures", ">=", 0.5),
    Goal("thread_tput_8", "thread pool tput vs TPE, 8 threads", "7", "threads8", "throughput",
         "concurrent.futures", ">=", 0.5),
    Goal("process_tput_pebble", "process pool tput, 2 workers, vs pebble", "7", "processes",
         "throughput", "pebble", ">=", 1.0),
    Goal("process_tput_mp", "process pool tput vs mp.Pool.apply_async", "7", "processes",
         "throughput", "multiprocessing.Pool", "info"),
    Goal("process_tput_main", "the same, a __main__ function, vs pebble", "7",
         "processes_main", "throughput", "pebble", "info"),
    Goal("coop_process", "coop process task: -> raises vs anyio", "3", "process",
         "caller_raises", "anyio", "<=", 1.0),
    Goal("kill_caller", "kill, grace 0: -> caller released vs anyio", "1", "loop",
         "caller_unblocked", "anyio", "<=", 1.0),
    Goal("next_after_kill", "next task after a kill vs trio-parallel", "1", "loop",
         "next_task", "trio-parallel", "<=", 1.0),
    Goal("coop_thread", "coop thread task: -> raises vs TPE+Event", "3", "thread",
         "caller_raises", "concurrent.futures", "<=", 1.2),
    Goal("run_sync_scope", "run_sync: anyio scope vs asyncio cancel", "1", "loop",
         "caller_unblocked", "cancelflow", "~", 1.0,
         ours_tag="run_sync, anyio cancel scope", peer_tag="run_sync, asyncio Task.cancel()",
         needs="anyio"),
    Goal("check_cost", "check_cancelled() vs is_cancelled, cost", "7", "token_check",
         "check_cost", "cancelflow", "<=", 1.5, ours_tag="check_cancelled()"),
)  # fmt: skip
_PIP = {"pebble": "pebble", "loky": "loky", "anyio": "anyio", "trio-parallel": "trio-parallel"}

# (system or "*", "metric/variant" or "metric"); the most specific one wins.
_KILL_PATH = (
    "it SIGKILLs its own child directly; cancelflow's stop goes through its supervisor thread "
    "and freezes and kills the whole process tree (SIGSTOP, /proc scan, SIGKILL, one pidfd per "
    "member) before it releases the caller"
)
_WHY_PEER_FASTER = {
    ("raw", "*"): (
        "the floor: a bare process (from the forkserver) and SIGKILL, no pool, nothing to reuse"
    ),
    ("raw", "*/thread"): "the floor: a bare thread, an Event and join()",
    ("loky", "caller_unblocked"): (
        "loky fails the future when shutdown(kill_workers=True) is called, before its worker "
        "is dead; cancelflow waits until the worker and its tree are confirmed gone"
    ),
    ("asyncio", "caller_unblocked"): (
        "asyncio only cancels the awaiting task; the worker runs on (it is never stopped)"
    ),
    ("*", "caller_unblocked"): _KILL_PATH,
    ("*", "worker_gone"): (
        "it SIGKILLs its own child directly; cancelflow's stop goes through its supervisor "
        "thread, which first freezes the worker (SIGSTOP) and walks its process tree in /proc"
    ),
    ("*", "caller_raises/process"): (
        "the peer's worker writes to a pipe its caller reads; cancelflow's worker wakes the "
        "caller through a futex word and the caller's thread settles the future, after the "
        "cancel's own path to the task's token (Python, then the slot's record lock): each "
        "step slower the longer the machine idled"
    ),
    ("anyio", "caller_raises/thread"): (
        "anyio's cancel only flags the scope, read by from_thread.check_cancelled(); cancelflow's "
        "token.cancel() runs Python (child-token propagation, callbacks that settle the future)"
    ),
    ("anyio", "task_stopped/thread"): (
        "anyio's cancel only flags the scope, read by from_thread.check_cancelled(); cancelflow's "
        "token.cancel() runs Python (child-token propagation, callbacks that settle the future)"
    ),
    ("*", "caller_raises/thread"): (
        "Event.set() is one C call; cancelflow's token.cancel() runs Python (child-token "
        "propagation, callbacks that settle the future, the grace timer) while it holds the "
        "GIL the woken caller waits for"
    ),
    ("*", "task_stopped/thread"): (
        "Event.set() is one C call; cancelflow's token.cancel() runs Python (child-token "
        "propagation, callbacks that settle the future) while the spinning task holds the GIL"
    ),
    ("*", "caller_raises/coroutine"): (
        "a bare Task.cancel()/cancel scope; cancelflow's executor also runs the registry, the "
        "cleanup handlers and the events, and unregisters the run before it raises"
    ),
    ("*", "caller_error"): (
        "cancelflow fails the future once the zygote has reported the worker's exit status "
        "(to name the signal or exit code), one more hop than reading the worker's death"
    ),
    ("multiprocessing.Pool", "throughput/processes"): (
        "apply_async pickles into one shared pipe served by handler threads; cancelflow's "
        "supervisor thread handles every task and result in Python"
    ),
    ("*", "throughput/processes"): "no per-task token, timer or partial-result channel",
    ("*", "throughput/processes_main"): (
        "cancelflow sends a __main__ function by value (so it runs where the worker cannot "
        "import it: a REPL, python -c) and reuses that pickle while the function is "
        "unchanged; pebble and multiprocessing name it, and their forked workers find it "
        "only if it existed when they forked"
    ),
    ("*", "throughput/threads8"): (
        "every ThreadPool.submit creates a CancellationToken (a shared-memory cell) and takes "
        "the pool's Condition lock, which the worker threads also take: under the GIL that "
        "convoys; ThreadPoolExecutor hands off through a C SimpleQueue"
    ),
    ("*", "throughput/threads"): (
        "every ThreadPool.submit creates a CancellationToken (a shared-memory cell) and takes "
        "the pool's Condition lock, which the worker threads also take: under the GIL that "
        "convoys; ThreadPoolExecutor hands off through a C SimpleQueue"
    ),
}


def _fmt(value: float, unit: str) -> str:
    if unit == "tasks/s":
        return f"{value:,.0f}"
    if unit == "results":
        return f"{value:.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ratio_text(ratio: float) -> str:
    return f"{ratio:.3g}"


def _goal_text(goal: Goal) -> str:
    if goal.op == "info":
        return "info"
    if goal.op == "~":
        return f"~{goal.target:g}x"
    return f"{goal.op}{goal.target:g}x"


def _find(rows: list[dict[str, Any]], goal: Goal, system: str, tag: str | None) -> Any:
    for row in rows:
        if (row["scenario"], row["variant"], row["system"]) != (
            goal.scenario,
            goal.variant,
            system,
        ):
            continue
        if (tag is None and row["primary"]) or (tag is not None and row["tag"] == tag):
            return row
    return None


def _why_missing(row: dict[str, Any] | None, metric: str) -> str | None:
    """``None`` if ``row`` has a p50 for ``metric``, else why it was not measured."""
    if row is None:
        return "scenario not run"
    if row["status"] == "skipped":
        if str(row.get("reason", "")).startswith("cannot import"):
            return f"pip install {_PIP.get(row['system'], row['system'])}"
        return str(row["reason"])
    cell = row["metrics"].get(metric, {})
    if "p50" in cell:
        return None
    if row["status"] == "cannot":
        return f"cannot: {row['reason']}"
    return str(cell.get("cannot") or cell.get("error") or row.get("reason") or "no samples")


def goals(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline's goal rows (``GOALS``) as data: both p50s, the ratio, whether met."""
    rows = data["rows"]
    out: list[dict[str, Any]] = []
    for goal in GOALS:
        ours = _find(rows, goal, "cancelflow", goal.ours_tag)
        peer = _find(rows, goal, goal.peer, goal.peer_tag)
        item: dict[str, Any] = {
            "key": goal.key,
            "figure": goal.figure,
            "scenario": goal.scenario,
            "variant": goal.variant,
            "metric": goal.metric,
            "goal": _goal_text(goal),
            "op": goal.op,
            "target": goal.target,
            "ours": None,
            "peer": None,
            "ratio": None,
            "met": None,
            "measured": False,
            "reason": None,
        }
        for side, row in (("ours", ours), ("peer", peer)):
            if row is not None and "p50" in row["metrics"].get(goal.metric, {}):
                cell = row["metrics"][goal.metric]
                item[side] = {
                    "system": row["system"],
                    "tag": row["tag"],
                    "label": row["label"],
                    "p50": cell["p50"],
                    "unit": cell["unit"],
                    "noisy": bool(row.get("noisy")),
                }
        missing = _why_missing(peer, goal.metric) or _why_missing(ours, goal.metric)
        if (
            goal.needs
            and (ours is None or peer is None)
            and goal.scenario in {r["scenario"] for r in rows}
        ):
            missing = f"pip install {goal.needs}"
        if missing is not None or item["ours"] is None or item["peer"] is None:
            item["reason"] = missing or "no samples"
            out.append(item)
            continue
        ratio = item["ours"]["p50"] / item["peer"]["p50"] if item["peer"]["p50"] > 0 else None
        item["ratio"] = ratio
        item["measured"] = True
        item["noisy"] = item["ours"]["noisy"] or item["peer"]["noisy"]
        if ratio is not None:
            if goal.op == ">=":
                item["met"] = ratio >= goal.target
            elif goal.op == "<=":
                item["met"] = ratio <= goal.target
            elif goal.op == "~":
                item["met"] = 1 / ABOUT_THE_SAME <= ratio / goal.target <= ABOUT_THE_SAME
        out.append(item)
    return out


def _goal_value(side: dict[str, Any]) -> str:
    unit, value = side["unit"], side["p50"]
    text = f"{value:,.0f}/s" if unit == "tasks/s" else f"{_fmt(value, unit)} {unit}"
    return text + ("~" if side["noisy"] else "")


def format_goals(items: list[dict[str, Any]]) -> list[str]:
    """The headline table: one line per goal, at most 100 columns."""
    lines = [
        f"{'figure':<42}  {'cancelflow p50':>14}  {'peer p50':>12}  {'ratio':>7}  "
        f"{'goal':>7}  {'met?':<5}"
    ]
    for item in items:
        if not item["measured"]:
            reason = str(item["reason"])
            room = 100 - 42 - 2 - len("not measured ()")
            if len(reason) > room:
                reason = reason[: room - 3] + "..."
            lines.append(f"{item['figure']:<42}  not measured ({reason})")
            continue
        met = {True: "yes", False: "NO", None: "-"}[item["met"]]
        if item["op"] == "info":
            met = "info"
        ratio = "-" if item["ratio"] is None else f"{item['ratio']:.3g}x"
        lines.append(
            f"{item['figure']:<42}  {_goal_value(item['ours']):>14}  "
            f"{_goal_value(item['peer']):>12}  {ratio:>7}  {item['goal']:>7}  {met:<5}"
        )
    return [line.rstrip() for line in lines]


def headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    """cancelflow p50 / peer p50 for every metric both measured, in the same run."""
    out: list[dict[str, Any]] = []
    rows = data["rows"]
    for scenario in data["scenarios"]:
        for variant in scenario["variants"]:
            here = [
                r
                for r in rows
                if r["scenario"] == scenario["key"] and r["variant"] == variant["key"]
            ]
            ours = next((r for r in here if r["system"] == "cancelflow" and r["primary"]), None)
            if ours is None:
                continue
            for metric in variant["metrics"]:
                mine = ours["metrics"].get(metric["key"], {})
                if "p50" not in mine or mine["p50"] <= 0:
                    continue
                for peer in here:
                    if peer["system"] == "cancelflow":
                        continue
                    theirs = peer["metrics"].get(metric["key"], {})
                    if "p50" not in theirs or theirs["p50"] <= 0:
                        continue
                    ratio = mine["p50"] / theirs["p50"]
                    better = ratio > 1 if metric["higher_is_better"] else ratio < 1
                    out.append(
                        {
                            "scenario": scenario["key"],
                            "variant": variant["key"],
                            "metric": metric["key"],
                            "metric_title": metric["title"],
                            "unit": metric["unit"],
                            "peer": peer["system"] + (f" ({peer['tag']})" if peer["tag"] else ""),
                            "peer_label": peer["label"],
                            "cancelflow_p50": mine["p50"],
                            "peer_p50": theirs["p50"],
                            "ratio": ratio,
                            "faster": "cancelflow" if better else ("tie" if ratio == 1 else "peer"),
                            "close": 0.8 <= ratio <= 1.25,
                            "noisy": bool(ours.get("noisy") or peer.get("noisy")),
                            "why": ""
                            if better
                            else _why(peer["system"], metric["key"], variant["key"]),
                        }
                    )
    return out


def _why(system: str, metric: str, variant: str) -> str:
    for key in (
        (system, f"{metric}/{variant}"),
        (system, metric),
        (system, f"*/{variant}"),
        (system, "*"),
        ("*", f"{metric}/{variant}"),
        ("*", metric),
    ):
        if key in _WHY_PEER_FASTER:
            return _WHY_PEER_FASTER[key]
    return ""


def _is_not_installed(row: dict[str, Any]) -> bool:
    return row["status"] == "skipped" and str(row.get("reason", "")).startswith("cannot import")


def not_installed(rows: list[dict[str, Any]]) -> list[str]:
    """The systems skipped because a peer library cannot be imported, in first-seen order."""
    return list(dict.fromkeys(row["system"] for row in rows if _is_not_installed(row)))


def format_report(data: dict[str, Any]) -> str:
    lines: list[str] = []
    m = data["machine"]
    v = data["versions"]
    s = data["settings"]
    lines.append(f"cancelflow bench ({data['mode']} run) - {data['date']}")
    lines.append(
        f"machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable) {m['cpu_model']}; {m['platform']}; "
        f"{m['python']}; load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end"
    )
    lines.append("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    lines.append(
        f"samples per cell: {s['samples']}; random pause after the task signalled: 0-{s['max_pause_ms']:.0f} ms "
        f"(seed {s['seed']}); runtime {data['runtime_s']:.0f} s"
    )
    lines.append(
        "times in ms from the cancel (or the crash) unless stated; p50/p90/p99/max over n samples"
    )
    lines.append(
        "process deaths are stamped by a separate pidfd watcher process"
        + (
            " (SCHED_FIFO)"
            if data.get("watcher_realtime")
            else " (normal priority: may lag on a loaded machine)"
        )
    )
    missing = not_installed(data["rows"])
    if missing:
        lines.append(
            f"not measured, not installed: {', '.join(missing)} "
            f"(pip install 'cancelflow[bench]' to compare against them)"
        )
    lines.append(
        f"rounds: {s.get('rounds', 1)}; each cell's samples are split into rounds, and in each "
        "round every system is measured in turn (order rotated per round)"
    )
    lines.append(
        "a caller is a thread (or task) blocked in the system's own wait (result(), get(), "
        "join(), await), started before the cancel"
    )
    lines.append(
        f"~ = noisy cell: other processes used > {NOISY_BACKGROUND:g} CPU during one of its "
        f"rounds, or its round p50s (rounds of >= {MIN_ROUND_SAMPLES} samples) differ by "
        f"> {NOISY_SPREAD:g}x"
    )
    lines.append("")
    lines.append("## Headline: goals (cancelflow p50 / peer p50, same interleaved run)")
    lines.extend(format_goals(data["goals"] if "goals" in data else goals(data)))
    lines.append(
        "ratio = cancelflow / peer: tasks/s (higher is better) or ms, ns (lower is better)"
    )
    lines.append(
        f"~ after a value: noisy cell; ~1x goal: within {ABOUT_THE_SAME:g}x; NO: goal not met"
    )
    for scenario in data["scenarios"]:
        for variant in scenario["variants"]:
            lines.append("")
            lines.append(f"## {scenario['key']}. {scenario['title']} - {variant['title']}")
            units = {mt["key"]: mt for mt in variant["metrics"]}
            lines.append(
                f"   {'system / metric':<43} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'n':>4}"
            )
            for row in data["rows"]:
                if row["scenario"] != scenario["key"] or row["variant"] != variant["key"]:
                    continue
                if _is_not_installed(row):
                    continue  # said once, above
                mark = "~" if row.get("noisy") else " "
                lines.append(f"  {mark}{row['system']}: {row['label']}")
                if row["status"] in ("cannot", "skipped") or (
                    row["status"] == "error" and not row["metrics"]
                ):
                    lines.append(f"      {row['status']}: {row['reason']}")
                    continue
                for key, cell in row["metrics"].items():
                    title = f"{units[key]['title']} ({units[key]['unit']})"
                    if "cannot" in cell:
                        lines.append(f"      {title:<40} cannot: {cell['cannot']}")
                    elif "error" in cell:
                        lines.append(f"      {title:<40} ERROR: {cell['error']}")
                    else:
                        unit = cell["unit"]
                        lines.append(
                            f"      {title:<40} {_fmt(cell['p50'], unit):>8} {_fmt(cell['p90'], unit):>8} "
                            f"{_fmt(cell['p99'], unit):>8} {_fmt(cell['max'], unit):>8} {cell['n']:>4}"
                        )
                extras = {
                    k: val
                    for k, val in row["extra"].items()
                    if k in ("grandchild_left_alive", "raised", "error")
                }
                if extras:
                    lines.append("      " + "; ".join(f"{k}: {val}" for k, val in extras.items()))
                for note in row["notes"]:
                    lines.append(f"      note: {note}")
                if row.get("noisy"):
                    lines.append("      noisy: " + "; ".join(row["noisy_why"]))
                if row["status"] == "error":
                    lines.append(f"      ERROR: {row['reason']}")
    heads = headline(data)
    lines.append("")
    lines.append("## Every ratio: cancelflow p50 / peer p50, same run")
    lines.append(
        "   (latency: below 1 = cancelflow faster; throughput: above 1 = cancelflow faster; "
        "(~) = within 25%, about the noise of this shared machine)"
    )
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for item in heads:
        groups[(item["scenario"], item["variant"], item["metric_title"])].append(item)
    for (scn, var, title), items in groups.items():
        parts = [
            f"{it['peer']} {_ratio_text(it['ratio'])}{'~' if it.get('noisy') else ''}"
            + (" (peer faster)" if it["faster"] == "peer" and not it["close"] else "")
            + (" (~)" if it["close"] else "")
            for it in items
        ]
        lines.append(f"   {scn} {var:<11} {title:<36} " + ", ".join(parts))
    lines.append("")
    lines.append("## Where a peer is faster (p50)")
    slower = [it for it in heads if it["faster"] == "peer"]
    if not slower:
        lines.append("   nowhere")
    for close in (False, True):
        group = [it for it in slower if it["close"] == close]
        if close and group:
            lines.append("   within 25% (about the noise here):")
        for it in group:
            unit = it["unit"]
            lines.append(
                f"   {it['scenario']} {it['variant']}, {it['metric_title']}: {it['peer']} "
                f"{_fmt(it['peer_p50'], unit)} vs cancelflow {_fmt(it['cancelflow_p50'], unit)} {unit}"
                + (
                    f" (cancelflow {it['ratio'] if unit != 'tasks/s' else 1 / it['ratio']:.2g}x slower)"
                    if not close
                    else ""
                )
                + (f" - {it['why']}" if it["why"] and not close else "")
            )
    lines.append("")
    lines.append("## Leftovers per system (found after each cell, then removed by the benchmark)")
    for system in data["systems"]:
        entry = data["leaks"].get(system)
        if entry is None:
            lines.append(f"   {system:<22} not run")
            continue
        found = []
        for key in ("processes", "zombies", "threads", "shm"):
            if entry[key]:
                found.append(f"{len(entry[key])} {key} (e.g. {entry[key][0]})")
        if entry["killed_by_benchmark"]:
            found.append(
                f"{entry['killed_by_benchmark']} processes it left running (workers it cannot stop, "
                "grandchildren) were killed by the benchmark"
            )
        if entry["shm_unattributed"]:
            found.append(
                f"{len(entry['shm_unattributed'])} /dev/shm entries appeared that nobody holds "
                "(owner unknown: on this shared machine, likely another program's)"
            )
        if entry["asyncio_log"]:
            found.append(
                f"{len(entry['asyncio_log'])} asyncio log warnings (e.g. {entry['asyncio_log'][0]!r})"
            )
        if entry["orphans_reaped"]:
            found.append(
                f"{entry['orphans_reaped']} orphaned grandchildren reaped by the benchmark"
            )
        if entry["helpers"]:
            found.append(f"helpers started: {len(entry['helpers'])} (interpreter-lifetime)")
        lines.append(f"   {system:<22} " + ("; ".join(found) if found else "nothing left"))
    left = data["leftovers_after_run"]
    lines.append(
        "   after the run: "
        + (
            "nothing left"
            if not (left["threads"] or left["processes"] or left["shm"])
            else f"threads {left['threads']}, processes {left['processes']}, shm {left['shm']}"
        )
        + (f" (helpers living until exit: {len(left['helpers'])})" if left["helpers"] else "")
    )
    return "\n".join(lines)
