"""``cancelflow demo``: the command's options, and ``run``, which sets the stage (pools or
a Dask cluster, the display), tells the story, checks that nothing is left, and prints
the summary. Its exit codes are in the package docstring.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import shutil
import sys
import threading
from typing import Any, TextIO

import psutil
from loguru import logger

from cancelflow._platform import PROCESS_POOLS
from cancelflow._thread_pool import ThreadPool
from cancelflow._version import __version__

from .check import leftovers
from .cluster import close_cluster, quiet_dask, restore_loggers, start_local_cluster
from .display import make_display, silence
from .pool import DemoProcessPool
from .records import DaskTarget
from .render import render
from .settings import (
    DASK_LOCAL_WORKERS,
    DASK_MISSING,
    DASK_PROCESS_WIDE_THREADS,
    DEFAULT_CANCEL_INTO_CPU_WAVE,
    DEFAULT_GRACE,
    EXIT_INTERRUPTED,
    EXIT_PROBLEM,
    EXIT_USAGE,
    NO_PROCESS_POOLS,
    PROCESS_GRACE,
    TERM_GRACE,
    THREAD_GRACE,
)
from .story import Demo
from .summary import summarize

_EPILOG = f"""\
what it shows:
  wave 1  event loop  fetch_orders, fetch_prices     simulated I/O
  wave 2  threads     parse_orders, parse_prices     blocking work, checks its token
  wave 3  processes   score_orders                   CPU work, checks its token
                      simulate_risk                  pure-Python loop, never checks it
                      render_chart                   starts a helper process of its own
                      archive_orders                 a helper process; ignores SIGTERM
  wave 4  event loop  publish_report

  Then it cancels, and reports the reason, the wave that was running, each node's fate
  (finished / cancelled / terminated / killed / not started), the partial results kept
  (also those a killed process node stored), the cleanup handlers that ran (exactly
  once), the latency it measured, and checks that no process or thread it started is
  left. A process node that is still running is stopped by the pool's ladder: its token
  (score_orders stops there: cancelled), SIGTERM {PROCESS_GRACE:g} s later, which becomes an exception
  so that its finally blocks run (simulate_risk: terminated), SIGKILL of its worker and
  its process tree {TERM_GRACE:g} s after that (archive_orders, which ignores SIGTERM: killed).

--dask ADDRESS runs the same pipeline on a Dask distributed cluster (--dask local starts
one on 127.0.0.1 and closes it at the end): process nodes run in a child process of a
worker and are hard-cancelled there; loop and thread nodes are cooperative only.

Ctrl-C cancels the pipeline in its --mode; a second Ctrl-C interrupts a cancel that is
still running (a third one quits at once, skipping the final check).

exit codes:
  0    the story ran to its end (cancelled, superseded, or completed) and nothing is left
  1    something it started is still running, or something went wrong (see "problems")
  2    bad command line, --dask without distributed (pip install 'cancelflow[dask]'),
       or no process pool on this platform (Windows) without --dask ADDRESS
  130  interrupted by a second Ctrl-C; everything stopped and nothing is left
