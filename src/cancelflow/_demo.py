"""``cancelflow demo``: the project shown end to end in under a minute."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import threading
import time
from typing import Any

from ._token import CancellationToken


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "demo",
        help="run a demo pipeline and cancel it",
        description="Show a token cancelled from another thread and from a child process.",
    )
    parser.add_argument("--json", action="store_true", help="print a machine-readable summary")
    parser.set_defaults(run=run)


def _spin_until_cancelled(token: CancellationToken) -> None:
    token.wait_blocking(30)


def run(args: argparse.Namespace) -> int:
    summary: dict[str, Any] = {}
    # 1. A cancel from another thread wakes a thread blocked on the token.
    token = CancellationToken(name="demo-thread")
    start = time.perf_counter()
    threading.Timer(0.05, token.cancel, args=("cancelled from a timer thread",)).start()
    token.wait_blocking(10)
    summary["thread"] = {
        "reason": token.cancel_reason,
        "latency_ms": round((time.perf_counter() - start - 0.05) * 1e3, 3),
    }
    # 2. A cancel in the parent stops a child process waiting on the same token.
    ctx = multiprocessing.get_context("spawn")
    token = CancellationToken(name="demo-process")
    child = ctx.Process(target=_spin_until_cancelled, args=(token,))
    child.start()
    start = time.perf_counter()
    token.cancel("cancelled by the parent process")
    child.join(30)
    summary["process"] = {
        "reason": token.cancel_reason,
        "exitcode": child.exitcode,
        "child_gone_ms": round((time.perf_counter() - start) * 1e3, 3),
    }
    summary["left_running"] = [p.pid for p in multiprocessing.active_children()]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"thread:  {summary['thread']['reason']!r}")
        print(f"process: {summary['process']['reason']!r}, exit code {child.exitcode}")
        print("no process left" if not summary["left_running"] else "processes left!")
    return 0 if not summary["left_running"] and child.exitcode == 0 else 1
