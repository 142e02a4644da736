"""The demo's summary (the ``--json`` output): per run, per node, latency, final check, problems."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from cancelflow._version import __version__

from .pipeline import ROLES, WITH_FINALLY
from .records import RunRecord
from .settings import EXIT_INTERRUPTED, EXIT_OK, EXIT_PROBLEM
from .story import Demo


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def _run_summary(demo: Demo, run: RunRecord) -> dict[str, Any]:
    result = run.result
    partials = demo._partials(run)
    if run.never_started:
        outcome = "not started"
    elif result is not None:
        outcome = result.outcome
    elif run.finished is not None:
        outcome = str(run.finished.get("outcome"))
    else:
        outcome = "error"
    reason = result.cancel_reason if result is not None else demo.reason
    wave_num = result.wave_cancelled_at if result is not None else None
    if wave_num is None and run.finished is not None and outcome != "completed":
        wave_num = run.finished.get("wave_num")
    running_wave = None
    if demo.t_cancel is not None:
        t_cancel = demo.t_cancel
        started = [
            n.wave for n in run.nodes.values() if n.started is not None and n.started <= t_cancel
        ]
        if started and (run.ended is None or run.ended >= t_cancel):
            running_wave = max(started)
    nodes: dict[str, Any] = {}
    for node in run.nodes.values():
        entry: dict[str, Any] = {
            "wave": node.wave,
            "run_in": node.run_in,
            "fate": node.fate,
            "detail": node.detail,
        }
        if node.id in ROLES:
            entry["role"] = ROLES[node.id]
        so_far = partials.get(f"{node.id}.so_far")
        entry["progress"] = (
            round(float(so_far["done"]), 3)
            if isinstance(so_far, dict)
            else (1.0 if node.fate == "finished" else 0.0)
        )
        if demo.t_cancel is not None and node.ended is not None and node.ended >= demo.t_cancel:
            entry["stopped_ms_after_cancel"] = _ms(node.ended - demo.t_cancel)
        if (
            demo.t_interrupt is not None
            and node.ended is not None
            and node.ended >= demo.t_interrupt
        ):
            entry["stopped_ms_after_interrupt"] = _ms(node.ended - demo.t_interrupt)
        if node.worker_pid is not None:
            entry["worker_pid"] = node.worker_pid
            entry["worker_alive_after_run"] = node.worker_alive
        if node.helper_pid is not None:
            entry["helper_pid"] = node.helper_pid
            entry["helper_alive_after_run"] = node.helper_alive
        if node.id in WITH_FINALLY and node.fate in ("cancelled", "terminated", "killed"):
            # The block stores "finally" when it runs: the partial result is the proof.
            entry["finally_ran"] = f"{node.id}.finally" in partials
        if node.error:
            entry["error"] = node.error
        nodes[node.id] = entry
    cancelled = outcome in ("cancelled", "timed_out")
    expected_runs = 1 if cancelled or run.interrupted_by_user else 0
    return {
        "pipeline_id": run.pipeline_id,
        "request": run.request,
        "outcome": outcome,
        "reason": reason if outcome != "completed" else None,
        "interrupted_by_user": run.interrupted_by_user,
        "cancelled_during_wave": running_wave,
        "first_incomplete_wave": wave_num,
        "duration_ms": _ms(run.ended - run.started) if run.ended and run.started else None,
        "nodes": nodes,
        "partial_results": _json_safe(partials),
        "cleanup": {
            "runs": dict(run.cleanup_runs),
            "expected_runs_each": expected_runs,
            "ran_exactly_once": all(count == 1 for count in run.cleanup_runs.values()),
            "errors": [repr(e) for e in (result.cleanup_errors if result else ())],
        },
        "scratch_dir_left": os.path.exists(run.scratch),
        "error": run.error,
    }


def _problems(summary: dict[str, Any]) -> list[str]:
    problems = []
    for run in summary["runs"]:
        pid = run["pipeline_id"]
        if run["error"]:
            problems.append(f"{pid}: {run['error']}")
        if run["outcome"] in ("failed", "error"):
            problems.append(f"{pid}: ended {run['outcome']}")
        expected = run["cleanup"]["expected_runs_each"]
        for handler, count in run["cleanup"]["runs"].items():
            if count != expected:
                problems.append(
                    f"{pid}: cleanup handler {handler!r} ran {count} times, not {expected}"
                )
        if run["scratch_dir_left"] and expected:
            problems.append(f"{pid}: its scratch directory was not removed by the cleanup")
        for node_id, node in run["nodes"].items():
            if node["fate"] in ("failed", "crashed"):
                problems.append(
                    f"{pid}: node {node_id} failed: {node.get('error') or node['detail']}"
                )
            if node["fate"] == "killed" and node.get("worker_alive_after_run"):
                problems.append(f"{pid}: node {node_id} was killed but its worker still runs")
            if node.get("helper_alive_after_run"):
                problems.append(f"{pid}: node {node_id}'s helper process still runs")
    left = summary["final_check"]
    if left["processes_left"]:
        problems.append(f"processes left running: {left['processes_left']}")
    if left["threads_left"]:
        problems.append(f"threads left running: {left['threads_left']}")
    if left.get("dask_workers_left"):
        problems.append(f"left on the Dask workers: {left['dask_workers_left']}")
    return problems


def summarize(
    args: argparse.Namespace,
    demo: Demo,
    thread_stats: Any,
    left: tuple[list[dict[str, Any]], list[str], int, int],
) -> dict[str, Any]:
    runs = [_run_summary(demo, run) for run in demo.runs]
    first = demo.runs[0]
    latency: dict[str, float | None] = {}
    if demo.t_cancel is not None:
        ends = [
            n.ended
            for n in first.nodes.values()
            if n.ended is not None and n.ended >= demo.t_cancel
        ]
        latency["cancel_to_last_node_stopped"] = _ms(max(ends) - demo.t_cancel) if ends else None
        if first.ended is not None:
            latency["cancel_to_pipeline_end"] = _ms(first.ended - demo.t_cancel)
        if demo.t_interrupt is not None and first.ended is not None:
            latency["interrupt_to_pipeline_end"] = _ms(first.ended - demo.t_interrupt)
        if len(demo.runs) > 1 and demo.runs[1].started is not None:
            latency["cancel_to_newer_request_started"] = _ms(demo.runs[1].started - demo.t_cancel)
    procs_left, threads_left, procs_checked, threads_checked = left
    summary: dict[str, Any] = {
        "cancelflow_version": __version__,
        "mode": args.mode,
        "grace_s": args.grace,
        "cancel_after_s": args.cancel_after,
        "supersede": bool(args.supersede),
        "trigger": demo.trigger,
        "reason": demo.reason,
        "interrupted_by_user": demo.stage >= 2,
        "timer_fired_after_completion": demo.timer_late,
        "runs": runs,
        "latency_ms": latency,
        "thread_pool": None
        if thread_stats is None
        else {
            "abandoned_total": thread_stats.abandoned_total,
            "cancelled": thread_stats.cancelled,
        },
        "final_check": {
            "processes_checked": procs_checked,
            "threads_checked": threads_checked,
            "processes_left": procs_left,
            "threads_left": threads_left,
        },
    }
    if demo.dask is not None:
        summary["dask"] = {
            "address": demo.dask.address,
            "local_cluster": demo.dask.local,
            "workers": demo.dask.workers,
        }
        summary["final_check"]["dask_workers_left"] = demo.dask_left
    summary["nothing_left"] = (
        not procs_left and not threads_left and not summary["final_check"].get("dask_workers_left")
    )
    summary["problems"] = _problems(summary)
    if summary["problems"]:
        summary["exit_code"] = EXIT_PROBLEM
    elif summary["interrupted_by_user"]:
        summary["exit_code"] = EXIT_INTERRUPTED
    else:
        summary["exit_code"] = EXIT_OK
    return summary
