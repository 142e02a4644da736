"""Specification of how a caller blocked in a ProcessPool task's ``result()`` hears that
the task stopped.

A task that ends stopped (it raised its ``CancelledException`` once its token was
cancelled) is reported by its worker straight to the threads blocked in its future's
``result()`` or ``exception()``, which settle the future as the pool would: the caller
does not wait for the pool's own thread. What the pool decides stays the same: the
exception, its reason, and every partial result the task stored, even one stored as
it stopped.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import workloads
from cancelflow import CancellationToken, CancelledException, ProcessPool, TaskFuture, _futures
from cancelflow._platform import HAVE_FUTEX
from cancelflow._process import _supervisor
from support import WAIT, Announcements, LogCapture, wait_until


class BlockedCaller:
    """A thread blocked in ``future.exception()`` with no timeout (a daemon: a caller
    nothing wakes fails the test's watchdog, not the run); :attr:`outcome` once it
    returned."""

    def __init__(self, future: TaskFuture) -> None:
        self.outcome: BaseException | None = None
        self.returned = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(future,), daemon=True)
        self._thread.start()

    def _run(self, future: TaskFuture) -> None:
        try:
            self.outcome = future.exception()
        finally:
            self.returned.set()

    def join(self) -> None:
        assert self.returned.wait(WAIT), "watchdog: nothing woke the caller"


@contextmanager
def pool_thread_held(pool: ProcessPool) -> Iterator[None]:
    """Keep the pool's own thread busy (inside a done-callback) until the block ends.

    The task ends only once its callback is attached (a callback attached to a future
    already done would run here, in the test's thread)."""
    inside, gate = threading.Event(), threading.Event()
    on_pool_thread: list[bool] = []

    def hold(_: Future[Any]) -> None:
        on_pool_thread.append(threading.current_thread() is pool._supervisor.thread)
        inside.set()
        gate.wait(WAIT)

    with tempfile.TemporaryDirectory() as directory:
        go = Path(directory, "go")
        future = pool.submit(workloads.wait_for_path, str(go))
        future.add_done_callback(hold)
        go.touch()
        assert inside.wait(WAIT), "watchdog: the done-callback never ran"
    assert on_pool_thread == [True]
    try:
        yield
    finally:
        gate.set()


def sleeping_on_its_worker(future: TaskFuture, callers: int = 1) -> bool:
    """Whether ``callers`` threads sleep on the word of the worker running the task
    (white-box; reads without setting anything up)."""
    with _futures.lock(future):
        return len(future._condition.__dict__.get("_cf_sleepers", ())) >= callers


def reported_stopped(task: Any) -> bool:
    """Whether the worker of ``task`` (a future's ``_task``) has said the task ended
    stopped (white-box)."""
    return task.worker is not None and task.worker.control.stopped == task.seq


def start_cooperative_task(pool: ProcessPool, *args: Any) -> tuple[TaskFuture, CancellationToken]:
    seen = Announcements()
    token = CancellationToken()
    if args:
        fn: Any = workloads.wait_cooperatively_then_store_progress
    else:
        fn = workloads.announce_and_wait_cooperatively
    future = pool.submit_task(fn, args, token=token, partial_sink=seen)
    seen.wait("pid")
    return future, token


@pytest.fixture(autouse=True)
def _no_guard_wake(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sleeping caller is woken by what it waits for, never by the guard's timeout."""
    monkeypatch.setattr(_supervisor, "_LONGEST_SLEEP", 10 * WAIT)


@pytest.mark.skipif(not HAVE_FUTEX, reason="the worker wakes the caller through a futex")
class TestACallerBlockedInResult:
    def test_hears_a_cooperative_stop_while_the_pools_thread_is_busy(self) -> None:
        """Test that a cooperative stop reaches a caller blocked in result() without the
        pool's thread, which is busy (in a done-callback) the whole time."""
        with ProcessPool(2) as pool:
            future, token = start_cooperative_task(pool)
            caller = BlockedCaller(future)
            assert wait_until(lambda: sleeping_on_its_worker(future))
            with pool_thread_held(pool):
                token.cancel("enough")
                assert caller.returned.wait(WAIT), "the caller waited for the pool's thread"
            caller.join()
        assert isinstance(caller.outcome, CancelledException)
        assert caller.outcome.reason == "enough"
        assert future.partial_results == {"pid": future.pid}

    def test_every_caller_blocked_on_the_future_hears_it(self) -> None:
        """Test that two threads blocked on the same future both get its exception."""
        with ProcessPool(1) as pool:
            future, token = start_cooperative_task(pool)
            callers = [BlockedCaller(future), BlockedCaller(future)]
            assert wait_until(lambda: sleeping_on_its_worker(future, callers=2))
            token.cancel("both")
            for caller in callers:
                caller.join()
        assert [type(c.outcome) for c in callers] == [CancelledException] * 2
        assert callers[0].outcome is callers[1].outcome

    def test_hears_a_task_that_returns(self, tmp_path: Path) -> None:
        """Test that a caller blocked in result() of a running task gets what it returned
        (any change of the future wakes it, not only a stop its worker reports)."""
        mark, go = tmp_path / "running", tmp_path / "go"
        with ProcessPool(1) as pool:
            future = pool.submit(workloads.mark_then_wait_for_path, str(mark), str(go))
            assert wait_until(mark.exists)
            results: list[str] = []
            caller = threading.Thread(target=lambda: results.append(future.result()), daemon=True)
            caller.start()
            assert wait_until(lambda: sleeping_on_its_worker(future))
            go.touch()
            caller.join(WAIT)
            assert not caller.is_alive()
        assert results == ["went"]

    def test_the_futures_done_callbacks_still_run_on_the_pools_thread(self) -> None:
        """Test that a caller which settles the future itself leaves its done-callbacks to
        the pool's thread (as documented: a callback may take a lock the caller holds)."""
        ran_on: list[str] = []
        held = threading.Lock()
        with ProcessPool(1) as pool:
            future, token = start_cooperative_task(pool)

            def callback(_: Future[Any]) -> None:
                with held:
                    ran_on.append(threading.current_thread().name)

            future.add_done_callback(callback)
            caller = BlockedCaller(future)
            assert wait_until(lambda: sleeping_on_its_worker(future))
            with held:  # the caller returns while a callback would wait for this lock
                token.cancel("go")
                assert caller.returned.wait(WAIT)
            assert wait_until(lambda: bool(ran_on))
        assert isinstance(caller.outcome, CancelledException)
        assert ran_on == [pool._supervisor.thread.name]

    def test_a_settle_cut_short_by_an_interrupt_is_completed_by_the_pool(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a KeyboardInterrupt raised in the caller's thread while it settles the
        future (a Ctrl-C in a result() of the main thread) leaves the future to the pool,
        which settles it: nobody else waits forever."""
        conclude = _supervisor.Supervisor._conclude
        cut: list[bool] = []

        def cut_short(self: Any, task: Any, *args: Any) -> None:
            if threading.current_thread() is not self.thread and not cut:
                cut.append(True)
                raise KeyboardInterrupt
            conclude(self, task, *args)

        monkeypatch.setattr(_supervisor.Supervisor, "_conclude", cut_short)
        with ProcessPool(2) as pool:
            future, token = start_cooperative_task(pool)
            interrupted: list[BaseException] = []

            def caller() -> None:
                try:
                    future.result(WAIT)
                except BaseException as exc:  # noqa: BLE001 - what the test looks at
                    interrupted.append(exc)

            thread = threading.Thread(target=caller)
            thread.start()
            assert wait_until(lambda: sleeping_on_its_worker(future))
            with pool_thread_held(pool):  # so the caller, not the pool, settles it first
                token.cancel("cut")
                thread.join(WAIT)
                assert cut == [True]
                assert not future.done()
            outcome = future.exception(WAIT)
        assert [type(exc) for exc in interrupted] == [KeyboardInterrupt]
        assert isinstance(outcome, CancelledException)
        assert outcome.reason == "cut"

    def test_a_caller_whose_timeout_ran_out_is_not_waited_for(self) -> None:
        """Test that a caller leaving result() on its timeout no longer counts as waiting
        (white-box: the worker would hold a later stop's result for it)."""
        import concurrent.futures

        with ProcessPool(1) as pool:
            future, token = start_cooperative_task(pool)
            with pytest.raises(concurrent.futures.TimeoutError):
                future.result(0.05)
            task = future._task
            assert task is not None
            assert task.worker is not None
            assert task.worker.control.waiting != task.seq
            token.cancel("later")
            assert isinstance(future.exception(WAIT), CancelledException)

    def test_the_pools_thread_still_logs_the_stop_and_drops_the_tasks_links(
        self, logs: LogCapture
    ) -> None:
        """Test that what a caller's settle leaves to the pool's thread (its next turn) is
        done there: the stop is logged, bound to the pool, and the task lets go of its
        token's callback and its grace timer (white-box)."""
        with ProcessPool(2) as pool:
            future, token = start_cooperative_task(pool)
            task = future._task
            assert task is not None
            caller = BlockedCaller(future)
            assert wait_until(lambda: sleeping_on_its_worker(future))
            with pool_thread_held(pool):
                token.cancel("loose ends")
                caller.join()
                assert task.handle is not None, "the caller did the pool thread's part"
            record = logs.wait_for(lambda r: f"task {task.seq} cancelled" in r["message"])
            assert record["extra"]["pool"] == pool.name
            assert wait_until(lambda: task.handle is None and task.wake is None)
        assert isinstance(caller.outcome, CancelledException)


class TestWhatTheCallerGets:
    """The same on every implementation: the pool's thread or the caller's settles it."""

    @pytest.mark.parametrize("busy_pool_thread", [False, True], ids=["idle", "busy"])
    def test_a_partial_result_stored_as_the_task_stops_is_in_the_exception(
        self, busy_pool_thread: bool
    ) -> None:
        """Test that a partial result the task stores while it stops (after its cancel,
        before its end) is in the caller's exception: the caller does not settle the
        future before the pool has read it, even when the pool's thread is busy."""
        with ProcessPool(2) as pool:
            future, token = start_cooperative_task(pool, 42)
            caller = BlockedCaller(future)
            if HAVE_FUTEX:
                assert wait_until(lambda: sleeping_on_its_worker(future))
            if busy_pool_thread:
                task = future._task
                with pool_thread_held(pool):
                    token.cancel("save it")
                    # the worker told the callers, its frames wait for the pool's thread
                    assert wait_until(lambda: reported_stopped(task))
                    assert not future.done()
            else:
                token.cancel("save it")
            caller.join()
        assert isinstance(caller.outcome, CancelledException)
        assert caller.outcome.partial_results["progress"] == 42
        assert future.partial_results["progress"] == 42
        assert caller.outcome.reason == "save it"
