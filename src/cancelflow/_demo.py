"""``cancelflow demo``: the whole project shown end to end in under a minute.

A report pipeline (see :mod:`cancelflow._demo_nodes`) runs in four waves: simulated I/O
on the event loop, blocking work in threads, CPU work in processes (one node checks its
token, one never does, one starts a helper process of its own), then a last step on the
loop. While it runs the demo draws one progress bar per node (``rich`` when it is
installed and the output is a terminal, plain lines otherwise). Then it cancels the
pipeline: from a timer thread after ``--cancel-after`` seconds, on Ctrl-C, or, with
``--supersede``, by starting a newer request for the same key. Once everything has
stopped it shows the reason, the wave that was running, each node's fate, the partial
results kept, the cleanup handlers that ran, the latency it measured, and it checks that
no process or thread it started is left.

With ``--dask ADDRESS`` the same pipeline runs on a Dask ``distributed`` cluster through
:class:`~cancelflow._backends._dask.DaskRunner` (its thread and process pools); ``--dask
local`` starts a ``LocalCluster`` on 127.0.0.1 for the demo and closes it at the end, and
the final check then also covers the cluster's processes.

Exit codes: 0 the story ran to its end and nothing is left; 1 something was left
running or went wrong; 2 bad command line (or ``--dask`` without ``distributed``
installed); 130 the user interrupted the cancel with a second Ctrl-C (and nothing is left).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import psutil
from loguru import logger

from . import _demo_nodes as demo_nodes
from ._events import PipelineEvent
from ._executor import PipelineExecutor, PipelineResult
from ._node import Node, NodeContext
from ._process import ProcessPool, TaskFuture
from ._thread_pool import ThreadPool
from ._token import CancellationToken
from ._version import __version__

__all__ = ("EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PROBLEM", "EXIT_USAGE", "add_parser", "run")

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: How long the nodes of the full request and of the quick (superseding) one work.
FULL_WORK: Mapping[str, float] = {"io_seconds": 0.5, "cpu_seconds": 8.0, "render_seconds": 1.8}
QUICK_WORK: Mapping[str, float] = {"io_seconds": 0.1, "cpu_seconds": 0.3, "render_seconds": 0.2}
#: Without --cancel-after the cancel comes this long after the CPU wave started.
DEFAULT_CANCEL_INTO_CPU_WAVE = 1.0
DEFAULT_GRACE = 2.0
#: The process pool's ladder in the demo: token, then SIGKILL after this many seconds.
PROCESS_GRACE = 0.3
THREAD_GRACE = 0.5
SUPERSEDE_KEY = "report:alice"
_CPU_WAVE = 2
#: ``--dask local``: one worker process (of one thread) per node of the process wave, so
#: that all three run at once, as with the demo's own process pool.
DASK_LOCAL_WORKERS = 3
#: Seconds to wait for a Dask cluster's workers (and for ``--dask local`` to close).
DASK_PATIENCE = 60.0
#: Threads that ``distributed`` starts once per interpreter and never ends (its offload
#: executor): not the demo's to stop, so the final check does not count them.
_DASK_PROCESS_WIDE_THREADS = ("Dask-Offload",)
_DASK_MISSING = (
    "cancelflow demo --dask needs Dask distributed, which is not installed: "
    "pip install 'cancelflow[dask]'"
)


@dataclass(frozen=True)
class _Wave:
    name: str
    where: str


_WAVES = (
    _Wave("fetch", "event loop"),
    _Wave("parse", "threads"),
    _Wave("crunch", "processes"),
    _Wave("publish", "event loop"),
)

_ROLES = {
    "score_orders": "checks its token",
    "simulate_risk": "never checks its token",
    "render_chart": "starts a helper process",
}

_CLEANUP_HANDLERS = ("close the API session", "remove the scratch directory")


def _pipeline() -> list[Node]:
    """The demo's nodes; the executor derives the four waves from the dependencies."""
    m = demo_nodes
    return [
        Node("fetch_orders", m.fetch_orders),
        Node("fetch_prices", m.fetch_prices),
        Node("parse_orders", m.parse_orders, deps=["fetch_orders"], run_in="thread"),
        Node("parse_prices", m.parse_prices, deps=["fetch_prices"], run_in="thread"),
        Node("score_orders", m.score_orders, deps=["parse_orders"], run_in="process"),
        Node("simulate_risk", m.simulate_risk, deps=["parse_prices"], run_in="process"),
        Node(
            "render_chart",
            m.render_chart,
            deps=["parse_orders", "parse_prices"],
            run_in="process",
        ),
        Node(
            "publish_report",
            m.publish_report,
            deps=["score_orders", "simulate_risk", "render_chart"],
        ),
    ]


def _waves_of(nodes: list[Node]) -> dict[str, int]:
    """Each node's wave: 0 without dependencies, else one after its latest dependency."""
    wave: dict[str, int] = {}
    for node in nodes:  # listed after their dependencies
        wave[node.id] = 1 + max((wave[dep] for dep in node.deps), default=-1)
    return wave


_NODE_WAVE = _waves_of(_pipeline())


