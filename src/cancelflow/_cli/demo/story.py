"""The story of one run of the demo (``Demo``): the executor and its events, the cancel
triggers (timer thread, Ctrl-C, a superseding request), the records they fill.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

import psutil

from cancelflow._events import PipelineEvent
from cancelflow._executor import PipelineExecutor
from cancelflow._thread_pool import ThreadPool

from .check import alive, remember
from .display import Display
from .pipeline import CPU_WAVE, NODE_WAVE, ROLES, WAVES, WITH_FINALLY, pipeline_nodes
from .pool import DemoProcessPool
from .records import DaskTarget, NodeRecord, RunRecord
from .settings import (
    DASK_PATIENCE,
    DEFAULT_CANCEL_INTO_CPU_WAVE,
    EXIT_INTERRUPTED,
    FULL_WORK,
    PROCESS_GRACE,
    QUICK_WORK,
    SUPERSEDE_KEY,
    TERM_GRACE,
)


class Demo:
    """One run of the demo: the executor, its events, the cancel triggers, the records."""

    def __init__(
        self,
        args: argparse.Namespace,
        display: Display,
        threads: ThreadPool | None,
        processes: DemoProcessPool | None,
        seen: dict[int, psutil.Process],
        seen_threads: set[threading.Thread],
        threads_before: set[threading.Thread],
        dask: DaskTarget | None = None,
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
        self.runs: list[RunRecord] = []
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
        from cancelflow._backends._dask import DaskRunner

        from .census import worker_census

        dask = self.dask
        # A process node that ignores its token: SIGKILL of its child's tree on the worker
        # after PROCESS_GRACE (no SIGTERM step on Dask: there the demo shows token and
        # SIGKILL only).
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

    def _launch(self, request: int, work: Mapping[str, float]) -> RunRecord:
        run = RunRecord(
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
        for node in pipeline_nodes():
            run.nodes[node.id] = NodeRecord(node.id, NODE_WAVE[node.id], node.run_in)
        self.runs.append(run)
        for node_id in run.nodes:
            self.display.add_node(f"{run.pipeline_id}/{node_id}", run.label(node_id))
        self.tasks.append(self.loop.create_task(self._request(run)))
        return run

    async def _request(self, run: RunRecord) -> None:
        try:
            if self.args.supersede:
                run.result = await self.executor.run_superseding(
                    SUPERSEDE_KEY,
                    pipeline_nodes(),
                    run.context,
                    pipeline_id=run.pipeline_id,
                    reason=f"superseded by a newer request ({run.pipeline_id})",
                )
            else:
                run.result = await self.executor.run_pipeline(
                    run.pipeline_id, pipeline_nodes(), run.context
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

    def _confirm_fates(self, run: RunRecord) -> None:
        """Take each node's fate from the executor's ``PipelineResult.node_fates``."""
        if run.result is None:  # interrupted by a second Ctrl-C: no result to read
            return
        for node_id, fate in run.result.node_fates.items():
            node = run.nodes.get(node_id)
            if node is not None and node.fate != fate:
                on_dask = self.dask is not None
                node.fate, node.detail = (
                    fate,
                    _detail(node.run_in, fate, on_dask, not self.local_pids),
                )
                self.display.status(
                    f"{run.pipeline_id}/{node_id}", fate, _live_detail(fate, node.detail, on_dask)
                )

    def _mark_not_started(self, run: RunRecord) -> None:
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
        elif self.dask is not None:
            self.display.note(
                "  interrupt: running nodes are told now; a process node that ignores its "
                f"token is killed after {PROCESS_GRACE:g} s, with its process tree"
            )
        else:
            self.display.note(
                "  interrupt: running nodes are told now; a process node that ignores its "
                f"token gets SIGTERM after {PROCESS_GRACE:g} s, SIGKILL (with its process "
                f"tree) {TERM_GRACE:g} s later"
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
                "that ignores its token is stopped by the ladder)"
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
    def _run_of(self, pipeline_id: str) -> RunRecord | None:
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
                wave = WAVES[node.wave]
                members = ", ".join(n.id for n in run.nodes.values() if n.wave == node.wave)
                self.display.note(
                    f"{run.pipeline_id}: wave {node.wave + 1}/{len(WAVES)} '{wave.name}' "
                    f"started on {wave.where}: {members}"
                )
                if node.wave == CPU_WAVE and run.request == 1 and self.args.cancel_after is None:
                    self._start_timer(DEFAULT_CANCEL_INTO_CPU_WAVE)
            self.display.status(f"{run.pipeline_id}/{node.id}", "running", ROLES.get(node.id, ""))
        elif name in ("node_finished", "node_cancelled", "node_failed") and node is not None:
            node.ended = now
            node.event = name
            if name == "node_failed":
                node.error = repr(event.data.get("error"))
            node.fate, node.detail = self._fate(run, node)
            on_dask = self.dask is not None
            live = _live_detail(node.fate, node.detail, on_dask)
            self.display.status(f"{run.pipeline_id}/{node.id}", node.fate, live)
            if name == "node_cancelled" and node.id in WITH_FINALLY:
                self._note_finally(run, node)
        elif name == "execution_cancelled":
            # Still registered: keep a copy of what a second Ctrl-C would not hand back.
            with contextlib.suppress(KeyError):
                run.partials = self.executor.registry.get_partial_results(run.pipeline_id)
        elif name == "pipeline_finished":
            run.finished = dict(event.data)

    def _fate(self, run: RunRecord, node: NodeRecord) -> tuple[str, str]:
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

    def _note_finally(self, run: RunRecord, node: NodeRecord) -> None:
        """A stopped node with a ``finally`` block: did the block run? Its partial result
        ``"finally"`` (stored in the block, so before the node's end reached us) says so."""
        with contextlib.suppress(KeyError):
            partials = self.executor.registry.get_partial_results(run.pipeline_id)
            stored = partials.get(f"{node.id}.finally")
            if isinstance(stored, dict):
                what = ", ".join(f"{key}={value}" for key, value in stored.items())
                text = f"finally ran: {what}"
            else:
                text = "its finally never ran"
            self.display.note(f"  {run.label(node.id)}  {text}")

    def _register_cleanup(self, run: RunRecord) -> None:
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
                            remember(self.seen, value)
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
                    node.worker_alive = alive(node.worker_pid)
                helper = partials.get(f"{node.id}.helper_pid")
                if isinstance(helper, int):
                    node.helper_pid = helper
                    node.helper_alive = alive(helper)
                if self.dask is not None:
                    self._refine_dask_fate(run, node)

    def _refine_dask_fate(self, run: RunRecord, node: NodeRecord) -> None:
        """On a local Dask cluster: tell a process node stopped at its token from a killed one.

        A child of a worker's warm pool outlives a node that stopped at its token (it runs
        the next one); the child of a node that ignored it is killed with its tree and
        replaced. So a stopped node whose child is gone was killed.
        """
        if node.fate != "cancelled" or node.worker_pid is None or node.worker_alive:
            return
        node.fate, node.detail = "killed", _detail(node.run_in, "killed", True)
        self.display.status(
            f"{run.pipeline_id}/{node.id}", node.fate, _live_detail("killed", node.detail, True)
        )

    def _partials(self, run: RunRecord) -> dict[str, Any]:
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
        "killed": "SIGTERM did not stop it: SIGKILL, with its process tree",
        "terminated": "SIGTERM became an exception; its finally blocks ran",
        "crashed": "its worker died by itself",
        "abandoned": "ignored its token: abandoned after the grace period, still running",
        "timed_out": "ran past its own timeout",
    }.get(fate, "")


def _live_detail(fate: str, detail: str, on_dask: bool) -> str:
    """The fate's detail on a progress line: short, so that the line fits 80 columns."""
    if on_dask:
        return detail
    return {
        "terminated": "SIGTERM; its finally ran",
        "killed": "SIGKILL, with its process tree",
    }.get(fate, detail)


def _add_sigint_handler(loop: asyncio.AbstractEventLoop, handler: Any) -> bool:
    try:
        loop.add_signal_handler(signal.SIGINT, handler)
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
        return False
    return True
