"""The summary as text: what the demo prints at the end."""

from __future__ import annotations

import shutil
import textwrap
from typing import Any

from .pipeline import WAVES
from .settings import EXIT_INTERRUPTED, EXIT_OK, EXIT_PROBLEM


def _short(value: Any, width: int = 72) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _wave_text(num: int | None) -> str:
    if num is None:
        return "-"
    if num >= len(WAVES):
        return "none (every wave completed)"
    wave = WAVES[num]
    return f"wave {num + 1}/{len(WAVES)} '{wave.name}' ({wave.where})"


#: where the wrapped part of a line goes on: under a node's details, under a partial
#: result's value (a ``  key : value`` line: under its value; else two columns in)
_NODE_DETAILS = 41
_PARTIAL_VALUE = 30


def terminal_width() -> int:
    """The width to lay the summary out in: the terminal's, kept within 60..120."""
    return max(60, min(120, shutil.get_terminal_size((100, 24)).columns))


def fit_line(line: str, width: int, indent: int) -> list[str]:
    """``line`` wrapped at ``width`` on spaces only (a pid or a number is never cut),
    the rest indented by ``indent``."""
    if len(line) <= width:
        return [line]
    return textwrap.wrap(
        line,
        width,
        subsequent_indent=" " * indent,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [line]


def render(summary: dict[str, Any], width: int | None = None) -> str:
    """The summary, each line wrapped to ``width`` columns (default: the terminal's)."""
    width = terminal_width() if width is None else width
    lines: list[str] = []

    def add(line: str, indent: int | None = None) -> None:
        if indent is None:
            stripped = len(line) - len(line.lstrip(" "))
            indent = 19 if line.startswith("  ") and " : " in line[:19] else stripped + 2
        lines.extend(fit_line(line, width, indent))

    first = summary["runs"][0]
    add("")
    headline = {
        "timer": "cancelled from the --cancel-after timer thread",
        "ctrl-c": "cancelled by Ctrl-C",
        "supersede": "superseded by a newer request",
    }.get(summary["trigger"] or "", "not cancelled: the pipeline completed")
    if summary["interrupted_by_user"]:
        headline += ", then interrupted by a second Ctrl-C"
    add(f"== {first['pipeline_id']}: {headline} ==")
    dask = summary.get("dask")
    if dask:
        where = "a LocalCluster started by the demo, closed since" if dask["local_cluster"] else ""
        add(f"  ran on         : Dask {dask['address']}" + (f" ({where})" if where else ""))
    add(f"  reason         : {first['reason'] or '-'}")
    mode = summary["mode"]
    stopped = [
        node_id
        for node_id, node in first["nodes"].items()
        if node["fate"] in ("cancelled", "killed", "terminated")
    ]
    if summary["trigger"] is None:
        add("  mode           : -")
    elif mode == "graceful" and summary["interrupted_by_user"]:
        add("  mode           : graceful, until the second Ctrl-C interrupted the running wave")
    elif mode == "graceful" and stopped:
        add(
            f"  mode           : graceful: the running wave had {summary['grace_s']:g} s (--grace) "
            f"to finish; {', '.join(stopped)} had not, so the wave was interrupted"
        )
    elif mode == "graceful":
        add("  mode           : graceful: the running wave finished; no new wave started")
    else:
        add("  mode           : interrupt: the running nodes were told at once")
    add(f"  cancelled in   : {_wave_text(first['cancelled_during_wave'])}")
    add(f"  first wave not completed: {_wave_text(first['first_incomplete_wave'])}")
    for run in summary["runs"]:
        add("")
        add(f"Nodes of {run['pipeline_id']} ({run['outcome']})")
        for node_id, node in run["nodes"].items():
            parts = [f"[{node['role']}]"] if "role" in node else []
            if node["detail"]:
                parts.append(node["detail"])
            # What its finally block stored says whether it ran (a terminated node's
            # detail already says that it did).
            if "finally_ran" in node and not (node["finally_ran"] and node["fate"] == "terminated"):
                parts.append("its finally ran" if node["finally_ran"] else "its finally never ran")
            if "stopped_ms_after_interrupt" in node and node["fate"] != "finished":
                parts.append(f"{node['stopped_ms_after_interrupt']:.0f} ms after the second Ctrl-C")
            elif "stopped_ms_after_cancel" in node and node["fate"] != "finished":
                parts.append(f"{node['stopped_ms_after_cancel']:.0f} ms after the cancel")
            if "worker_pid" in node and node["fate"] == "killed":
                gone = "gone" if not node["worker_alive_after_run"] else "STILL RUNNING"
                parts.append(f"worker {node['worker_pid']} {gone}")
            elif "worker_pid" in node and node["fate"] == "terminated":
                # SIGTERM ended the task, not its worker: the worker takes the next task.
                parts.append(f"worker {node['worker_pid']} kept")
            if "helper_pid" in node:
                gone = "gone" if not node["helper_alive_after_run"] else "STILL RUNNING"
                parts.append(f"helper process {node['helper_pid']} {gone}")
            add(
                f"  {node['wave'] + 1}/{len(WAVES)} {node_id:<15}{node['run_in']:<8}"
                f"{node['fate']:<12}{'; '.join(parts)}".rstrip(),
                _NODE_DETAILS,
            )
        if run["outcome"] != "completed":
            add("")
            partials = run["partial_results"]
            add(f"Partial results kept ({len(partials)}; CancelledException.partial_results)")
            order = list(run["nodes"])
            for key, value in sorted(
                partials.items(),
                key=lambda item: (
                    order.index(item[0].partition(".")[0])
                    if item[0].partition(".")[0] in order
                    else 99,
                    "." not in item[0],
                    item[0],
                ),
            ):
                node_id, _, name = key.partition(".")
                fate = run["nodes"].get(node_id, {}).get("fate")
                note = ""
                if name == "finally" and fate == "terminated":
                    note = "   <- stored by its finally block, after SIGTERM"
                elif name and fate == "terminated":
                    note = "   <- stored before SIGTERM stopped it"
                elif name and fate == "killed":
                    note = "   <- stored by a process that was then killed"
                elif name and fate == "cancelled":
                    note = "   <- stored before it was cancelled"
                add(
                    f"  {key:<27} {_short(value, width - _PARTIAL_VALUE - 1)}{note}", _PARTIAL_VALUE
                )
        add("")
        cleanup = run["cleanup"]
        if cleanup["expected_runs_each"]:
            add(
                f"Cleanup handlers of {run['pipeline_id']} (run exactly once, after every node stopped)"
            )
        else:
            add(
                f"Cleanup handlers of {run['pipeline_id']} (it completed: handlers are dropped, not run)"
            )
        for handler, count in cleanup["runs"].items():
            ok = "ok" if count == cleanup["expected_runs_each"] else "WRONG"
            add(f"  {handler:<30} ran {count}x  {ok}")
    latency = summary["latency_ms"]
    if latency:
        add("")
        add("Cancellation latency (measured)")
        labels = {
            "cancel_to_last_node_stopped": "cancel -> last node stopped",
            "cancel_to_pipeline_end": "cancel -> pipeline ended (cleanup included)",
            "interrupt_to_pipeline_end": "second Ctrl-C -> pipeline ended",
            "cancel_to_newer_request_started": "supersede -> newer request started",
        }
        graceful = mode == "graceful" and not summary["interrupted_by_user"]
        for key, label in labels.items():
            if latency.get(key) is not None:
                why = ""
                if graceful and key == "cancel_to_last_node_stopped":
                    why = f" (incl. <= {summary['grace_s']:g} s --grace)"
                add(f"  {label:<46} {latency[key]:8.1f} ms{why}", 60)
    check = summary["final_check"]
    add("")
    if summary["nothing_left"]:
        add(
            f"Final check: no process left ({check['processes_checked']} started by the demo, "
            f"all gone), no thread left ({check['threads_checked']} started, all ended)"
        )
        if dask:
            add(
                "  and nothing on the Dask workers after the run: no task, no run, no process "
                "besides each worker's idle pool"
            )
        if dask and dask["local_cluster"]:
            add("  (the processes checked include the LocalCluster's, all gone after its close)")
    else:
        add(
            f"Final check FAILED: processes left {check['processes_left']}, threads left {check['threads_left']}"
        )
    for problem in summary["problems"]:
        add(f"PROBLEM: {problem}")
    meaning = {
        EXIT_OK: "the story ran to its end and nothing is left",
        EXIT_PROBLEM: "something was left running or went wrong",
        EXIT_INTERRUPTED: "interrupted by a second Ctrl-C; nothing is left",
    }[summary["exit_code"]]
    add(f"exit code {summary['exit_code']}: {meaning}")
    return "\n".join(lines)
