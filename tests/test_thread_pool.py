"""Tests for ``cancelflow._thread_pool``: ThreadPool, ThreadTaskFuture, ThreadPoolStatistics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import decimal
import functools
import subprocess
import sys
import textwrap
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cancelflow import (
    BrokenPoolError,
    CancellationToken,
    CancelledException,
    PipelineTimeoutException,
    PoolClosedError,
)
from cancelflow._context import check_cancelled, current_token, store_partial
from cancelflow._thread_pool import ThreadPool, ThreadPoolStatistics, ThreadTaskFuture
from support import WAIT, LogCapture, wait, wait_until

GRACE = 0.05


@pytest.fixture
def pool() -> Iterator[ThreadPool]:
    with ThreadPool(2, grace_period=GRACE, name="test-pool") as p:
        yield p


def fate(future: ThreadTaskFuture[Any]) -> str:
    """The future's fate, read fresh (keeps type checkers from narrowing it between reads)."""
    return future.fate


def drain(one_worker: ThreadPool) -> None:
    """Wait until a one-worker pool's thread has finished everything submitted before."""
    one_worker.submit(lambda: None).result(WAIT)


def cooperative(started: threading.Event, stopped: threading.Event) -> Callable[[], None]:
    """A task that polls its token in a loop until cancelled."""

    def task() -> None:
        started.set()
        try:
            while True:
                check_cancelled()
        finally:
            stopped.set()

    return task


def stuck(started: threading.Event, release: threading.Event) -> Callable[[], str]:
    """A task that ignores its token until the test releases it."""

    def task() -> str:
        started.set()
        assert release.wait(WAIT)
        return "late"

    return task


