"""Specification of ProcessPool: stopping running work, reaping trees, healing."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

import workloads
from cancelflow import (
    CancellationToken,
    CancelledException,
    PipelineTimeoutException,
    PoolClosedError,
    ProcessPool,
    TaskFuture,
    WorkerCrashedError,
)
from support import REAPS_ORPHANS, WAIT, Announcements, assert_gone, wait_until


@pytest.fixture
def pool() -> Iterator[ProcessPool]:
    with ProcessPool(2, grace_period=0.05, term_grace_period=0.5) as p:
        assert p.wait_ready(WAIT)
        yield p


class TestProcessPool:
    def test_submit_returns_result(self, pool: ProcessPool) -> None:
        """Test that a submitted task's result comes back through its future."""
        assert pool.submit(workloads.add, 2, 3).result(WAIT) == 5

    def test_result_raises_an_exception_that_is_false_in_a_boolean_context(
        self, pool: ProcessPool
    ) -> None:
        """Test that result() raises a task's exception whose __bool__ is False (the
        stdlib's Future of 3.11 and 3.12 returned None for it)."""
        future = pool.submit(workloads.raise_falsey, "falsey")
        with pytest.raises(workloads.FalseyError, match="falsey"):
            future.result(WAIT)
        assert isinstance(future.exception(WAIT), workloads.FalseyError)
        assert future.fate == "failed"

    def test_map_returns_results_in_order(self, pool: ProcessPool) -> None:
        """Test that map yields results in the order of its inputs."""
        assert list(pool.map(workloads.add, range(10), range(10))) == [2 * i for i in range(10)]

    def test_task_error_is_raised_to_caller(self, pool: ProcessPool) -> None:
        """Test that an exception raised by the task reaches the caller unchanged."""
        future = pool.submit(workloads.raise_value_error, "boom")
        with pytest.raises(ValueError, match="boom"):
            future.result(WAIT)
        assert future.fate == "failed"

    def test_cancel_queued_task_never_runs(self) -> None:
        """Test that cancelling a queued task cancels its future at once and it never runs."""
        seen = Announcements()
        with ProcessPool(1, grace_period=0, term_grace_period=0) as pool:
            blocker = pool.submit_task(workloads.announce_and_spin, partial_sink=seen)
            seen.wait("pid")
            queued = pool.submit(workloads.whoami)
            assert queued.cancel()
            assert queued.cancelled()
            assert queued.fate == "cancelled"
            blocker.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                blocker.result(WAIT)
            assert pool.statistics().completed_total == 0

    def test_cancel_running_cooperative_task(self, pool: ProcessPool) -> None:
        """Test that a task checking its token returns on cancel, with reason and partials."""
        seen = Announcements()
        token = CancellationToken()
        future = pool.submit_task(
            workloads.announce_and_wait_cooperatively, token=token, partial_sink=seen
        )
        worker = seen.wait("pid")
        token.cancel("user pressed stop")
        with pytest.raises(CancelledException) as info:
            future.result(WAIT)
        assert info.value.reason == "user pressed stop"
        assert info.value.partial_results == {"pid": worker}
        assert future.fate == "cancelled"
        assert psutil.pid_exists(worker), "a cooperative stop keeps the worker"

    def test_cancel_running_noncooperative_task_kills_worker(self, pool: ProcessPool) -> None:
        """Test that a task that never checks its token is killed and its worker is gone."""
        seen = Announcements()
        token = CancellationToken()
        future = pool.submit_task(
            workloads.announce_and_spin,
            token=token,
            partial_sink=seen,
            grace_period=0,
            term_grace_period=0,
        )
        worker = seen.wait("pid")
        token.cancel("stop now")
        with pytest.raises(CancelledException):
            future.result(WAIT)
        assert future.fate == "killed"
        assert_gone(worker)

    def test_a_stopped_task_ends_cancelled_whatever_its_exception_carries(
        self, pool: ProcessPool
    ) -> None:
        """Test that a task that stops on its cancel ends cancelled even if the
        CancelledException it raised could not be pickled (the pool makes the caller's)."""
        seen = Announcements()
        token = CancellationToken()
        future = pool.submit_task(
            workloads.wait_cooperatively_then_raise_unpicklable, token=token, partial_sink=seen
        )
        seen.wait("pid")
        token.cancel("user pressed stop")
        with pytest.raises(CancelledException) as info:
            future.result(WAIT)
        assert info.value.reason == "user pressed stop"
        assert future.fate == "cancelled"

    def test_future_cancel_stops_running_task(self, pool: ProcessPool) -> None:
        """Test that TaskFuture.cancel() works on a running task, unlike ProcessPoolExecutor."""
        seen = Announcements()
        future = pool.submit_task(
            workloads.announce_and_spin, partial_sink=seen, grace_period=0, term_grace_period=0
        )
        worker = seen.wait("pid")
        assert future.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(WAIT)
        assert future.cancelled()
        assert_gone(worker)

    def test_sigterm_runs_finally_blocks(self, pool: ProcessPool) -> None:
        """Test that the SIGTERM step turns into an exception so the task's finally runs."""
        seen = Announcements()
        token = CancellationToken()
        future = pool.submit_task(
            workloads.announce_and_finish_in_finally,
            token=token,
            partial_sink=seen,
            grace_period=0,
            term_grace_period=WAIT,
        )
        seen.wait("pid")
        token.cancel("terminate")
        with pytest.raises(CancelledException) as info:
            future.result(WAIT)
        assert future.fate == "terminated"
        assert info.value.partial_results["finally"] == "ran"

    def test_process_tree_is_killed_and_reaped(self, pool: ProcessPool) -> None:
        """Test that a child ignoring SIGTERM and a grandchild in its own session are reaped."""
        seen = Announcements()
        token = CancellationToken()
        future = pool.submit_task(
            workloads.spawn_stubborn_tree,
            token=token,
            partial_sink=seen,
            grace_period=0,
            term_grace_period=0.2,
        )
        child, grandchild = seen.wait("tree")
        token.cancel("kill the tree")
        with pytest.raises(CancelledException):
            future.result(WAIT)
        for pid in (child, grandchild):
            assert_gone(pid)

    def test_partial_results_survive_kill(self, pool: ProcessPool) -> None:
        """Test that what a task stored before being killed is in the exception."""
        seen = Announcements()
        token = CancellationToken()
        future = pool.submit_task(
            workloads.store_then_spin,
            (50,),
            token=token,
            partial_sink=seen,
            grace_period=0,
            term_grace_period=0,
        )
        seen.wait("pid")
        token.cancel("enough")
        with pytest.raises(CancelledException) as info:
            future.result(WAIT)
        stored = info.value.partial_results
        assert all(stored[f"step-{i}"] == i * i for i in range(50))

    def test_critical_section_defers_kill(self, pool: ProcessPool) -> None:
        """Test that a kill waits for a declared critical section to end."""
        seen = Announcements()
        token = CancellationToken()
        future = pool.submit_task(
            workloads.announce_then_critical,
            (1.0,),
            token=token,
            partial_sink=seen,
            grace_period=0,
            term_grace_period=0,
        )
        seen.wait("pid")
        token.cancel("stop")
        with pytest.raises(CancelledException) as info:
            future.result(WAIT)
        assert info.value.partial_results["critical"] == "completed"

    @pytest.mark.parametrize(("term_grace", "fate"), [(0, "killed"), (WAIT, "terminated")])
    def test_a_deferred_step_comes_when_the_critical_section_ends(
        self, pool: ProcessPool, term_grace: float, fate: str
    ) -> None:
        """Test that a step deferred for a critical section is taken when the block ends,
        not at its declared end (an hour here), as critical_section() promises
        (regression: the kill or SIGTERM waited for the declared time)."""
        seen = Announcements()
        token = CancellationToken()
        future = pool.submit_task(
            workloads.critical_until_cancelled_then_spin,
            (3600.0,),
            token=token,
            partial_sink=seen,
            grace_period=0,
            term_grace_period=term_grace,
        )
        seen.wait("pid")
        token.cancel("stop")
        with pytest.raises(CancelledException) as info:
            future.result(WAIT)
        assert info.value.fate == fate
        assert info.value.partial_results["left"] is True

    def test_a_section_that_overruns_its_declared_time_gets_the_sigterm(
        self, pool: ProcessPool
    ) -> None:
        """Test that once a critical section's declared time ran out, the ladder's
        SIGTERM becomes the exception in the task (its finally runs), as "for at most"
        promises (regression: the worker kept deferring it while the block ran, and
        SIGKILL came term_grace_period later)."""
        seen = Announcements()
        token = CancellationToken()
        future = pool.submit_task(
            workloads.overrun_critical_section,
            (0.2,),
            token=token,
            partial_sink=seen,
            grace_period=0,
            term_grace_period=WAIT,
        )
        seen.wait("pid")
        token.cancel("stop")
        with pytest.raises(CancelledException) as info:
            future.result(WAIT)
        assert info.value.fate == "terminated"
        assert info.value.partial_results["finally"] == "ran"

    def test_timeout_raises_pipeline_timeout(self, pool: ProcessPool) -> None:
        """Test that a task running past its timeout is stopped with a TimeoutError."""
        future = pool.submit_task(
            workloads.announce_and_spin, timeout=0.2, grace_period=0, term_grace_period=0
        )
        with pytest.raises(PipelineTimeoutException) as info:
            future.result(WAIT)
        assert isinstance(info.value, TimeoutError)
        assert future.fate == "killed"

    def test_segfault_fails_only_its_task(self, pool: ProcessPool) -> None:
        """Test that a segfaulting worker fails its task with WorkerCrashedError naming SIGSEGV."""
        crashed = pool.submit(workloads.segfault)
        with pytest.raises(WorkerCrashedError) as info:
            crashed.result(WAIT)
        assert info.value.signal == signal.SIGSEGV
        assert crashed.fate == "crashed"
        assert pool.submit(workloads.add, 1, 1).result(WAIT) == 2

    def test_exit_code_is_reported(self, pool: ProcessPool) -> None:
        """Test that a worker calling os._exit fails its task with the exit code."""
        with pytest.raises(WorkerCrashedError) as info:
            pool.submit(workloads.exit_hard, 7).result(WAIT)
        assert info.value.exitcode == 7

    def test_worker_killed_from_outside(self, pool: ProcessPool) -> None:
        """Test that a worker SIGKILLed by someone else fails only its own task."""
        seen = Announcements()
        future = pool.submit_task(workloads.announce_and_spin, partial_sink=seen)
        os.kill(seen.wait("pid"), signal.SIGKILL)
        with pytest.raises(WorkerCrashedError) as info:
            future.result(WAIT)
        assert info.value.signal == signal.SIGKILL

    def test_pool_heals_and_keeps_its_size(self, pool: ProcessPool) -> None:
        """Test that a killed worker is replaced and the pool runs tasks again."""
        before = set(pool.statistics().worker_pids)
        with pytest.raises(WorkerCrashedError):
            pool.submit(workloads.exit_hard, 1).result(WAIT)
        assert pool.wait_ready(WAIT)
        stats = pool.statistics()
        assert stats.workers == 2
        assert stats.replaced_total == 1
        assert set(stats.worker_pids) != before
        assert sorted(pool.map(workloads.add, [1, 2], [1, 2])) == [2, 4]

    def test_unpicklable_argument_is_refused_at_submit_task(self, pool: ProcessPool) -> None:
        """Test that an argument that cannot be pickled makes submit_task raise TypeError
        before anything is sent."""
        with pytest.raises(TypeError, match="args\\[0\\] cannot be sent"):
            pool.submit_task(workloads.add, (threading.Lock(), 1))
        with pytest.raises(TypeError, match="fn cannot be sent"):
            pool.submit_task(functools.partial(print, threading.Lock()))  # not even by value
        assert pool.statistics().completed_total == 0

    def test_unpicklable_argument_fails_the_future_of_submit(self, pool: ProcessPool) -> None:
        """Test that submit(), as the stdlib's, returns a future that has already failed
        with the pickling error (a note names the argument), and nothing is sent."""
        future = pool.submit(workloads.add, threading.Lock(), 1)
        assert future.done()
        error = future.exception()
        assert isinstance(error, TypeError)
        assert "cannot pickle" in str(error)
        assert any("args[0] cannot be sent" in note for note in error.__notes__)
        assert future.fate == "failed"
        assert pool.statistics().completed_total == 0

    def test_bad_arguments_are_refused(self) -> None:
        """Test that bad constructor and submit arguments raise clear errors at once."""
        with pytest.raises(ValueError, match="max_workers"):
            ProcessPool(0)
        with pytest.raises(TypeError, match="max_workers"):
            ProcessPool("2")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="grace_period"):
            ProcessPool(1, grace_period=-1)

    def test_submit_after_shutdown_raises(self) -> None:
        """Test that submitting to a shut-down pool raises PoolClosedError."""
        pool = ProcessPool(1)
        pool.shutdown()
        with pytest.raises(PoolClosedError):
            pool.submit(workloads.add, 1, 2)

    def test_shutdown_stops_tasks_in_flight(self) -> None:
        """Test that shutdown(cancel_futures, cancel_running) ends every future and process."""
        seen = Announcements()
        pool = ProcessPool(1, grace_period=0, term_grace_period=0)
        running = pool.submit_task(workloads.announce_and_spin, partial_sink=seen)
        queued = pool.submit(workloads.add, 1, 2)
        worker = seen.wait("pid")
        pool.shutdown(wait=True, cancel_futures=True, cancel_running=True)
        assert queued.cancelled()
        assert running.done()
        assert_gone(worker)

    def test_token_cancelled_before_submit_takes_no_worker(self, pool: ProcessPool) -> None:
        """Test that a task whose token is already cancelled fails at once without running."""
        token = CancellationToken()
        token.cancel("too late")
        future = pool.submit_task(workloads.whoami, token=token)
        with pytest.raises(CancelledException, match="too late"):
            future.result(0)
        assert pool.statistics().completed_total == 0

    def test_cancel_inside_worker_stops_the_task_not_the_caller_token(
        self, pool: ProcessPool
    ) -> None:
        """Test that a task cancelling its own token (a child of the caller's, as in the
        thread pool) ends cancelled with that reason and leaves the caller's token alone."""
        token = CancellationToken()
        future = pool.submit_task(workloads.cancel_own_token, ("done early",), token=token)
        with pytest.raises(CancelledException) as raised:
            future.result(WAIT)
        assert raised.value.reason == "done early"
        assert future.fate == "cancelled"
        assert not token.is_cancelled

    def test_task_token_argument_arrives_as_worker_view(self, pool: ProcessPool) -> None:
        """Test that passing the task's token as an argument gives the worker's view of it."""
        token = CancellationToken()
        future = pool.submit_task(workloads.token_argument_is_current, (token,), token=token)
        assert future.result(WAIT) is True

    def test_workers_die_with_their_parent(self, tmp_path: Any) -> None:
        """Test that SIGKILLing the program leaves no worker or task process running."""
        script = tmp_path / "owner.py"
        script.write_text(
            textwrap.dedent(
                """
                import os, sys
                sys.path.insert(0, sys.argv[1])
                import workloads
                from cancelflow import ProcessPool
                from cancelflow import _context

                pool = ProcessPool(1)
                pids = []
                pool.submit_task(workloads.announce_and_spin,
                                 partial_sink=lambda k, v: print(v, flush=True))
                print(pool.statistics().zygote_pid, flush=True)
                sys.stdin.read()
                """
            )
        )
        owner = subprocess.Popen(
            [sys.executable, str(script), os.path.dirname(workloads.__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert owner.stdout is not None
        first, second = int(owner.stdout.readline()), int(owner.stdout.readline())
        owner.kill()
        owner.wait(WAIT)
        owner.stdout.close()
        assert owner.stdin is not None
        owner.stdin.close()
        for pid in (first, second):
            assert_gone(pid)


class TestReapOfAStoppedTask:
    def test_the_pools_kill_waits_for_the_workers_reap(self) -> None:
        """Test that a stopped task's grandchild in a session of its own, frozen by the
        worker's reap and orphaned by it (its parent killed first), is killed too when the
        reap takes longer than the pool's SIGTERM-to-SIGKILL grace (regression on
        "posix": the pool's SIGKILL cut the reap short between its freezes and its kills,
        and the orphan, out of every tree and group the pool could find, stayed stopped
        for good)."""
        seen = Announcements()
        with ProcessPool(1, initializer=workloads.slow_down_the_first_kill_of_a_reap) as pool:
            future = pool.submit_task(
                workloads.leave_a_session_leader_under_a_child,
                partial_sink=seen,
                grace_period=0,
                term_grace_period=0.05,
            )
            child, grandchild = seen.wait("tree")
            try:
                future.cancel()
                with pytest.raises(concurrent.futures.CancelledError):
                    future.result(WAIT)
                for pid in (child, grandchild):
                    assert_gone(pid)
            finally:
                with contextlib.suppress(OSError):
                    os.kill(grandchild, signal.SIGKILL)


class TestRunSync:
    async def _run(self, coro: Any) -> Any:
        return await asyncio.wait_for(coro, WAIT)

    def test_run_sync_returns_result(self, pool: ProcessPool) -> None:
        """Test that run_sync awaits the task's result."""
        assert asyncio.run(self._run(pool.run_sync(workloads.add, 4, 5))) == 9

    def test_token_cancel_from_thread_raises_cancelled(self, pool: ProcessPool) -> None:
        """Test that cancelling the token from another thread raises CancelledException."""
        seen = Announcements()
        token = CancellationToken()

        def cancel_when_running() -> None:
            seen.wait("pid")
            token.cancel("from a thread")

        async def main() -> None:
            thread = threading.Thread(target=cancel_when_running)
            thread.start()
            try:
                with pytest.raises(CancelledException, match="from a thread"):
                    await pool.run_sync(
                        workloads.announce_and_spin, token=token, partial_sink=seen, grace_period=0
                    )
            finally:
                thread.join()

        asyncio.run(self._run(main()))

    def test_asyncio_cancellation_stops_the_task(self, pool: ProcessPool) -> None:
        """Test that cancelling the awaiting asyncio task stops the worker task first."""
        seen = Announcements()

        async def main() -> None:
            task = asyncio.create_task(
                pool.run_sync(
                    workloads.announce_and_spin,
                    partial_sink=seen,
                    grace_period=0,
                    term_grace_period=0,
                )
            )
            pid = await asyncio.to_thread(seen.wait, "pid")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Exited by the time the CancelledError arrives (maybe not reaped yet: the
            # zygote's sweep may still be under way).
            assert_gone(pid, already_exited=True)

        asyncio.run(self._run(main()))

    def test_cancelled_token_raises_on_entry(self, pool: ProcessPool) -> None:
        """Test that run_sync with a cancelled token raises before taking a worker."""
        token = CancellationToken()
        token.cancel("before")
        with pytest.raises(CancelledException, match="before"):
            asyncio.run(self._run(pool.run_sync(workloads.whoami, token=token)))
        assert pool.statistics().completed_total == 0


def _hold_commands(pool: ProcessPool, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold the pool's supervisor thread in its next command until the returned event is
    set (or for twice the tests' bound)."""
    release = threading.Event()
    supervisor = pool._supervisor
    handle = supervisor._on_command

    def held_up(command: Any) -> None:
        release.wait(2 * WAIT)
        handle(command)

    monkeypatch.setattr(supervisor, "_on_command", held_up)
    return release


def _exits_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` (not a child of ours) exits within ``seconds``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True  # exited and reaped already
    try:
        readable, _, _ = select.select([fd], [], [], seconds)
        return bool(readable)
    finally:
        os.close(fd)


def _stop_while_held_up(
    pool: ProcessPool,
    future: TaskFuture,
    monkeypatch: pytest.MonkeyPatch,
    stop: Callable[[], None],
) -> None:
    """Run ``stop`` (which stops ``future``'s task and checks what it expects) while the
    supervisor thread is held up; then the future ends killed."""
    release = _hold_commands(pool, monkeypatch)
    try:
        stop()
    finally:
        release.set()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(WAIT)
    assert future.fate == "killed"


def _cancel_and_see_it_die(future: TaskFuture, pid: int) -> Callable[[], None]:
    def stop() -> None:
        assert future.cancel()
        assert _exits_within(pid, WAIT), "the worker was not killed"

    return stop


@pytest.mark.skipif(not REAPS_ORPHANS, reason="the asking thread kills only on linux")
class TestKillFromTheAskingThread:
    """A stop with no grace at all (or a kill) SIGKILLs the worker from the thread that
    asks for it; the supervisor thread then walks and kills the rest of the tree."""

    def test_a_task_stopped_without_grace_dies_while_the_supervisor_is_held_up(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a stop with no grace kills the worker without the supervisor."""
        seen = Announcements()
        with ProcessPool(1, grace_period=0, term_grace_period=0) as pool:
            future = pool.submit_task(workloads.announce_and_spin, partial_sink=seen)
            pid = seen.wait("pid")
            _stop_while_held_up(pool, future, monkeypatch, _cancel_and_see_it_die(future, pid))

    def test_a_task_in_a_critical_section_is_left_to_the_supervisor(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a stop with no grace leaves a task inside a critical section alive
        (the supervisor defers the step), while a kill() does not."""
        seen = Announcements()
        with ProcessPool(1, grace_period=0, term_grace_period=0) as pool:
            future = pool.submit_task(
                workloads.announce_then_critical, (4 * WAIT,), partial_sink=seen
            )
            pid = seen.wait("pid")

            def stop() -> None:
                assert future.cancel()
                assert not _exits_within(pid, 0.3), "killed inside its critical section"
                assert future.kill()
                assert _exits_within(pid, WAIT), "kill() did not kill"

            _stop_while_held_up(pool, future, monkeypatch, stop)

    def test_a_kill_racing_the_tasks_return_never_reaches_the_next_task(self) -> None:
        """Test that a task cancelled (no grace) just as it returns, its worker killed by
        the asking thread before the supervisor read the result, never costs the task
        queued behind it: that one runs on a fresh worker (regression: it was sent to
        the killed worker and failed with WorkerCrashedError, 17 times in 300)."""
        jitter = random.Random(7)
        with ProcessPool(1, grace_period=0, term_grace_period=0) as pool:
            for _ in range(150):
                first = pool.submit(workloads.add, 1, 2)
                behind = pool.submit(workloads.add, 3, 4)
                deadline = time.monotonic() + WAIT
                while not (first.running() or first.done()):  # (spun: microseconds count)
                    assert time.monotonic() < deadline, "the first task never started"
                until = time.perf_counter() + jitter.random() * 0.0005
                while time.perf_counter() < until:
                    pass
                first.cancel()
                assert behind.result(WAIT) == 7
                assert behind.fate == "finished"

    @pytest.mark.parametrize("by", ["asking-thread", "supervisor"])
    def test_a_kill_decided_between_two_critical_sections_never_lands_in_the_next(
        self, by: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a task entering critical section after critical section is never
        SIGKILLed inside one by a plain stop: once the kill is decided no section starts
        (the task gets CancelledException instead), whether the asking thread or the
        supervisor takes the step (regression: 30 of 300 such stops killed the task
        inside its next section)."""
        jitter = random.Random(11)
        with ProcessPool(1, grace_period=0, term_grace_period=0) as pool:
            if by == "supervisor":  # the step the asking thread would take is left to it
                monkeypatch.setattr(pool._supervisor, "_kill_from_here", lambda *a, **k: None)
            for round_ in range(100):
                log = tmp_path / f"log-{round_}"
                seen = Announcements()
                future = pool.submit_task(
                    workloads.critical_sections_in_a_loop, (str(log),), partial_sink=seen
                )
                seen.wait("pid")
                # A random moment of the task's loop (a pause, not a wait for anything; an
                # idle caller makes the stop's path slower, so the race wider).
                time.sleep(jitter.random() * 0.005)
                future.cancel()
                with pytest.raises(concurrent.futures.CancelledError):
                    future.result(WAIT)
                # Killed in a gap, or the section it tried next refused to start, and the
                # task ended with that CancelledException before the kill came.
                assert future.fate in ("killed", "cancelled")
                assert not log.read_bytes().endswith(b"E"), "killed inside a critical section"

    def test_a_walk_after_the_worker_handed_its_child_on_releases_the_caller_after_the_sweep(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that when the worker, killed from the asking thread, is gone before the
        supervisor walks its tree (its child went to the zygote), the caller is released
        only once that child is killed too."""
        seen = Announcements()
        with ProcessPool(1, grace_period=0, term_grace_period=0) as pool:
            future = pool.submit_task(workloads.fork_then_spin, partial_sink=seen)
            pid = seen.wait("pid")
            child = seen.wait("child")
            at_release: list[bool] = []
            called = threading.Event()

            def at_resolution(_: object) -> None:
                at_release.append(psutil.pid_exists(child))
                called.set()

            future.add_done_callback(at_resolution)
            _stop_while_held_up(pool, future, monkeypatch, _cancel_and_see_it_die(future, pid))
            # Done-callbacks run on the pool's thread once the future is resolved; result()
            # may return first (as with the stdlib's futures, which notify the waiters,
            # then run the callbacks).
            assert called.wait(WAIT), "watchdog: the done-callback never ran"
            assert at_release == [False], "the caller was released before the child died"


@pytest.mark.skipif(not workloads.CAN_CLONE_PARENT, reason="clone(CLONE_PARENT) on Linux")
class TestSiblingsOfAStoppedTask:
    """A process a task starts as its worker's sibling (``clone(CLONE_PARENT)``) is in no
    worker's tree: the worker cannot kill it when the task is stopped, the zygote does
    (its parent: it is a stray there). It does not hold the caller up."""

    @pytest.mark.parametrize("cooperative", [True, False], ids=["cooperative", "sigterm"])
    def test_a_stopped_task_leaves_no_sibling_behind(self, cooperative: bool) -> None:
        """Test that the sibling of a task stopped by its token (cooperatively, or by the
        ladder's SIGTERM) is killed although its worker lives on."""
        seen = Announcements()
        with ProcessPool(1, grace_period=5.0 if cooperative else 0.0) as pool:
            future = pool.submit_task(workloads.start_sibling, (cooperative,), partial_sink=seen)
            sibling = seen.wait("sibling")
            workers = pool.statistics().worker_pids
            future.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(WAIT)
            assert future.fate == ("cancelled" if cooperative else "terminated")
            assert _exits_within(sibling, WAIT), "the sibling outlived its stopped task"
            assert pool.statistics().worker_pids == workers  # the worker lived on
            assert pool.submit(workloads.add, 2, 3).result(WAIT) == 5

    @pytest.mark.skipif(
        not REAPS_ORPHANS, reason="elsewhere the worker's group kill may end the sibling first"
    )
    @pytest.mark.parametrize("sibling", [False, True], ids=["no-sibling", "sibling"])
    def test_the_zygote_is_asked_to_sweep_only_when_a_stop_left_a_stray(
        self, sibling: bool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that after a stopped task the zygote is asked to sweep only when it has a
        child that is not a worker (a stop must not cost a wake-up of the zygote for
        nothing)."""
        from cancelflow._process import _supervisor
        from cancelflow._process._protocol import SweepStrays, send_record as real_send

        asked: list[object] = []

        def send_record(sock: Any, record: Any, *args: Any) -> None:
            if isinstance(record, SweepStrays):
                asked.append(record)
            real_send(sock, record, *args)

        monkeypatch.setattr(_supervisor, "send_record", send_record)
        seen = Announcements()
        with ProcessPool(1, grace_period=5.0) as pool:
            if sibling:
                future = pool.submit_task(workloads.start_sibling, (True,), partial_sink=seen)
                seen.wait("sibling")
            else:
                future = pool.submit_task(
                    workloads.announce_and_wait_cooperatively, partial_sink=seen
                )
                seen.wait("pid")
            future.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(WAIT)
            supervisor = pool._supervisor

            def looked() -> bool:
                # (the caller may hear of the stop before the pool reads the task's end)
                return pool.statistics().completed_total == 1 and supervisor._strays_due is None

            assert wait_until(looked)
        assert len(asked) == (1 if sibling else 0)


class TestFirstStep:
    """The ladder's first step (cancel the task's token in its worker) is taken by the
    thread that asks for the stop; the supervisor thread takes the later ones."""

    def test_the_task_sees_its_cancel_while_the_supervisor_is_held_up(
        self, pool: ProcessPool, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a running task sees its token's cancel even while the pool's
        supervisor thread is busy with something else."""
        fifo = str(tmp_path / "saw-cancel")
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        release = threading.Event()
        try:
            seen = Announcements()
            token = CancellationToken()
            # A grace longer than the test: the stop's SIGTERM, which the released
            # supervisor would send at once once the pool's 0.05 s passed, must not race
            # the task's own raise on a loaded machine (the fate would read "terminated").
            future = pool.submit_task(
                workloads.wait_cooperatively_then_tell,
                (fifo,),
                token=token,
                partial_sink=seen,
                grace_period=WAIT,
            )
            seen.wait("pid")
            supervisor = pool._supervisor
            handle = supervisor._on_command

            def held_up(command: Any) -> None:
                release.wait(2 * WAIT)  # longer than the test waits for the task
                handle(command)

            monkeypatch.setattr(supervisor, "_on_command", held_up)
            token.cancel("now")
            readable, _, _ = select.select([reader], [], [], WAIT)
            assert readable, "the task did not see its cancel"
            assert os.read(reader, 1) == b"x"
            release.set()
            with pytest.raises(CancelledException) as info:
                future.result(WAIT)
            assert info.value.reason == "now"
            assert future.fate == "cancelled"
        finally:
            release.set()
            os.close(reader)

    def test_a_first_step_cut_short_still_leaves_the_stop_to_the_supervisor(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a stop whose first step is interrupted in the asking thread (a
        Ctrl-C landing there) still goes down the ladder: the task is stopped."""
        seen = Announcements()
        with ProcessPool(1, grace_period=0.05, term_grace_period=0) as pool:
            future = pool.submit_task(workloads.announce_and_spin, partial_sink=seen)
            seen.wait("pid")

            def interrupted(task: Any, reason: str | None) -> None:
                raise KeyboardInterrupt

            monkeypatch.setattr(pool._supervisor, "_cancel_slot_now", interrupted)
            with pytest.raises(KeyboardInterrupt):
                future.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(WAIT)
            assert future.fate == "killed"

    def test_a_late_first_step_never_reaches_the_next_task_of_the_worker(self) -> None:
        """Test that the first step asked for a task that has ended (the asking thread
        found it running an instant before) leaves alone the task its worker runs now."""
        with ProcessPool(1) as pool:
            token = CancellationToken()
            first = pool.submit_task(abs, (-1,), token=token)
            ended = first._task
            assert ended is not None
            assert first.result(WAIT) == 1
            seen = Announcements()
            own = CancellationToken()
            following = pool.submit_task(
                workloads.announce_and_wait_cooperatively, token=own, partial_sink=seen
            )
            seen.wait("pid")
            running = following._task
            assert running is not None
            assert running.worker is not None
            assert running.worker is ended.worker
            pool._supervisor._cancel_slot_now(ended, "late")
            assert not running.worker.slots[running.slot].is_cancelled, (
                "the next task's token was cancelled"
            )
            own.cancel("its own")
            with pytest.raises(CancelledException) as info:
                following.result(WAIT)
            assert info.value.reason == "its own"


class TestTaskFutureKill:
    def test_kill_skips_the_grace_periods(self) -> None:
        """Test that TaskFuture.kill() SIGKILLs at once even with long grace periods."""
        seen = Announcements()
        with ProcessPool(1, grace_period=3600, term_grace_period=3600) as pool:
            future = pool.submit_task(workloads.announce_and_finish_in_finally, partial_sink=seen)
            worker = seen.wait("pid")
            assert future.kill("now")
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(WAIT)
            assert future.fate == "killed"
            assert "finally" not in future.partial_results
            assert_gone(worker)


class _SweepsHeld:
    """Holds back every sweep the supervisor asks the zygote for until ``release``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from cancelflow._process import _supervisor
        from cancelflow._process._protocol import Sweep, send_record as real_send

        self.release = threading.Event()
        self.asked = threading.Event()
        self.held: list[threading.Thread] = []

        def send_record(sock: Any, record: Any, *args: Any) -> None:
            if isinstance(record, Sweep):  # the sweep goes out only once the test says so

                def later() -> None:
                    self.release.wait(WAIT)
                    real_send(sock, record, *args)

                self.held.append(threading.Thread(target=later))
                self.held[-1].start()
                self.asked.set()
                return
            real_send(sock, record, *args)

        monkeypatch.setattr(_supervisor, "send_record", send_record)  # as the pool calls it

    def end(self) -> None:
        self.release.set()
        for thread in self.held:
            thread.join(WAIT)


class TestKilledTaskRelease:
    @pytest.fixture
    def sweeps(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[_SweepsHeld]:
        held = _SweepsHeld(monkeypatch)
        try:
            yield held
        finally:
            held.end()

    @staticmethod
    def cancel_while_sweeps_are_held(
        sweeps: _SweepsHeld, task: Callable[[], None] = workloads.announce_and_spin
    ) -> None:
        seen = Announcements()
        with ProcessPool(1, grace_period=0, term_grace_period=0) as pool:
            future = pool.submit_task(task, partial_sink=seen)
            worker = seen.wait("pid")
            assert future.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(WAIT)
            assert future.fate == "killed"
            # The supervisor asks for the sweep just after it settled the future.
            assert sweeps.asked.wait(WAIT), "no sweep was asked for"
            assert_gone(worker)
            sweeps.release.set()
            assert pool.submit(abs, -1).result(WAIT) == 1

    def test_the_caller_is_released_once_the_tree_is_dead_not_after_the_sweep(
        self, sweeps: _SweepsHeld
    ) -> None:
        """Test that a killed task's future settles as soon as its worker and tree are
        known dead, while the zygote's sweep of the worker is still outstanding (the
        worker's slot is replaced only after the sweep)."""
        self.cancel_while_sweeps_are_held(sweeps)

    @pytest.mark.skipif(not REAPS_ORPHANS, reason="the asking thread kills only on linux")
    def test_a_childless_worker_is_released_before_the_sweep_when_its_walk_comes_late(
        self, sweeps: _SweepsHeld, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a worker SIGKILLed by the asking thread, with no child at that moment,
        releases its caller before the sweep even when the supervisor reaches it only
        after its exit (a loaded machine: CI's failure on 0a077cd)."""
        from cancelflow._process._supervisor import Supervisor

        kill = Supervisor._kill

        def late_kill(self: Supervisor, worker: Any) -> None:
            if worker.killed_early:  # the supervisor thread comes after the worker's exit
                assert _exits_within(worker.pid, WAIT)
            kill(self, worker)

        monkeypatch.setattr(Supervisor, "_kill", late_kill)
        # The asking thread reads the worker right after its SIGKILL, while the kernel
        # tears it down: a worker holding much memory makes that take long enough for
        # the read to come first on any machine (a bare one goes in about a millisecond).
        self.cancel_while_sweeps_are_held(sweeps, workloads.announce_and_spin_holding_memory)

    @pytest.mark.skipif(not REAPS_ORPHANS, reason="the asking thread kills only on linux")
    def test_a_killed_worker_whose_exit_is_seen_before_the_stop_request_releases_its_caller(
        self, sweeps: _SweepsHeld, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that the caller is released before the sweep when the asking thread's
        SIGKILL ends the worker and the supervisor handles the exit before the stop
        request the asking thread posts after it."""
        from cancelflow._process._supervisor import Supervisor

        gone = threading.Event()
        on_gone, post = Supervisor._on_gone, Supervisor.post

        def noted_gone(self: Supervisor, worker: Any) -> None:
            on_gone(self, worker)
            gone.set()

        def late_post(self: Supervisor, command: Any) -> None:
            if type(command).__name__ == "StopTask":
                assert gone.wait(WAIT), "the worker's exit was not handled"
            post(self, command)

        monkeypatch.setattr(Supervisor, "_on_gone", noted_gone)
        monkeypatch.setattr(Supervisor, "post", late_post)
        self.cancel_while_sweeps_are_held(sweeps)


class TestSupervisorWakeups:
    def test_concurrent_submitters_never_stall_the_pool(self) -> None:
        """Test that bursts of submits from several threads all complete (issue 6 hang).

        Regression: clearing the wake flag before draining the wake pipe could swallow a
        submitter's wake byte for good, leaving every later task queued forever.
        """
        with ProcessPool(2) as pool:

            def burst() -> list[concurrent.futures.Future[Any]]:
                return [pool.submit(abs, -i) for i in range(300)]

            for _ in range(6):
                with concurrent.futures.ThreadPoolExecutor(3) as submitters:
                    batches = list(submitters.map(lambda _: burst(), range(3)))
                futures = [f for batch in batches for f in batch]
                _, pending = concurrent.futures.wait(futures, timeout=WAIT)
                assert not pending, f"{len(pending)} tasks never ran"