# == command line ===============================================================================
_EPILOG = """\
what it shows:
  wave 1  event loop  fetch_orders, fetch_prices     simulated I/O
  wave 2  threads     parse_orders, parse_prices     blocking work, checks its token
  wave 3  processes   score_orders                   CPU work, checks its token
                      simulate_risk                  pure-Python loop, never checks it
                      render_chart                   starts a helper process of its own
  wave 4  event loop  publish_report

  Then it cancels, and reports the reason, the wave that was running, each node's fate
  (finished / cancelled / killed / not started), the partial results kept (also those a
  killed process node stored), the cleanup handlers that ran (exactly once), the latency
  it measured, and checks that no process or thread it started is left.

--dask ADDRESS runs the same pipeline on a Dask distributed cluster (--dask local starts
one on 127.0.0.1 and closes it at the end): process nodes run in a child process of a
worker and are hard-cancelled there; loop and thread nodes are cooperative only.

Ctrl-C cancels the pipeline in its --mode; a second Ctrl-C interrupts a cancel that is
still running (a third one quits at once, skipping the final check).

exit codes:
  0    the story ran to its end (cancelled, superseded, or completed) and nothing is left
  1    something it started is still running, or something went wrong (see "problems")
  2    bad command line, or --dask without distributed (pip install 'cancelflow[dask]')
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


# == displays ===================================================================================
class _Display:
    """Live progress: one line per event, progress at each quarter (plain text)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._labels: dict[str, str] = {}
        self._quarters: dict[str, int] = {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def _write(self, text: str) -> None:
        with self._lock:
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except BrokenPipeError:  # e.g. piped into head: the demo goes on, silently
                _silence(self.stream)

    def note(self, text: str) -> None:
        """An event line (cancel, wave started, cleanup ran...)."""
        self._write(f"{time.perf_counter() - self.t0:6.2f}s  {text}")

    def add_node(self, key: str, label: str) -> None:
        self._labels[key] = label
        self._quarters[key] = 0

    def progress(self, key: str, done: float) -> None:
        quarter = int(min(done, 0.99) * 4)
        if quarter > self._quarters.get(key, 0):
            self._quarters[key] = quarter
            self.note(f"  {self._labels[key]}  {quarter * 25}%")

    def status(self, key: str, status: str, detail: str = "") -> None:
        self.note(f"  {self._labels[key]}  {status}" + (f" ({detail})" if detail else ""))

    def block(self, text: str) -> None:
        """The final summary."""
        self._write(text)


class _RichDisplay(_Display):
    """Live progress bars drawn with ``rich`` (only when it is importable and on a terminal)."""

    _STYLES: Mapping[str, str] = {
        "waiting": "dim",
        "running": "cyan",
        "finished": "green",
        "cancelled": "yellow",
        "killed": "bold red",
        "terminated": "red",
        "failed": "bold red",
        "crashed": "bold red",
        "abandoned": "red",
        "timed_out": "red",
        "not started": "dim",
    }

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        from rich.console import Console  # type: ignore[import-not-found,unused-ignore]
        from rich.progress import (  # type: ignore[import-not-found,unused-ignore]
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
        )

        self.console: Any = Console(file=stream, highlight=False)
        self.bars: Any = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=28),
            TaskProgressColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            refresh_per_second=10,
        )
        self._tasks: dict[str, Any] = {}

    def start(self) -> None:
        self.bars.start()

    def stop(self) -> None:
        self.bars.stop()

    def note(self, text: str) -> None:
        stamp = f"{time.perf_counter() - self.t0:6.2f}s  "
        self.console.print(stamp + text, markup=False, highlight=False, soft_wrap=True)

    def add_node(self, key: str, label: str) -> None:
        super().add_node(key, label)
        self._tasks[key] = self.bars.add_task(label, total=1.0, status="[dim]waiting[/]")

    def progress(self, key: str, done: float) -> None:
        self.bars.update(self._tasks[key], completed=min(done, 1.0))

    def status(self, key: str, status: str, detail: str = "") -> None:
        style = self._STYLES.get(status, "")
        text = f"[{style}]{status}[/]" if style else status
        if detail:
            text += f" [dim]{_escape(detail)}[/]"
        update: dict[str, Any] = {"status": text}
        if status == "finished":
            update["completed"] = 1.0
        self.bars.update(self._tasks[key], **update)

    def block(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


def _silence(stream: TextIO) -> None:
    """Point ``stream`` at /dev/null so that writing (and flushing at exit) stops failing."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def _make_display(stream: TextIO, plain: bool) -> _Display:
    if not plain and stream.isatty() and os.environ.get("TERM") != "dumb":
        try:
            return _RichDisplay(stream)
        except ImportError:  # rich is optional: pip install 'cancelflow[demo]'
            pass
    return _Display(stream)


# == the process pool, with each node's TaskFuture kept ===========================================
class _DemoProcessPool(ProcessPool):
    """A :class:`ProcessPool` that remembers the :class:`TaskFuture` of each pipeline node.

    The executor reports a stopped node as ``node_cancelled``; the future's ``fate`` tells
    a node that stopped at its token (``cancelled``) from one whose worker was killed.
    """

    def __init__(self) -> None:
        super().__init__(
            3, grace_period=PROCESS_GRACE, term_grace_period=0.0, name="demo-processes"
        )
        self.futures: dict[tuple[str, str], TaskFuture] = {}

    def submit_task(
        self,
        fn: Any,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        token: CancellationToken | None = None,
        timeout: float | None = None,
        grace_period: float | None = None,
        term_grace_period: float | None = None,
        partial_sink: Any = None,
    ) -> TaskFuture:
        args = tuple(args)
        future = super().submit_task(
            fn,
            args,
            kwargs,
            token=token,
            timeout=timeout,
            grace_period=grace_period,
            term_grace_period=term_grace_period,
            partial_sink=partial_sink,
        )
        if args and isinstance(args[0], NodeContext):
            self.futures[(args[0].pipeline_id, args[0].node_id)] = future
        return future


# == what happened, as it happened ==============================================================
@dataclass
class _NodeRecord:
    id: str
    wave: int
    run_in: str
    started: float | None = None
    ended: float | None = None
    event: str | None = None  # node_finished / node_cancelled / node_failed
    error: str | None = None
    fate: str = "not started"
    detail: str = ""
    worker_pid: int | None = None
    worker_alive: bool | None = None
    helper_pid: int | None = None
    helper_alive: bool | None = None


@dataclass
class _DaskTarget:
    """Where ``--dask`` runs the pipeline."""

    address: str
    local: bool  # a LocalCluster the demo started: its processes are the demo's children
    workers: int | None = None  # how many workers to wait for (None: at least one)


@dataclass
class _RunRecord:
    request: int
    pipeline_id: str
    work: Mapping[str, float]
    scratch: str
    nodes: dict[str, _NodeRecord] = field(default_factory=dict)
    launched: float = 0.0
    started: float | None = None
    ended: float | None = None
    waves_seen: set[int] = field(default_factory=set)
    result: PipelineResult | None = None
    interrupted_by_user: bool = False
    never_started: bool = False
    partials: dict[str, Any] | None = None
    finished: dict[str, Any] | None = None
    cleanup_runs: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(_CLEANUP_HANDLERS, 0)
    )
    error: str | None = None
    extra_context: dict[str, Any] = field(default_factory=dict)

    @property
    def context(self) -> dict[str, Any]:
        return {**self.work, "scratch": self.scratch, **self.extra_context}

    def label(self, node_id: str) -> str:
        record = self.nodes[node_id]
        prefix = f"#{self.request} " if self.request > 1 else ""
        return f"{prefix}w{record.wave + 1} {node_id:<14} {record.run_in:<7}"


class _Demo:
    """One run of the demo: the executor, its events, the cancel triggers, the records."""

    def __init__(
        self,
        args: argparse.Namespace,
        display: _Display,
        threads: ThreadPool | None,
        processes: _DemoProcessPool | None,
        seen: dict[int, psutil.Process],
        seen_threads: set[threading.Thread],
        threads_before: set[threading.Thread],
        dask: _DaskTarget | None = None,
    ) -> None:
        self.args = args
        self.mode: str = args.mode
        self.display = display
        self.threads = threads
        self.processes = processes
        self.dask = dask
        #: whether the pids the nodes report are on this machine (and ours to check)
        self.local_pids = dask is None or dask.local
        #: what the runs left on the Dask workers, by worker address (nothing, expected)
        self.dask_left: dict[str, Any] = {}
        self.seen = seen
        self.seen_threads = seen_threads
        self.threads_before = threads_before
        self.runs: list[_RunRecord] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.stage = 0  # 0 running, 1 cancel requested, 2 interrupt requested
        self.trigger: str | None = None  # "timer", "ctrl-c", "supersede"
        self.reason: str | None = None
        self.t_cancel: float | None = None
        self.t_interrupt: float | None = None
        self.timer: threading.Timer | None = None
        self.timer_late = False
        self.closing = False

    # -- the story ---------------------------------------------------------------------------
    async def main(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.dask is None:
            await self._main(self.threads, self.processes)
            return
        from ._backends._dask import DaskRunner
        from ._backends._dask_worker import worker_census

        dask = self.dask
        # A process node that ignores its token: SIGKILL of its child's tree on the worker
        # after PROCESS_GRACE, as with the demo's own process pool.
        async with DaskRunner(
            dask.address, grace_period=PROCESS_GRACE, term_grace_period=0.0
        ) as runner:
            client = runner.client
            await asyncio.wait_for(client.wait_for_workers(dask.workers or 1), DASK_PATIENCE)
            # Wait until every worker's warm pool of children is ready (the census waits).
            await asyncio.wait_for(client.run(worker_census), DASK_PATIENCE)
            info = await client.scheduler.identity()
            workers = info.get("workers", {})
            threads = sum(int(w.get("nthreads", 0)) for w in workers.values())
            self.display.note(
                f"Dask cluster {dask.address}"
                + (" (LocalCluster started by the demo)" if dask.local else "")
                + f": {len(workers)} workers, {threads} threads; process nodes run in a "
                f"child of a worker (ladder: token, then SIGKILL of its tree after "
                f"{PROCESS_GRACE:g} s), loop and thread nodes are cooperative"
            )
            self._note_started(psutil.Process())
            await self._main(runner.with_run_in("thread"), runner)
            # Nothing of the runs may be left on the workers: no task, no run, no process
            # besides each worker's idle pool.
            census = await asyncio.wait_for(client.run(worker_census), DASK_PATIENCE)
            for worker, held in census.items():
                left = {key: held[key] for key in ("tasks", "runs", "extra_processes")}
                if any(left.values()):
                    self.dask_left[worker] = left

    async def _main(self, thread_pool: Any, process_pool: Any) -> None:
        self.executor = PipelineExecutor(
            thread_pool=thread_pool,
            process_pool=process_pool,
            mode="interrupt" if self.mode == "interrupt" else "graceful",
            graceful_timeout=self.args.grace,
        )
        self.executor.events.subscribe("*", self._on_event)
        handles_sigint = _add_sigint_handler(self.loop, self._on_sigint)
        poller = self.loop.create_task(self._poll())
        try:
            async with self.executor:
                self._launch(1, FULL_WORK)
                while pending := [task for task in self.tasks if not task.done()]:
                    await asyncio.wait(pending)
                self.closing = True
                self._inspect_processes()
        finally:
            self.closing = True
            if self.timer is not None:
                self.timer.cancel()
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            if handles_sigint:
                self.loop.remove_signal_handler(signal.SIGINT)

    def _launch(self, request: int, work: Mapping[str, float]) -> _RunRecord:
        run = _RunRecord(
            request,
            f"report-{request}",
            work,
            tempfile.mkdtemp(prefix=f"cancelflow-demo-{request}-"),
            launched=time.perf_counter(),
        )
        if self.dask is not None:
            # On Dask the process nodes report their child's pid (the demo's own pool
            # knows its workers' pids; a Dask worker's children are not the client's).
            run.extra_context["report_pid"] = True
        for node in _pipeline():
            run.nodes[node.id] = _NodeRecord(node.id, _NODE_WAVE[node.id], node.run_in)
        self.runs.append(run)
        for node_id in run.nodes:
            self.display.add_node(f"{run.pipeline_id}/{node_id}", run.label(node_id))
        self.tasks.append(self.loop.create_task(self._request(run)))
        return run

    async def _request(self, run: _RunRecord) -> None:
        try:
            if self.args.supersede:
                run.result = await self.executor.run_superseding(
                    SUPERSEDE_KEY,
                    _pipeline(),
                    run.context,
                    pipeline_id=run.pipeline_id,
                    reason=f"superseded by a newer request ({run.pipeline_id})",
                )
            else:
                run.result = await self.executor.run_pipeline(
                    run.pipeline_id, _pipeline(), run.context
                )
        except asyncio.CancelledError:
            # Our own task.cancel() (a second Ctrl-C): the executor interrupted the run and
            # waited for every node to stop and the cleanup to run before this propagated.
            if run.started is None:
                run.never_started = True
            else:
                run.interrupted_by_user = True
        except Exception as exc:  # noqa: BLE001 - reported in the summary, exit code 1
            run.error = f"{type(exc).__name__}: {exc}"
        finally:
            run.ended = time.perf_counter()
            self._confirm_fates(run)
            self._mark_not_started(run)
            if run.result is not None and run.result.completed:
                self.display.note(f"{run.pipeline_id} completed")

    def _confirm_fates(self, run: _RunRecord) -> None:
        """Take each node's fate from the executor's ``PipelineResult.node_fates``."""
        if run.result is None:  # interrupted by a second Ctrl-C: no result to read
            return
        for node_id, fate in run.result.node_fates.items():
            node = run.nodes.get(node_id)
            if node is not None and node.fate != fate:
                node.fate, node.detail = (
                    fate,
                    _detail(node.run_in, fate, self.dask is not None, not self.local_pids),
                )
                self.display.status(f"{run.pipeline_id}/{node_id}", fate, node.detail)

    def _mark_not_started(self, run: _RunRecord) -> None:
        for record in run.nodes.values():
            if record.started is None:
                self.display.status(f"{run.pipeline_id}/{record.id}", "not started")

    # -- cancel triggers ---------------------------------------------------------------------
    def _start_timer(self, delay: float) -> None:
        if self.timer is not None or self.stage or self.closing:
            return
        self.timer = threading.Timer(delay, self._on_timer)
        self.timer.name = "cancelflow-demo-timer"
        self.timer.daemon = True
        self.timer.start()

    def _on_timer(self) -> None:
        """The --cancel-after timer fired (timer thread)."""
        if self.args.supersede:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._supersede)
            return
        now = time.perf_counter()
        reason = "cancelled from another thread (the demo's --cancel-after timer)"
        # The point of the demo: a cancel from a thread that is not the event loop's.
        won = self.executor.registry.cancel_threadsafe(self.runs[0].pipeline_id, reason)
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._cancelled, "timer", reason, now, won)

    def _cancelled(self, trigger: str, reason: str, when: float, won: bool) -> None:
        if not won:
            if self.stage == 0:
                self.timer_late = True
                self.display.note(
                    "the timer fired after the pipeline had completed: nothing to cancel"
                )
            return
        self._record_cancel(trigger, reason, when)
        self.display.note(f"CANCEL ({trigger}): {reason}")
        self._explain_mode()

    def _record_cancel(self, trigger: str, reason: str, when: float) -> None:
        if self.stage == 0:
            self.stage = 1
            self.trigger, self.reason, self.t_cancel = trigger, reason, when

    def _explain_mode(self) -> None:
        if self.mode == "graceful":
            self.display.note(
                f"  graceful: no new wave starts; the running wave may finish within "
                f"{self.args.grace:g} s, then it is interrupted"
            )
        else:
            self.display.note(
                "  interrupt: running nodes are told now; a process node that ignores its "
                f"token is killed after {PROCESS_GRACE:g} s, with its process tree"
            )

    def _supersede(self) -> None:
        """A newer request for the same key arrives (loop thread)."""
        if self.stage or self.closing:
            return
        reason = "superseded by a newer request (report-2)"
        self._record_cancel("supersede", reason, time.perf_counter())
        self.display.note(
            f"NEWER REQUEST report-2 for key {SUPERSEDE_KEY!r}: it supersedes report-1"
        )
        self._explain_mode()
        self._launch(2, QUICK_WORK)

    def _on_sigint(self) -> None:
        """Ctrl-C (on the loop thread): cancel; again: interrupt; a third time: quit."""
        if self.stage == 0:
            if self.timer is not None:
                self.timer.cancel()
            reason = "cancelled by the user (Ctrl-C)"
            now = time.perf_counter()
            won = False
            for pipeline_id in self.executor.registry.active_pipelines():
                won = self.executor.registry.cancel_threadsafe(pipeline_id, reason) or won
            if not won and self.runs and self.runs[0].started is None:
                # Not registered yet: stop the request before it starts.
                for task in self.tasks:
                    task.cancel()
            self._record_cancel("ctrl-c", reason, now)
            self.display.note(f"CANCEL (Ctrl-C): {reason}; press Ctrl-C again to interrupt now")
            self._explain_mode()
        elif self.stage == 1:
            self.stage = 2
            self.t_interrupt = time.perf_counter()
            self.display.note(
                "Ctrl-C again: interrupting now (nodes are told to stop; a process node "
                "that ignores its token is killed)"
            )
            interrupted = False
            for pipeline_id in self.executor.registry.active_pipelines():
                # The executor interrupts the run and still returns its PipelineResult,
                # so partial results, fates and cleanup stay visible.
                if self.executor.interrupt(pipeline_id, "interrupted by the user (Ctrl-C twice)"):
                    interrupted = True
                    record = self._run_of(pipeline_id)
                    if record is not None:
                        record.interrupted_by_user = True
            if not interrupted:
                for task in self.tasks:
                    task.cancel()
        else:
            self.display.note("Ctrl-C a third time: quitting at once, without the final check")
            self.display.stop()
            sys.stdout.flush()
            os._exit(EXIT_INTERRUPTED)

    # -- events ------------------------------------------------------------------------------
    def _run_of(self, pipeline_id: str) -> _RunRecord | None:
        for run in self.runs:
            if run.pipeline_id == pipeline_id:
                return run
        return None

    def _on_event(self, event: PipelineEvent) -> None:
        run = self._run_of(event.pipeline_id)
        if run is None:
            return
        now = time.perf_counter()
        name = event.name
        if name == "pipeline_started":
            run.started = now
            self._register_cleanup(run)
            if run.request == 1 and self.args.cancel_after is not None:
                self._start_timer(self.args.cancel_after)
            return
        node = run.nodes.get(event.node_id or "")
        if name == "node_started" and node is not None:
            node.started = now
            if node.wave not in run.waves_seen:
                run.waves_seen.add(node.wave)
                wave = _WAVES[node.wave]
                members = ", ".join(n.id for n in run.nodes.values() if n.wave == node.wave)
                self.display.note(
                    f"{run.pipeline_id}: wave {node.wave + 1}/{len(_WAVES)} '{wave.name}' "
                    f"started on {wave.where}: {members}"
                )
                if node.wave == _CPU_WAVE and run.request == 1 and self.args.cancel_after is None:
                    self._start_timer(DEFAULT_CANCEL_INTO_CPU_WAVE)
            self.display.status(f"{run.pipeline_id}/{node.id}", "running", _ROLES.get(node.id, ""))
        elif name in ("node_finished", "node_cancelled", "node_failed") and node is not None:
            node.ended = now
            node.event = name
            if name == "node_failed":
                node.error = repr(event.data.get("error"))
            node.fate, node.detail = self._fate(run, node)
            self.display.status(f"{run.pipeline_id}/{node.id}", node.fate, node.detail)
        elif name == "execution_cancelled":
            # Still registered: keep a copy of what a second Ctrl-C would not hand back.
            with contextlib.suppress(KeyError):
                run.partials = self.executor.registry.get_partial_results(run.pipeline_id)
        elif name == "pipeline_finished":
            run.finished = dict(event.data)

    def _fate(self, run: _RunRecord, node: _NodeRecord) -> tuple[str, str]:
        """The node's fate as soon as it ended (the run's ``node_fates`` confirm it later)."""
        if node.event == "node_finished":
            return "finished", ""
        if node.event == "node_failed":
            return "failed", node.error or ""
        fate = "cancelled"
        if node.run_in == "process" and self.processes is not None:
            future = self.processes.futures.get((run.pipeline_id, node.id))
            if future is not None:
                node.worker_pid = future.pid
                fate = future.fate
        return fate, _detail(node.run_in, fate, self.dask is not None, not self.local_pids)

    def _register_cleanup(self, run: _RunRecord) -> None:
        registry = self.executor.registry
        display = self.display

        async def close_session() -> None:
            # Async handlers run on the event loop.
            run.cleanup_runs["close the API session"] += 1
            await asyncio.sleep(0)  # e.g. await session.close()
            display.note(f"{run.pipeline_id}: cleanup: closed the API session")

        def remove_scratch() -> None:
            # Sync handlers run in a short-lived thread of their own.
            run.cleanup_runs["remove the scratch directory"] += 1
            shutil.rmtree(run.scratch, ignore_errors=True)
            display.note(f"{run.pipeline_id}: cleanup: removed {run.scratch}")

        # Run in reverse order of registration: the session is closed last.
        registry.register_cleanup_handler(run.pipeline_id, close_session)
        registry.register_cleanup_handler(run.pipeline_id, remove_scratch)

    async def _poll(self) -> None:
        """Progress bars from the nodes' ``so_far`` partial results; note new processes."""
        registry = self.executor.registry
        me = psutil.Process()
        tick = 0
        while True:
            for pipeline_id in registry.active_pipelines():
                with contextlib.suppress(KeyError):
                    partials = registry.get_partial_results(pipeline_id)
                    for key, value in partials.items():
                        node_id, _, name = key.partition(".")
                        if name == "so_far" and isinstance(value, dict):
                            self.display.progress(f"{pipeline_id}/{node_id}", float(value["done"]))
                        elif (
                            name in ("helper_pid", "pid")
                            and isinstance(value, int)
                            and self.local_pids
                        ):
                            _remember(self.seen, value)
            if tick % 5 == 0:
                self._note_started(me)
            tick += 1
            await asyncio.sleep(0.1)

    def _note_started(self, me: psutil.Process) -> None:
        """Remember every process and thread that exists now and did not before."""
        with contextlib.suppress(psutil.Error):
            for child in me.children(recursive=True):
                self.seen.setdefault(child.pid, child)
        self.seen_threads.update(t for t in threading.enumerate() if t not in self.threads_before)

    def _inspect_processes(self) -> None:
        """Right after the runs: are the workers and helpers of stopped nodes gone?"""
        self._note_started(psutil.Process())
        if not self.local_pids:  # a remote cluster's pids cannot be checked from here
            return
        for run in self.runs:
            partials = self._partials(run)
            for node in run.nodes.values():
                if node.run_in != "process" or node.started is None:
                    continue
                if node.worker_pid is None and self.processes is not None:
                    future = self.processes.futures.get((run.pipeline_id, node.id))
                    node.worker_pid = future.pid if future is not None else None
                elif node.worker_pid is None:
                    pid = partials.get(f"{node.id}.pid")
                    node.worker_pid = pid if isinstance(pid, int) else None
                if node.worker_pid is not None:
                    node.worker_alive = _alive(node.worker_pid)
                helper = partials.get(f"{node.id}.helper_pid")
                if isinstance(helper, int):
                    node.helper_pid = helper
                    node.helper_alive = _alive(helper)
                if self.dask is not None:
                    self._refine_dask_fate(run, node)

    def _refine_dask_fate(self, run: _RunRecord, node: _NodeRecord) -> None:
        """On a local Dask cluster: tell a process node stopped at its token from a killed one.

        A child of a worker's warm pool outlives a node that stopped at its token (it runs
        the next one); the child of a node that ignored it is killed with its tree and
        replaced. So a stopped node whose child is gone was killed.
        """
        if node.fate != "cancelled" or node.worker_pid is None or node.worker_alive:
            return
        node.fate, node.detail = "killed", _detail(node.run_in, "killed", True)
        self.display.status(f"{run.pipeline_id}/{node.id}", node.fate, node.detail)

    def _partials(self, run: _RunRecord) -> dict[str, Any]:
        if run.result is not None:
            return dict(run.result.results)
        return dict(run.partials or {})