class TestThreadPool:
    def test_submit_returns_result(self, pool: ThreadPool) -> None:
        """Test that submit runs the call in a worker thread and returns its result."""

        def add(a: int, b: int = 0) -> tuple[int, str]:
            return a + b, threading.current_thread().name

        future = pool.submit(add, 1, b=2)
        value, thread_name = future.result(WAIT)
        assert value == 3
        assert thread_name.startswith("cancelflow-thread-")

    def test_task_exception_fails_future(self, pool: ThreadPool) -> None:
        """Test that an exception raised by the task is the future's exception."""

        def boom() -> None:
            raise KeyError("x")

        future = pool.submit(boom)
        with pytest.raises(KeyError):
            future.result(WAIT)

    def test_result_raises_an_exception_that_is_false_in_a_boolean_context(self) -> None:
        """Test that result() raises a task's exception whose __len__ is 0 (the stdlib's
        Future of 3.11 and 3.12 returned None for it)."""

        class Empty(Exception):
            def __len__(self) -> int:
                return 0

        def fail() -> None:
            raise Empty("empty")

        with ThreadPool(1) as pool:
            future = pool.submit(fail)
            with pytest.raises(Empty, match="empty"):
                future.result(WAIT)
            assert fate(future) == "failed"

    def test_current_token_inside_task(self, pool: ThreadPool) -> None:
        """Test that current_token() in a task is the task's own token, a child of the caller's."""
        parent = CancellationToken()
        started = threading.Event()
        seen: list[CancellationToken] = []

        def task() -> None:
            seen.append(current_token())
            started.set()
            seen[0].wait_blocking(WAIT)

        future = pool.submit_task(task, token=parent)
        wait(started)
        assert seen[0] is not parent
        assert not seen[0].is_cancelled
        parent.cancel("parent went away")
        assert seen[0].cancel_reason == "parent went away"
        with pytest.raises(CancelledException):
            future.result(WAIT)

    def test_check_cancelled_inside_task_raises_after_cancel(self, pool: ThreadPool) -> None:
        """Test that check_cancelled() in a task raises CancelledException once its token is cancelled."""
        started, stopped = threading.Event(), threading.Event()
        seen: list[BaseException] = []

        def task() -> None:
            started.set()
            try:
                while True:
                    check_cancelled()
            except CancelledException as exc:
                seen.append(exc)
            finally:
                stopped.set()

        future = pool.submit(task)
        wait(started)
        future.cancel()
        wait(stopped)
        assert len(seen) == 1
        assert isinstance(seen[0], CancelledException)
        assert seen[0].reason == "future cancelled"

    def test_caller_token_cancel_fails_running_future(self, pool: ThreadPool) -> None:
        """Test that cancelling the caller's token fails a running task's future with its reason."""
        token = CancellationToken()
        started, stopped = threading.Event(), threading.Event()
        future = pool.submit_task(cooperative(started, stopped), token=token)
        wait(started)
        token.cancel("user pressed stop")
        with pytest.raises(CancelledException) as info:
            future.result(WAIT)
        assert info.value.reason == "user pressed stop"
        wait(stopped)

    def test_cancelled_token_on_entry_takes_no_worker(self, pool: ThreadPool) -> None:
        """Test that a task whose token is already cancelled fails at once and starts no thread."""
        token = CancellationToken()
        token.cancel("too late")
        called = threading.Event()
        future = pool.submit_task(called.set, token=token)
        assert future.done()
        with pytest.raises(CancelledException) as info:
            future.result(0)
        assert info.value.reason == "too late"
        assert fate(future) == "cancelled"
        assert pool.statistics().workers == 0
        assert not called.is_set()

    def test_timeout_fails_with_pipeline_timeout(self, pool: ThreadPool) -> None:
        """Test that a task running past its timeout has its token cancelled and fails with PipelineTimeoutException."""
        started, stopped = threading.Event(), threading.Event()
        future = pool.submit_task(cooperative(started, stopped), timeout=0.05)
        with pytest.raises(PipelineTimeoutException) as info:
            future.result(WAIT)
        assert isinstance(info.value, TimeoutError)
        assert info.value.reason == "timeout after 0.05s"
        assert info.value.timeout == 0.05
        assert future.cancel_reason == "timeout after 0.05s"
        wait(stopped)

    def test_timeout_not_reached_returns_result(self, pool: ThreadPool) -> None:
        """Test that a task finishing within its timeout returns normally."""
        future = pool.submit_task(lambda: 42, timeout=WAIT)
        assert future.result(WAIT) == 42
        assert fate(future) == "finished"

    def test_partial_results_travel_with_cancellation(self, pool: ThreadPool) -> None:
        """Test that values stored with store_partial before a cancel are in the CancelledException."""
        started = threading.Event()
        sunk: list[tuple[str, Any]] = []

        def task() -> None:
            store_partial("rows", 10)
            started.set()
            while True:
                check_cancelled()

        token = CancellationToken()
        future = pool.submit_task(task, token=token, partial_sink=lambda k, v: sunk.append((k, v)))
        wait(started)
        token.cancel("stop")
        with pytest.raises(CancelledException) as info:
            future.result(WAIT)
        assert info.value.partial_results == {"rows": 10}
        assert sunk == [("rows", 10)]

    def test_non_cooperative_task_abandoned_and_capacity_replaced(
        self, one_worker: ThreadPool, logs: LogCapture
    ) -> None:
        """Test that a task ignoring its cancel is abandoned after the grace period and a new task still runs."""
        started, release = threading.Event(), threading.Event()
        try:
            blocked = one_worker.submit(stuck(started, release))
            wait(started)
            assert blocked.cancel()
            # Only one worker: this can run only if the stuck thread's slot was replaced.
            later = one_worker.submit(lambda: threading.current_thread().name)
            later_thread = later.result(WAIT)
            assert fate(blocked) == "abandoned"
            stats = one_worker.statistics()
            assert stats.abandoned_total == 1
            assert stats.abandoned_running == 1
            assert stats.workers == 1
            record = logs.wait_for(lambda r: r["level"].name == "WARNING")
            assert record["extra"]["pool"] == "one-worker"
            assert record["extra"]["task"].startswith("task-")
            assert record["extra"]["thread"] != later_thread
        finally:
            release.set()
        logs.wait_for(lambda r: "returned after" in r["message"])
        stats = one_worker.statistics()
        assert stats.abandoned_running == 0
        assert stats.workers == 1  # the returning thread retired: no growth

    def test_abandoned_thread_rejoins_when_under_capacity(
        self, one_worker: ThreadPool, logs: LogCapture
    ) -> None:
        """Test that an abandoned thread that returns while the pool has no other worker becomes a worker again."""
        started, release = threading.Event(), threading.Event()
        try:
            blocked = one_worker.submit(stuck(started, release))
            wait(started)
            blocked.cancel()
            logs.wait_for(lambda r: r["level"].name == "WARNING")
            assert one_worker.statistics().workers == 0  # no work yet: no replacement started
        finally:
            release.set()
        logs.wait_for(lambda r: "rejoins the pool" in r["message"])
        assert one_worker.statistics().workers == 1
        assert one_worker.submit(lambda: 7).result(WAIT) == 7

    def test_interrupt_on_cancel_stops_pure_python_loop(self, one_worker: ThreadPool) -> None:
        """Test that interrupt_on_cancel stops a pure-Python loop that never checks its token, every time."""
        for _ in range(20):
            started, finished = threading.Event(), threading.Event()

            def spin(
                started: threading.Event = started, finished: threading.Event = finished
            ) -> None:
                try:  # the interrupt may land as soon as started.set() returns
                    started.set()
                    n = 0
                    while True:
                        n += 1
                finally:
                    finished.set()

            future = one_worker.submit_task(spin, grace_period=0.01, interrupt_on_cancel=True)
            wait(started)
            future.cancel()
            wait(finished)
            drain(one_worker)
            assert fate(future) == "cancelled"
        assert one_worker.statistics().abandoned_total == 0

    def test_interrupt_waits_out_blocking_call_and_spares_next_task(
        self, one_worker: ThreadPool, logs: LogCapture
    ) -> None:
        """Test that an interrupt cannot break a blocking C call, the thread is abandoned, and the next task on it runs clean."""
        started = threading.Event()
        lock = threading.Lock()
        lock.acquire()

        def blocked() -> str:
            started.set()
            lock.acquire()  # C-level wait: the pending interrupt cannot be delivered here
            return threading.current_thread().name

        try:
            future = one_worker.submit_task(blocked, grace_period=0.01, interrupt_on_cancel=True)
            wait(started)
            future.cancel()
            logs.wait_for(lambda r: "raising CancelledException" in r["message"])
            logs.wait_for(lambda r: r["level"].name == "WARNING")
            assert fate(future) == "abandoned"
        finally:
            lock.release()
        logs.wait_for(lambda r: "rejoins the pool" in r["message"])
        abandoned_thread = logs.wait_for(lambda r: r["level"].name == "WARNING")["extra"]["thread"]

        def innocent() -> tuple[str, int]:
            total = 0
            for i in range(50_000):
                total += i
            return threading.current_thread().name, total

        assert one_worker.submit(innocent).result(WAIT) == (abandoned_thread, sum(range(50_000)))
        assert fate(future) == "abandoned"

    def test_interrupt_never_reaches_next_task(self, one_worker: ThreadPool) -> None:
        """Test that an interrupt racing with a task's return never lands in the next task on that thread."""

        def racer(spins: int, started: threading.Event) -> None:
            token = current_token()
            started.set()
            while not token.is_cancelled:
                pass
            for _ in range(spins):  # return around the moment the interrupt is sent
                pass

        def innocent() -> int:
            total = 0
            for i in range(20_000):
                total += i
            return total

        for i in range(100):
            started = threading.Event()
            future = one_worker.submit_task(
                racer, ((i * 7919) % 200_000, started), grace_period=0, interrupt_on_cancel=True
            )
            nxt = one_worker.submit(innocent)
            wait(started)
            future.cancel()
            assert nxt.result(WAIT) == sum(range(20_000))
            assert fate(nxt) == "finished"
        assert one_worker.statistics().workers == 1

    def test_a_dropped_interrupt_leaves_the_interpreter_traceable(self) -> None:
        """Test that after interrupts that raced with their task's return were dropped,
        a function traced with sys.settrace still runs (on Python 3.11, clearing a sent
        interrupt left the interpreter's pending flag set, and the next traced call looped
        forever). In a child process: the loop would never end."""
        code = textwrap.dedent(
            """
            import sys, threading
            from cancelflow import ThreadPool, current_token
            from cancelflow import _thread_pool

            dropped = []
            discard = _thread_pool._discard_pending_interrupt
            def counted():
                dropped.append(1)
                discard()
            _thread_pool._discard_pending_interrupt = counted

            def racer(spins, started):
                token = current_token()
                started.set()
                while not token.is_cancelled:
                    pass
                for _ in range(spins):
                    pass

            with ThreadPool(1) as pool:
                for i in range(400):
                    started = threading.Event()
                    future = pool.submit_task(
                        racer, ((i * 7919) % 200_000, started),
                        grace_period=0, interrupt_on_cancel=True,
                    )
                    started.wait()
                    future.cancel()
                    pool.submit(int).result()
                    if dropped:
                        break
            sys.settrace(lambda frame, event, arg: None)
            sum(abs(i) for i in range(10))
            sys.settrace(None)
            print("dropped" if dropped else "none dropped")
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "dropped"

    def test_map_returns_results_in_order(self, pool: ThreadPool) -> None:
        """Test that map yields each call's result in input order."""
        assert list(pool.map(lambda x, y: x * y, range(10), range(10), timeout=WAIT)) == [
            x * x for x in range(10)
        ]

    def test_shutdown_cancel_running_stops_running_and_queued(self, one_worker: ThreadPool) -> None:
        """Test that shutdown(cancel_futures=True, cancel_running=True) stops the running task and cancels queued ones."""
        started, stopped = threading.Event(), threading.Event()
        running = one_worker.submit(cooperative(started, stopped))
        queued = one_worker.submit(lambda: "never")
        wait(started)
        one_worker.shutdown(wait=True, cancel_futures=True, cancel_running=True)
        assert stopped.is_set()
        with pytest.raises(CancelledException) as info:
            running.result(0)
        assert info.value.reason == "pool shut down"
        assert fate(running) == "cancelled"
        assert fate(queued) == "cancelled"
        assert queued.cancelled()
        assert queued.cancel_reason == "pool shut down"
        with pytest.raises(concurrent.futures.CancelledError):
            queued.result(0)

    def test_shutdown_waits_for_running_task(self, one_worker: ThreadPool) -> None:
        """Test that shutdown(wait=True) without cancel_futures lets queued and running tasks finish."""
        started, release = threading.Event(), threading.Event()
        first = one_worker.submit(stuck(started, release))
        second = one_worker.submit(lambda: "second")
        wait(started)
        releaser = threading.Thread(target=release.set)
        releaser.start()
        one_worker.shutdown(wait=True)
        releaser.join()
        assert first.result(0) == "late"
        assert second.result(0) == "second"

    def test_shutdown_ends_worker_threads(self) -> None:
        """Test that shutdown(wait=True) returns only once every worker thread has ended."""
        p = ThreadPool(3)
        threads = set(p.map(lambda _: threading.current_thread(), range(6), timeout=WAIT))
        p.shutdown(wait=True)
        assert threads
        assert not any(t.is_alive() for t in threads)

    def test_submit_after_shutdown_raises(self, pool: ThreadPool) -> None:
        """Test that submitting to a shut-down pool raises PoolClosedError."""
        pool.shutdown()
        with pytest.raises(PoolClosedError):
            pool.submit(print)
        with pytest.raises(PoolClosedError):
            asyncio.run(pool.run_sync(print))

    @pytest.mark.parametrize(
        ("kwargs", "error", "name"),
        [
            ({"max_workers": 0}, ValueError, "max_workers"),
            ({"max_workers": -1}, ValueError, "max_workers"),
            ({"max_workers": 1.5}, TypeError, "max_workers"),
            ({"max_workers": True}, TypeError, "max_workers"),
            ({"grace_period": -0.1}, ValueError, "grace_period"),
            ({"grace_period": "1"}, TypeError, "grace_period"),
            ({"name": 3}, TypeError, "name"),
        ],
    )
    def test_bad_constructor_arguments(
        self, kwargs: dict[str, Any], error: type[Exception], name: str
    ) -> None:
        """Test that invalid constructor arguments raise TypeError/ValueError naming the argument."""
        with pytest.raises(error, match=name):
            ThreadPool(**kwargs)

    @pytest.mark.parametrize(
        ("call", "error", "name"),
        [
            (lambda p: p.submit(42), TypeError, "fn"),
            (lambda p: p.submit_task(print, timeout=-1), ValueError, "timeout"),
            (lambda p: p.submit_task(print, grace_period=-1), ValueError, "grace_period"),
            (lambda p: p.submit_task(print, token="t"), TypeError, "token"),
            (lambda p: p.submit_task(print, kwargs=[1]), TypeError, "kwargs"),
            (lambda p: p.submit_task(print, partial_sink=1), TypeError, "partial_sink"),
        ],
    )
    def test_bad_submit_arguments(
        self,
        pool: ThreadPool,
        call: Callable[[ThreadPool], object],
        error: type[Exception],
        name: str,
    ) -> None:
        """Test that invalid submit arguments raise at submit time, naming the argument, and start nothing."""
        with pytest.raises(error, match=name):
            call(pool)
        assert pool.statistics().workers == 0

    def test_run_sync_returns_result(self, pool: ThreadPool) -> None:
        """Test that run_sync returns the callable's result to the awaiting coroutine."""

        async def main() -> str:
            return await pool.run_sync(lambda a: a * 2, "ab")

        assert asyncio.run(main()) == "abab"

    def test_run_sync_token_cancelled_from_other_thread(self, pool: ThreadPool) -> None:
        """Test that cancelling the token from another thread releases the awaiting caller with CancelledException."""
        token = CancellationToken()

        async def main() -> CancelledException:
            loop = asyncio.get_running_loop()
            started = asyncio.Event()

            def task() -> None:
                loop.call_soon_threadsafe(started.set)
                current_token().wait_blocking(WAIT)

            call = asyncio.create_task(pool.run_sync(task, token=token))
            await asyncio.wait_for(started.wait(), WAIT)
            canceller = threading.Thread(target=token.cancel, args=("from elsewhere",))
            canceller.start()
            try:
                with pytest.raises(CancelledException) as info:
                    await asyncio.wait_for(call, WAIT)
            finally:
                canceller.join()
            return info.value

        exc = asyncio.run(main())
        assert exc.reason == "from elsewhere"

    def test_run_sync_asyncio_cancel_cancels_task_token(self, pool: ThreadPool) -> None:
        """Test that cancelling the awaiting asyncio task cancels the task token and propagates CancelledError."""
        tokens: list[CancellationToken] = []
        stopped = threading.Event()

        async def main() -> None:
            loop = asyncio.get_running_loop()
            started = asyncio.Event()

            def task() -> None:
                tokens.append(current_token())
                loop.call_soon_threadsafe(started.set)
                current_token().wait_blocking(WAIT)
                stopped.set()

            call = asyncio.create_task(pool.run_sync(task))
            await asyncio.wait_for(started.wait(), WAIT)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

        asyncio.run(main())
        wait(stopped)
        assert tokens[0].cancel_reason == "asyncio task cancelled"

    def test_run_sync_cancelled_token_raises_on_entry(self, pool: ThreadPool) -> None:
        """Test that run_sync with an already-cancelled token raises CancelledException without taking a worker."""
        token = CancellationToken()
        token.cancel("before entry")
        called = threading.Event()

        async def main() -> None:
            await pool.run_sync(called.set, token=token)

        with pytest.raises(CancelledException) as info:
            asyncio.run(main())
        assert info.value.reason == "before entry"
        assert not called.is_set()
        assert pool.statistics().workers == 0

    def test_run_sync_timeout(self, pool: ThreadPool) -> None:
        """Test that run_sync raises PipelineTimeoutException when the task runs past its timeout."""
        stopped = threading.Event()

        def task() -> None:
            current_token().wait_blocking(WAIT)
            stopped.set()

        async def main() -> None:
            await pool.run_sync(task, timeout=0.02)

        with pytest.raises(PipelineTimeoutException):
            asyncio.run(main())
        wait(stopped)

    def test_run_sync_copies_context(self, pool: ThreadPool) -> None:
        """Test that the task sees the awaiting coroutine's contextvars."""
        import contextvars

        var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

        async def main() -> str:
            var.set("caller")
            return await pool.run_sync(var.get)

        assert asyncio.run(main()) == "caller"


_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_thread_pool_var", default="unset")


class TestTaskContext:
    """Tasks run in their worker thread's own context, as ``ThreadPoolExecutor``'s do."""

    def test_a_task_does_not_change_the_submitters_decimal_context(
        self, one_worker: ThreadPool
    ) -> None:
        """Test that a task setting the decimal precision leaves the submitter's alone
        (regression: tasks ran in a copy of the submitter's context, which shares its
        decimal.Context object, so the task changed the submitter's precision)."""
        mine = decimal.getcontext()
        before = mine.prec

        def task() -> int:
            decimal.getcontext().prec = before + 7
            return decimal.getcontext().prec

        assert one_worker.submit(task).result(WAIT) == before + 7
        assert decimal.getcontext() is mine
        assert mine.prec == before

    def test_tasks_on_two_threads_keep_their_own_decimal_precision(self) -> None:
        """Test that tasks running at once on two threads each compute with the precision
        they set (regression: they shared the submitter's decimal.Context)."""
        decimal.getcontext()  # the submitter has a decimal context of its own
        both = threading.Barrier(2, timeout=WAIT)

        def task(precision: int) -> tuple[int, int]:
            decimal.getcontext().prec = precision
            both.wait()  # the other task has set its precision too
            digits = len(str(decimal.Decimal(1) / decimal.Decimal(7))) - 2
            return precision, digits

        with ThreadPool(2) as pool:
            results = [f.result(WAIT) for f in [pool.submit(task, 5), pool.submit(task, 40)]]
        assert results == [(5, 5), (40, 40)]

    def test_the_initializers_context_is_the_tasks(self) -> None:
        """Test that what the initializer sets in its thread's context (a ContextVar, the
        decimal precision) is seen by the tasks of that thread, as with ThreadPoolExecutor."""

        def init() -> None:
            _VAR.set("from the initializer")
            decimal.getcontext().prec = 9

        def task() -> tuple[str, int]:
            return _VAR.get(), decimal.getcontext().prec

        with ThreadPool(1, initializer=init) as pool:
            assert pool.submit(task).result(WAIT) == ("from the initializer", 9)

    def test_the_submitters_contextvars_are_not_the_tasks(self, one_worker: ThreadPool) -> None:
        """Test that a ContextVar set by the submitter is not seen by a submitted task
        (ThreadPoolExecutor's behaviour; run_sync copies the caller's context instead)."""
        reset = _VAR.set("submitter")
        try:
            assert one_worker.submit(_VAR.get).result(WAIT) == "unset"
        finally:
            _VAR.reset(reset)

    def test_each_task_has_its_own_token_and_none_is_left_after_it(
        self, one_worker: ThreadPool
    ) -> None:
        """Test that two tasks run one after the other in the same thread each see their
        own token, and that the thread's context holds no task scope between them."""

        def outside() -> str:
            try:
                current_token()
            except RuntimeError:
                return "no task"
            return "task"

        first = one_worker.submit(current_token).result(WAIT)
        second = one_worker.submit(current_token).result(WAIT)
        assert first is not second
        release = threading.Event()
        finished = one_worker.submit(release.wait, WAIT)
        found: list[tuple[str, str]] = []
        # Registered while the task runs: the callback runs in the worker, as it settles.
        finished.add_done_callback(
            lambda _: found.append((threading.current_thread().name, outside()))
        )
        release.set()
        finished.result(WAIT)
        assert wait_until(lambda: bool(found))
        [(thread, seen)] = found
        assert thread.startswith("cancelflow-thread-")  # the worker's
        assert seen == "no task"


class TestThreadTaskFuture:
    def test_cancel_queued_task_never_starts(self, one_worker: ThreadPool) -> None:
        """Test that cancelling a queued task resolves it at once and it never runs."""
        started, release = threading.Event(), threading.Event()
        ran = threading.Event()
        blocker = one_worker.submit(stuck(started, release))
        wait(started)
        queued = one_worker.submit(ran.set)
        assert fate(queued) == "pending"
        assert queued.cancel()
        assert queued.cancelled()
        assert fate(queued) == "cancelled"
        release.set()
        assert blocker.result(WAIT) == "late"
        # FIFO: had the cancelled task not been skipped, it would run before this one.
        assert one_worker.submit(lambda: "after").result(WAIT) == "after"
        assert not ran.is_set()

    def test_cancel_running_cooperative_task(self, one_worker: ThreadPool) -> None:
        """Test that cancel() on a running task resolves the future at once and the task stops cooperatively."""
        started, stopped = threading.Event(), threading.Event()
        future = one_worker.submit(cooperative(started, stopped))
        wait(started)
        assert fate(future) == "running"
        assert future.cancel() is True
        assert future.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(0)
        assert future.cancel_reason == "future cancelled"
        wait(stopped)
        drain(one_worker)
        assert fate(future) == "cancelled"
        assert one_worker.statistics().abandoned_total == 0

    def test_cancel_wakes_concurrent_futures_wait(self, pool: ThreadPool) -> None:
        """Test that concurrent.futures.wait returns when a running task is cancelled."""
        started, stopped = threading.Event(), threading.Event()
        future = pool.submit(cooperative(started, stopped))
        wait(started)
        canceller = threading.Thread(target=future.cancel)
        canceller.start()
        done, _ = concurrent.futures.wait([future], WAIT)
        canceller.join()
        assert future in done
        wait(stopped)

    def test_cancel_is_idempotent(self, pool: ThreadPool) -> None:
        """Test that cancelling twice returns True both times and keeps the first reason."""
        started, stopped = threading.Event(), threading.Event()
        future = pool.submit(cooperative(started, stopped))
        wait(started)
        assert future.cancel()
        assert future.cancel()
        assert future.cancel_reason == "future cancelled"
        wait(stopped)

    def test_cancel_finished_returns_false(self, pool: ThreadPool) -> None:
        """Test that cancel() on a finished task returns False and keeps its result."""
        future = pool.submit(lambda: 5)
        assert future.result(WAIT) == 5
        assert future.cancel() is False
        assert future.result(0) == 5
        assert fate(future) == "finished"
        assert future.cancel_reason is None

    def test_fate_failed(self, one_worker: ThreadPool) -> None:
        """Test that a task raising without being cancelled has fate 'failed'."""
        future = one_worker.submit(int, "x")
        with pytest.raises(ValueError):
            future.result(WAIT)
        drain(one_worker)
        assert fate(future) == "failed"

    def test_done_callback_runs_on_cancel(self, pool: ThreadPool) -> None:
        """Test that done-callbacks run when a running task is cancelled, not when its thread returns."""
        started, release = threading.Event(), threading.Event()
        called = threading.Event()
        try:
            future = pool.submit(stuck(started, release))
            future.add_done_callback(lambda f: called.set())
            wait(started)
            future.cancel()
            assert called.is_set()
        finally:
            release.set()


class TestThreadPoolStatistics:
    def test_counts_completed_and_cancelled(self, one_worker: ThreadPool) -> None:
        """Test that statistics counts completed and cancelled tasks and the queue."""
        started, release = threading.Event(), threading.Event()
        blocker = one_worker.submit(stuck(started, release))
        wait(started)
        queued = one_worker.submit(lambda: None)
        stats = one_worker.statistics()
        assert (stats.workers, stats.busy, stats.queued) == (1, 1, 1)
        queued.cancel()
        assert one_worker.statistics().queued == 0
        release.set()
        blocker.result(WAIT)
        one_worker.shutdown(wait=True)
        stats = one_worker.statistics()
        assert (stats.completed, stats.cancelled, stats.workers, stats.busy) == (1, 1, 0, 0)

    def test_a_refused_submission_is_not_counted_as_cancelled(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a submit_task refused because the pool shut down while it was being
        made, its caller's token cancelled in that moment too, raises PoolClosedError
        naming the function and counts no cancelled task (regression: the cancel settled
        and counted the refused task, and the error named a placeholder)."""
        pool = ThreadPool(1)
        source = CancellationToken()
        real_on_cancel = CancellationToken.on_cancel
        armed = [True]

        def on_cancel(self: CancellationToken, callback: Callable[[], object]) -> Any:
            handle = real_on_cancel(self, callback)
            if self is not source and armed:  # the pool's, on the task's token
                armed.clear()
                pool.shutdown(wait=False)
                source.cancel("the caller gave up")
            return handle

        def answer() -> int:
            return 42

        monkeypatch.setattr(CancellationToken, "on_cancel", on_cancel)
        with pytest.raises(PoolClosedError, match="answer"):
            pool.submit_task(answer, token=source)
        monkeypatch.undo()
        assert not armed
        assert pool.statistics().cancelled == 0
        pool.shutdown()

    def test_is_frozen(self, pool: ThreadPool) -> None:
        """Test that a statistics snapshot cannot be modified."""
        stats = pool.statistics()
        assert isinstance(stats, ThreadPoolStatistics)
        with pytest.raises(dataclasses.FrozenInstanceError):
            stats.workers = 5  # type: ignore[misc]


def _live_token_slots() -> int:
    """How many token slots this process's chunks have handed out and not got back."""
    from cancelflow import _cell

    return sum(chunk.live for chunk in list(_cell._all_chunks) if chunk.owned)


class TestTaskTokenOnDemand:
    """A plain ``submit`` makes its task's token only when something needs it."""

    def test_tasks_that_never_read_their_token_make_none(self, pool: ThreadPool) -> None:
        """Test that plain submissions whose tasks never read their token take no token slot."""
        release = threading.Event()
        before = _live_token_slots()
        try:
            futures = [pool.submit(release.wait, WAIT) for _ in range(20)]
            assert _live_token_slots() == before
        finally:
            release.set()
        assert all(f.result(WAIT) for f in futures)

    def test_a_task_sees_one_token_however_often_it_asks(self, pool: ThreadPool) -> None:
        """Test that current_token() gives the task the same token on every call."""

        def twice() -> bool:
            return current_token() is current_token()

        assert pool.submit(twice).result(WAIT)

    def test_a_cancel_before_the_task_reads_its_token_is_seen(self, one_worker: ThreadPool) -> None:
        """Test that a task cancelled before it first reads its token finds it cancelled."""
        started, release = threading.Event(), threading.Event()
        seen: list[tuple[bool, str | None]] = []

        def late_reader() -> None:
            started.set()
            release.wait(WAIT)
            token = current_token()
            seen.append((token.is_cancelled, token.cancel_reason))

        future = one_worker.submit(late_reader)
        wait(started)
        assert future.cancel()
        release.set()
        drain(one_worker)
        assert seen == [(True, "future cancelled")]
        assert future.cancel_reason == "future cancelled"

    def test_a_task_cancelling_its_own_token_fails_its_future(self, pool: ThreadPool) -> None:
        """Test that a task whose token it cancels itself gets a failed future, as before."""

        def self_cancel() -> None:
            current_token().cancel("changed my mind")
            check_cancelled()

        with pytest.raises(CancelledException) as info:
            pool.submit(self_cancel).result(WAIT)
        assert info.value.reason == "changed my mind"

    def test_a_token_made_twice_at_once_is_one_token(
        self, pool: ThreadPool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a second making of the token that lands inside the first (a signal
        handler cancelling the task while its thread makes the token) ends with one token,
        cancelled, that both calls return."""
        from cancelflow import _thread_pool

        release = threading.Event()
        future = pool.submit(release.wait, WAIT)
        item = future._item
        assert item is not None
        made: list[CancellationToken] = []

        class Interrupted(CancellationToken):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(**kwargs)
                made.append(self)
                if len(made) == 1:  # "the handler" lands while the first one is made
                    assert item is not None
                    item.task_token().cancel("from the handler")

        monkeypatch.setattr(_thread_pool, "CancellationToken", Interrupted)
        try:
            outer = item.task_token()
        finally:
            release.set()
        assert len(made) == 2
        assert outer is item.task_token() is made[1]
        assert outer.cancel_reason == "from the handler"
        with pytest.raises(CancelledException):
            future.result(WAIT)

    def test_cancelling_a_running_task_starts_no_thread(self, one_worker: ThreadPool) -> None:
        """Test that the cancel of a running task schedules its grace timer without
        starting a thread (the pool keeps the timer thread while it is open)."""
        started, release = threading.Event(), threading.Event()
        try:
            future = one_worker.submit(stuck(started, release))
            wait(started)
            threads = set(threading.enumerate())
            future.cancel()
            assert set(threading.enumerate()) <= threads
        finally:
            release.set()


class TestCallersTokenRace:
    def test_a_task_returning_before_the_cancel_reaches_its_token_is_cancelled(
        self, pool: ThreadPool
    ) -> None:
        """Test that a task which returns because its caller's token was cancelled, before
        the canceller's thread got round to the link to the task's own token, counts as
        cancelled (the future fails with the reason), not as finished."""
        source = CancellationToken()
        futures: list[ThreadTaskFuture[str]] = []

        def slow_first_callback() -> None:
            # Runs first, on the cancelling thread, before the link to the task's token:
            # the task is woken by the flag meanwhile and returns.
            concurrent.futures.wait(futures, WAIT)

        source.on_cancel(slow_first_callback)

        started = threading.Event()

        def task() -> str:
            started.set()
            source.wait_blocking(WAIT)
            return "returned"

        futures.append(pool.submit_task(task, token=source))
        wait(started)
        source.cancel("stop")
        with pytest.raises(CancelledException) as info:
            futures[0].result(WAIT)
        assert info.value.reason == "stop"
        assert fate(futures[0]) == "cancelled"


def _timer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "cancelflow-timer"]


class TestTimerThreadHold:
    """An open pool keeps the timer thread; a shut-down or dropped one lets it go."""

    def test_a_task_abandoned_after_shutdown_does_not_keep_the_timer_thread(self) -> None:
        """Test that abandoning a task after shutdown (its replacement runs the queued
        tasks) leaves no hold on the timer thread, which then ends."""
        from cancelflow import _timer

        started, release = threading.Event(), threading.Event()
        pool = ThreadPool(1, grace_period=0.01)
        try:
            stuck_future = pool.submit(stuck(started, release))
            wait(started)
            queued = pool.submit(lambda: "queued")
            pool.shutdown(wait=False, cancel_running=True)
            assert queued.result(WAIT) == "queued"  # run by the stuck thread's replacement
            assert fate(stuck_future) == "abandoned"
            assert not _timer._holds
            assert wait_until(lambda: not _timer_threads())
        finally:
            release.set()
            pool.shutdown(wait=True)

    def test_shutdown_with_wait_returns_once_the_timer_thread_it_kept_has_ended(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that shutdown(wait=True) of the pool that kept the timer thread up returns
        only once that thread has ended, even when it is slow to leave (a loaded machine:
        the contract suite found it alive after shutdown)."""
        from cancelflow import _timer

        pool = ThreadPool(1)
        assert pool.submit(abs, -1).result(WAIT) == 1
        assert _timer_threads()
        leaving, returned = threading.Event(), threading.Event()
        next_due = _timer._next_due

        def slow_to_leave() -> tuple[Any, float | None]:
            due = next_due()
            if due[1] is None and not _timer._holds:  # it is about to leave
                leaving.set()
                returned.wait(0.2)  # leaves on its own if shutdown (rightly) waits for it
            return due

        monkeypatch.setattr(_timer, "_next_due", slow_to_leave)
        pool.shutdown(wait=True)
        alive = _timer_threads()
        returned.set()
        assert leaving.is_set()
        assert alive == []

    def test_shutdown_with_wait_does_not_wait_for_a_callback_of_someone_else(self) -> None:
        """Test that shutdown(wait=True) does not wait for the timer thread while it runs a
        callback that is not the pool's (here a token timeout's, which waits for a lock
        the caller of shutdown holds: waiting for it would deadlock)."""
        pool = ThreadPool(1)
        assert pool.submit(abs, -1).result(WAIT) == 1
        app_lock = threading.Lock()
        entered = threading.Event()

        def on_timeout() -> None:
            entered.set()
            with app_lock:
                pass

        with app_lock:
            token = CancellationToken(timeout=0.001)
            token.on_cancel(on_timeout)
            wait(entered)
            closer = threading.Thread(target=pool.shutdown, kwargs={"wait": True})
            closer.start()
            closer.join(WAIT)
            deadlocked = closer.is_alive()
        closer.join(WAIT)
        assert not deadlocked, "shutdown(wait=True) waited for a callback that waits for it"

    def test_a_pool_dropped_without_shutdown_lets_the_timer_thread_go(self) -> None:
        """Test that a pool collected without a shutdown (broken by its initializer, so
        its threads are gone) gives its hold on the timer thread back."""
        import gc
        import weakref

        from cancelflow import _timer

        def fail() -> None:
            raise RuntimeError("initializer fails")

        pool = ThreadPool(1, initializer=fail)
        with pytest.raises(BrokenPoolError):
            pool.submit(int).result(WAIT)
        collected = weakref.ref(pool)
        del pool
        # Its thread holds it until the thread has ended; then only a cycle is left.
        assert wait_until(lambda: gc.collect() >= 0 and collected() is None)
        assert not _timer._holds
        assert wait_until(lambda: not _timer_threads())


def _has_idle_threads(pool: ThreadPool, count: int) -> bool:
    return bool(pool._idle == count)


def _threads_named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


class TestDroppedWithoutShutdown:
    """A pool dropped without ``shutdown()`` ends its threads once its work is done, as
    the stdlib's ``ThreadPoolExecutor`` does; its work is not lost."""

    def test_its_threads_end_and_its_map_results_can_still_be_read(self) -> None:
        """Test that a pool dropped while its map's results are unread is collected,
        its threads end, and every result is still there."""
        import gc

        pool = ThreadPool(5, thread_name_prefix="dropped-map")
        results = pool.map(abs, range(-5, 5))
        threads = _threads_named("dropped-map")
        assert threads
        del pool
        gc.collect()
        for thread in threads:
            thread.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        assert list(results) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]

    def test_a_task_submitted_right_before_the_drop_still_runs(self) -> None:
        """Test that a task submitted to a pool nobody keeps runs, then the threads end."""
        import gc

        ran = threading.Event()
        ThreadPool(2, thread_name_prefix="dropped-submit").submit(ran.set)
        gc.collect()
        assert ran.wait(WAIT)
        assert wait_until(lambda: gc.collect() >= 0 and not _threads_named("dropped-submit"))

    def test_a_running_task_keeps_its_pool_until_it_returns(self) -> None:
        """Test that a pool dropped while a task runs keeps its thread until the task
        returned (and the future gets its result), then the thread ends."""
        import gc

        started, release = threading.Event(), threading.Event()

        def task() -> str:
            started.set()
            assert release.wait(WAIT)
            return "returned"

        future = ThreadPool(1, thread_name_prefix="dropped-running").submit(task)
        wait(started)
        gc.collect()
        assert _threads_named("dropped-running")
        release.set()
        assert future.result(WAIT) == "returned"
        assert wait_until(lambda: gc.collect() >= 0 and not _threads_named("dropped-running"))
        assert future.cancel() is False  # its pool is gone: a done future stays done
        assert fate(future) == "finished"

    def test_queued_work_of_a_dropped_pool_all_runs(self) -> None:
        """Test that every task queued behind a busy thread of a dropped pool runs."""
        import gc

        started, release = threading.Event(), threading.Event()
        ran: list[int] = []

        def first() -> None:
            started.set()
            assert release.wait(WAIT)

        pool = ThreadPool(1, thread_name_prefix="dropped-queue")
        pool.submit(first)
        wait(started)
        futures = [pool.submit(ran.append, n) for n in range(20)]
        del pool
        gc.collect()
        release.set()
        for future in futures:
            future.result(WAIT)
        assert ran == list(range(20))
        assert wait_until(lambda: gc.collect() >= 0 and not _threads_named("dropped-queue"))

    def test_a_pool_let_go_just_as_its_thread_goes_idle_ends_the_thread(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a worker going idle ends when the pool's last other reference goes
        away while that worker looks at its pool: a look that makes a reference (its
        weak reference called) then holds the last one, and the pool's finalizer runs on
        the worker's own thread, before it waits.

        Regression: the worker looked with ``ref() is not None`` and then waited, so the
        finalizer's wake-up came before the wait and was lost: the thread waited for
        good. On a free-threaded build a reference another thread drops is merged by the
        pool's owner thread later, at any moment, so any look could hold the last one.
        Here the pool is made on a thread that has ended (its reference counts merge at
        once), and the other reference is let go from inside the look; a worker that
        makes no reference to look waits idle, and the test lets go then.
        """
        from cancelflow import _thread_pool

        holder: list[ThreadPool] = []

        class LetGoWhileLooking(weakref.ref[ThreadPool]):
            """As the idle worker (holding the pool's lock, nothing queued) calls it, the
            holder lets the pool go."""

            def __call__(self) -> ThreadPool | None:
                found = super().__call__()
                owned = found is not None and found._lock._is_owned()  # type: ignore[attr-defined]
                if found is not None and holder and owned and not found._queue:
                    holder.clear()
                return found

        real_worker_main = _thread_pool._worker_main

        def worker_main(ref: weakref.ref[ThreadPool], worker: Any) -> None:
            real_worker_main(LetGoWhileLooking(ref()), worker)  # type: ignore[arg-type]

        monkeypatch.setattr(_thread_pool, "_worker_main", worker_main)
        go = threading.Event()
        conds: list[threading.Condition] = []

        def make() -> None:
            holder.append(ThreadPool(1, thread_name_prefix="dropped-looking"))
            conds.append(holder[0]._cond)
            holder[0].submit(go.wait, WAIT)

        maker = threading.Thread(target=make)
        maker.start()
        maker.join(WAIT)
        (thread,) = _threads_named("dropped-looking")
        go.set()  # the task returns, and the thread goes idle
        assert wait_until(lambda: len(conds[0]._waiters) == 1)  # type: ignore[attr-defined]
        holder.clear()  # (if the look has not let go of it already)
        thread.join(WAIT)
        assert not thread.is_alive(), "the thread waits for a pool that is gone"

    def test_a_task_submitted_to_an_idle_pool_right_before_the_drop_still_runs(self) -> None:
        """Test that a task given to a pool whose thread waits idle (holding no reference
        to it) runs even when the pool is dropped right after the submit."""
        pool = ThreadPool(1, thread_name_prefix="dropped-idle")
        assert pool.submit(int).result(WAIT) == 0
        assert wait_until(functools.partial(_has_idle_threads, pool, 1))  # it waits for work
        ran = threading.Event()
        pool.submit(ran.set)
        del pool
        assert ran.wait(WAIT)
        assert wait_until(lambda: not _threads_named("dropped-idle"))