"""


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"must be > 0 and < 3600 seconds, got {text}")
    return value


def add_parser(sub: Any) -> None:
    """Add the ``demo`` subcommand to the ``cancelflow`` command's subparsers."""
    parser = sub.add_parser(
        "demo",
        help="run a realistic pipeline across loop, threads and processes, and cancel it",
        description=(
            "Run a report pipeline across the event loop, threads and processes with live\n"
            "progress per node, cancel it, and show what happened to every part of it."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cancel-after",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help=(
            "cancel (from a timer thread) this many seconds after the pipeline starts "
            f"(default: {DEFAULT_CANCEL_INTO_CPU_WAVE:g} s after the process wave starts)"
        ),
    )
    parser.add_argument(
        "--mode",
        choices=("graceful", "interrupt"),
        default="graceful",
        help=(
            "graceful: no new wave starts and the running wave may finish within --grace "
            "seconds, then it is interrupted; interrupt: running nodes are told at once "
            "(default: graceful)"
        ),
    )
    parser.add_argument(
        "--grace",
        type=_positive_seconds,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help=f"how long a graceful cancel lets the running wave finish (default: {DEFAULT_GRACE:g})",
    )
    parser.add_argument(
        "--supersede",
        action="store_true",
        help=(
            "instead of cancelling, send a newer request for the same key: it supersedes "
            "the running one (cancelled in its --mode), then runs to completion"
        ),
    )
    parser.add_argument(
        "--dask",
        default=None,
        metavar="ADDRESS",
        help=(
            "run the pipeline on a Dask distributed cluster: a scheduler address "
            "(tcp://host:8786), or 'local' to start a LocalCluster on 127.0.0.1 "
            f"({DASK_LOCAL_WORKERS} worker processes) and close it at the end; "
            "needs pip install 'cancelflow[dask]'"
        ),
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a machine-readable summary on stdout, nothing else (progress goes to stderr)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="plain progress lines even on a terminal",
    )
    parser.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default=None,
        help="also show cancelflow's own log records at this level and above (default: none)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo for the parsed ``args``; return the exit code (see the package docstring)."""
    if getattr(args, "dask", None) is not None:
        if not args.dask.strip():
            print("cancelflow demo: --dask needs a scheduler address or 'local'", file=sys.stderr)
            return EXIT_USAGE
        if importlib.util.find_spec("distributed") is None:
            print(DASK_MISSING, file=sys.stderr)
            return EXIT_USAGE
    local = args.dask is None or args.dask.strip().lower() == "local"
    if local and not PROCESS_POOLS:
        print(NO_PROCESS_POOLS.format(platform=sys.platform), file=sys.stderr)
        return EXIT_USAGE
    out: TextIO = sys.stderr if args.json else sys.stdout
    display = make_display(out, args.plain)
    sink_id: int | None = None
    if args.log_level is None:
        logger.disable("cancelflow")
    else:
        logger.remove()
        sink_id = logger.add(
            lambda message: display.note(str(message).rstrip()),
            level=args.log_level,
            format="{level} {message} {extra}",
        )
        logger.enable("cancelflow")
    if args.dask is not None and args.dask.strip().lower() == "local":
        # multiprocessing's resource tracker (which the LocalCluster's process start needs)
        # lives as long as this interpreter: started now, it is not counted as the demo's.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    threads_before = set(threading.enumerate())
    seen: dict[int, psutil.Process] = {}
    seen_threads: set[threading.Thread] = set()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    demo: Demo | None = None
    threads: ThreadPool | None = None
    processes: DemoProcessPool | None = None
    cluster: Any = None
    dask_target: DaskTarget | None = None
    quieted = quiet_dask(args.log_level) if args.dask is not None else []

    def note_children() -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children(recursive=True):
                if child.pid not in before:
                    seen.setdefault(child.pid, child)

    try:
        display.note(
            f"cancelflow {__version__} demo: mode {args.mode}"
            + (", --supersede" if args.supersede else "")
            + (f", on Dask ({args.dask})" if args.dask is not None else "")
            + "; Ctrl-C cancels, a second Ctrl-C interrupts"
        )
        if args.dask is None:
            threads = ThreadPool(4, grace_period=THREAD_GRACE, name="demo-threads")
            processes = DemoProcessPool()
            processes.wait_ready(30)
            note_children()
            display.note(f"process pool ready: {len(processes.statistics().worker_pids)} workers")
            display.note(
                f"  stop ladder: token; SIGTERM {PROCESS_GRACE:g} s later; "
                f"SIGKILL {TERM_GRACE:g} s after that"
            )
        elif args.dask.strip().lower() == "local":
            display.note(
                f"starting a Dask LocalCluster on 127.0.0.1: {DASK_LOCAL_WORKERS} worker "
                "processes, 1 thread each"
            )
            cluster = start_local_cluster()
            note_children()
            dask_target = DaskTarget(cluster.scheduler_address, True, DASK_LOCAL_WORKERS)
        else:
            dask_target = DaskTarget(args.dask.strip(), False)
        display.start()
        seen_threads.update(t for t in threading.enumerate() if t not in threads_before)
        demo = Demo(
            args, display, threads, processes, seen, seen_threads, threads_before, dask_target
        )
        try:
            asyncio.run(demo.main())
        finally:
            display.stop()
    except KeyboardInterrupt:  # Ctrl-C before or after the pipeline (no loop handler then)
        if demo is not None:
            demo.stage = max(demo.stage, 2)
        display.note("interrupted (Ctrl-C)")
    except Exception as exc:  # e.g. no Dask scheduler at that address
        if args.dask is None:
            raise
        if demo is None or not demo.runs:
            display.note(f"could not run the demo: {type(exc).__name__}: {exc}")
            if cluster is not None:
                note_children()
                close_cluster(cluster)
                cluster = None
            restore_loggers(quieted)
            logger.disable("cancelflow")
            return EXIT_PROBLEM
        demo.runs[0].error = demo.runs[0].error or f"{type(exc).__name__}: {exc}"
    finally:
        if processes is not None:
            processes.shutdown(wait=True, cancel_futures=True, cancel_running=True)
        if threads is not None:
            threads.shutdown(wait=True, cancel_futures=True, cancel_running=True)
        if cluster is not None:
            note_children()  # every process of the cluster is checked below
            seen_threads.update(t for t in threading.enumerate() if t not in threads_before)
            close_cluster(cluster)
        if sink_id is not None:
            logger.remove(sink_id)
        logger.disable("cancelflow")  # the library's default
    for pid in before:
        seen.pop(pid, None)
    left = leftovers(
        seen,
        seen_threads,
        threads_before,
        patience=10.0 if cluster is not None else 5.0,
        ignore_threads=DASK_PROCESS_WIDE_THREADS if args.dask is not None else (),
        ignore_pids=frozenset(before),
    )
    restore_loggers(quieted)
    if demo is None or not demo.runs or (threads is None and dask_target is None):
        clean = not left[0] and not left[1]
        display.block(
            "interrupted before the pipeline started; "
            + ("final check: no process left, no thread left" if clean else f"LEFT: {left[:2]}")
        )
        return EXIT_INTERRUPTED if clean else EXIT_PROBLEM
    summary = summarize(args, demo, threads.statistics() if threads is not None else None, left)
    for record in demo.runs:  # a completed run's handlers did not run: tidy up here
        shutil.rmtree(record.scratch, ignore_errors=True)
    if args.json:
        try:
            print(json.dumps(summary, indent=2), flush=True)
        except BrokenPipeError:
            silence(sys.stdout)
    else:
        display.block(render(summary))
    code: int = summary["exit_code"]
    return code