def _detail(run_in: str, fate: str, on_dask: bool = False, remote: bool = False) -> str:
    """What a fate means, for the node's place (``remote``: a cluster the demo cannot see)."""
    if fate == "cancelled" and run_in == "process" and remote:
        return "stopped on its worker: at its token, or its child's tree killed after the grace"
    if fate == "cancelled":
        if run_in == "loop":
            return "asyncio.CancelledError at its next await"
        return "stopped at its token"
    if on_dask and fate == "killed":
        return "ignored its token: its child's process tree SIGKILLed, the Dask worker goes on"
    return {
        "killed": "ignored its token: SIGKILL, with its process tree",
        "terminated": "SIGTERM became an exception; its finally blocks ran",
        "crashed": "its worker died by itself",
        "abandoned": "ignored its token: abandoned after the grace period, still running",
        "timed_out": "ran past its own timeout",
    }.get(fate, "")


def _add_sigint_handler(loop: asyncio.AbstractEventLoop, handler: Any) -> bool:
    try:
        loop.add_signal_handler(signal.SIGINT, handler)
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
        return False
    return True


def _remember(seen: dict[int, psutil.Process], pid: int) -> None:
    if pid not in seen:
        with contextlib.suppress(psutil.Error):
            seen[pid] = psutil.Process(pid)


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting to be reaped does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# == the final check ============================================================================
def _leftovers(
    seen: Mapping[int, psutil.Process],
    seen_threads: set[threading.Thread],
    threads_before: set[threading.Thread],
    patience: float = 5.0,
    ignore_threads: tuple[str, ...] = (),
    ignore_pids: frozenset[int] = frozenset(),
) -> tuple[list[dict[str, Any]], list[str], int, int]:
    """What the demo started and is still there, after waiting at most ``patience`` s.

    Returns the processes and threads left, and how many of each were checked. Threads
    whose name starts with one of ``ignore_threads``, and the processes ``ignore_pids``
    (children that existed before the demo started), are not the demo's: not counted.
    """
    me = psutil.Process()
    seen = dict(seen)
    with contextlib.suppress(psutil.Error):
        for child in me.children(recursive=True):
            if child.pid not in ignore_pids:
                seen.setdefault(child.pid, child)
    deadline = time.monotonic() + patience

    def running_procs() -> list[psutil.Process]:
        out = []
        for proc in seen.values():
            try:
                if proc.is_running() and (
                    proc.status() != psutil.STATUS_ZOMBIE or proc.ppid() == me.pid
                ):
                    out.append(proc)
            except psutil.Error:
                continue
        return out

    def ours(thread: threading.Thread) -> bool:
        return thread not in threads_before and not thread.name.startswith(ignore_threads)

    def new_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if ours(t) and t.is_alive()]

    started_threads = {t for t in seen_threads if ours(t)} | {
        t for t in threading.enumerate() if ours(t)
    }
    while True:
        procs, threads = running_procs(), new_threads()
        remaining = deadline - time.monotonic()
        if (not procs and not threads) or remaining <= 0:
            break
        if procs:
            psutil.wait_procs(procs, timeout=min(remaining, 0.5))
        for thread in threads:
            thread.join(timeout=max(0.0, min(deadline - time.monotonic(), 0.5)))
    left_procs = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            left_procs.append({"pid": proc.pid, "cmdline": " ".join(proc.cmdline())[:120]})
    return left_procs, [t.name for t in threads], len(seen), len(started_threads)


# == the summary ================================================================================
def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def _run_summary(demo: _Demo, run: _RunRecord) -> dict[str, Any]:
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
        if node.id in _ROLES:
            entry["role"] = _ROLES[node.id]
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


def _short(value: Any, width: int = 72) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _wave_text(num: int | None) -> str:
    if num is None:
        return "-"
    if num >= len(_WAVES):
        return "none (every wave completed)"
    wave = _WAVES[num]
    return f"wave {num + 1}/{len(_WAVES)} '{wave.name}' ({wave.where})"


def _render(summary: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
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
            if "stopped_ms_after_interrupt" in node and node["fate"] != "finished":
                parts.append(f"{node['stopped_ms_after_interrupt']:.0f} ms after the second Ctrl-C")
            elif "stopped_ms_after_cancel" in node and node["fate"] != "finished":
                parts.append(f"{node['stopped_ms_after_cancel']:.0f} ms after the cancel")
            if "worker_pid" in node and node["fate"] in ("killed", "terminated"):
                gone = "gone" if not node["worker_alive_after_run"] else "STILL RUNNING"
                parts.append(f"worker {node['worker_pid']} {gone}")
            if "helper_pid" in node:
                gone = "gone" if not node["helper_alive_after_run"] else "STILL RUNNING"
                parts.append(f"helper process {node['helper_pid']} {gone}")
            add(
                f"  {node['wave'] + 1}/{len(_WAVES)} {node_id:<15}{node['run_in']:<8}"
                f"{node['fate']:<12}{'; '.join(parts)}".rstrip()
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
                node_id = key.partition(".")[0]
                fate = run["nodes"].get(node_id, {}).get("fate")
                note = ""
                if "." in key and fate in ("killed", "terminated"):
                    note = "   <- stored by a process that was then killed"
                elif "." in key and fate == "cancelled":
                    note = "   <- stored before it was cancelled"
                add(f"  {key:<27} {_short(value, 60)}{note}")
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
        for key, label in labels.items():
            if latency.get(key) is not None:
                add(f"  {label:<46} {latency[key]:8.1f} ms")
        if mode == "graceful" and not summary["interrupted_by_user"]:
            add(f"  (graceful: includes up to {summary['grace_s']:g} s left to the running wave)")
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


def _summarize(
    args: argparse.Namespace,
    demo: _Demo,
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


# == entry point ================================================================================
def run(args: argparse.Namespace) -> int:
    """Run the demo for the parsed ``args``; return the exit code (see the module docstring)."""
    if getattr(args, "dask", None) is not None:
        if not args.dask.strip():
            print("cancelflow demo: --dask needs a scheduler address or 'local'", file=sys.stderr)
            return EXIT_USAGE
        if importlib.util.find_spec("distributed") is None:
            print(_DASK_MISSING, file=sys.stderr)
            return EXIT_USAGE
    out: TextIO = sys.stderr if args.json else sys.stdout
    display = _make_display(out, args.plain)
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
    if args.dask is not None and args.dask.strip().lower() == "local":
        # multiprocessing's resource tracker (which the LocalCluster's process start needs)
        # lives as long as this interpreter: started now, it is not counted as the demo's.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    threads_before = set(threading.enumerate())
    seen: dict[int, psutil.Process] = {}
    seen_threads: set[threading.Thread] = set()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    demo: _Demo | None = None
    threads: ThreadPool | None = None
    processes: _DemoProcessPool | None = None
    cluster: Any = None
    dask_target: _DaskTarget | None = None
    quieted = _quiet_dask(args.log_level) if args.dask is not None else []

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
            processes = _DemoProcessPool()
            processes.wait_ready(30)
            note_children()
            display.note(
                f"process pool ready: {len(processes.statistics().worker_pids)} workers "
                f"(ladder: token, then SIGKILL after {PROCESS_GRACE:g} s)"
            )
        elif args.dask.strip().lower() == "local":
            display.note(
                f"starting a Dask LocalCluster on 127.0.0.1: {DASK_LOCAL_WORKERS} worker "
                "processes, 1 thread each"
            )
            cluster = _start_local_cluster()
            note_children()
            dask_target = _DaskTarget(cluster.scheduler_address, True, DASK_LOCAL_WORKERS)
        else:
            dask_target = _DaskTarget(args.dask.strip(), False)
        display.start()
        seen_threads.update(t for t in threading.enumerate() if t not in threads_before)
        demo = _Demo(
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
                _close_cluster(cluster)
                cluster = None
            _restore_loggers(quieted)
            logger.enable("cancelflow")
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
            _close_cluster(cluster)
        if sink_id is not None:
            logger.remove(sink_id)
        logger.enable("cancelflow")
    for pid in before:
        seen.pop(pid, None)
    left = _leftovers(
        seen,
        seen_threads,
        threads_before,
        patience=10.0 if cluster is not None else 5.0,
        ignore_threads=_DASK_PROCESS_WIDE_THREADS if args.dask is not None else (),
        ignore_pids=frozenset(before),
    )
    _restore_loggers(quieted)
    if demo is None or not demo.runs or (threads is None and dask_target is None):
        clean = not left[0] and not left[1]
        display.block(
            "interrupted before the pipeline started; "
            + ("final check: no process left, no thread left" if clean else f"LEFT: {left[:2]}")
        )
        return EXIT_INTERRUPTED if clean else EXIT_PROBLEM
    summary = _summarize(args, demo, threads.statistics() if threads is not None else None, left)
    for record in demo.runs:  # a completed run's handlers did not run: tidy up here
        shutil.rmtree(record.scratch, ignore_errors=True)
    if args.json:
        try:
            print(json.dumps(summary, indent=2), flush=True)
        except BrokenPipeError:
            _silence(sys.stdout)
    else:
        display.block(_render(summary))
    code: int = summary["exit_code"]
    return code


# == --dask =====================================================================================
def _start_local_cluster() -> Any:
    """A ``LocalCluster`` of worker processes bound to 127.0.0.1 only (dashboard included)."""
    import dask
    import distributed

    # Ctrl-C in a terminal signals the whole foreground process group. The cluster's
    # processes must not die of it (the demo cancels instead): started while SIGINT is
    # ignored, they inherit that (Python keeps an ignored SIGINT ignored at start-up).
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    # cancelflow's INFO records from the workers would interleave with the demo's lines:
    # the processes started now inherit this (loguru reads it when first imported).
    level = os.environ.get("LOGURU_LEVEL")
    os.environ["LOGURU_LEVEL"] = "WARNING"
    try:
        with dask.config.set({"distributed.worker.profile.enabled": False}):
            return _local_cluster(distributed)
    finally:
        if level is None:
            os.environ.pop("LOGURU_LEVEL", None)
        else:
            os.environ["LOGURU_LEVEL"] = level
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _local_cluster(distributed: Any) -> Any:
    return distributed.LocalCluster(  # type: ignore[no-untyped-call,unused-ignore]
        processes=True,
        n_workers=DASK_LOCAL_WORKERS,
        threads_per_worker=1,
        host="127.0.0.1",
        # None would still serve HTTP, on 0.0.0.0:8787: a free port on 127.0.0.1.
        dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0",
    )


def _close_cluster(cluster: Any) -> None:
    with contextlib.suppress(Exception):
        cluster.close(timeout=DASK_PATIENCE)


def _quiet_dask(level: str | None) -> list[tuple[logging.Logger, int]]:
    """Dask's own INFO records (cluster start and stop) would drown the demo's lines."""
    import distributed  # noqa: F401 - it sets its loggers' levels when first imported

    if level == "DEBUG":
        return []
    saved = []
    for name in ("distributed", "bokeh", "tornado"):
        log = logging.getLogger(name)
        saved.append((log, log.level))
        log.setLevel(logging.ERROR)
    return saved


def _restore_loggers(saved: list[tuple[logging.Logger, int]]) -> None:
    for log, level in saved:
        log.setLevel(level)
