"""``cancelflow.ThreadPool`` keeps the ``concurrent.futures.ThreadPoolExecutor`` contract.

Users move to :class:`~cancelflow.ThreadPool` from the stdlib executor, so every behaviour
the stdlib documents must hold, except where it conflicts with cancelling running work
(a ``ThreadTaskFuture.cancel()`` also stops a running task). Each class pins one part of
that contract; tests that need a fresh interpreter (interpreter exit, signal handlers
that could deadlock) run a short script with the venv's interpreter under a watchdog.
"""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures.thread import BrokenThreadPool

import psutil
import pytest

from cancelflow import BrokenPoolError, CancelledException, PoolClosedError
from cancelflow._context import current_token
from cancelflow._thread_pool import ThreadPool
from support import WAIT, run_script, wait


def blocker(started: threading.Event, release: threading.Event) -> Callable[[], str]:
    """A task that announces it runs, then returns ``"late"`` once the test releases it."""

    def task() -> str:
        started.set()
        assert release.wait(WAIT)
        return "late"

    return task


def idle_event(pool: ThreadPool) -> threading.Event:
    """An event set each time a worker of ``pool`` starts waiting for work (it is idle)."""
    event = threading.Event()
    cond = pool._cond
    real_wait = cond.wait

    def spy(timeout: float | None = None) -> bool:
        if threading.current_thread() is not threading.main_thread():
            event.set()
        return real_wait(timeout)

    cond.wait = spy  # type: ignore[method-assign]
    return event


class TestConstructor:
    def test_stdlib_positional_signature(self) -> None:
        """Test that ThreadPool takes ThreadPoolExecutor's arguments, positionally too."""
        seen: list[tuple[str, int]] = []
        with ThreadPool(1, "compat", lambda n: seen.append(("init", n)), (5,)) as pool:
            assert pool.submit(threading.current_thread).result(WAIT).name == "compat_0"
        assert seen == [("init", 5)]

    def test_initializer_runs_in_each_worker_before_its_first_task(self) -> None:
        """Test that every new worker thread runs initializer(*initargs) before it takes work."""
        initialized: set[str] = set()
        lock = threading.Lock()

        def init(tag: str) -> None:
            with lock:
                initialized.add(f"{tag}:{threading.current_thread().name}")

        both = threading.Barrier(2, timeout=WAIT)

        def task() -> str:
            name = threading.current_thread().name
            with lock:
                assert f"ready:{name}" in initialized
            both.wait()  # two tasks at once: two workers
            return name

        with ThreadPool(2, initializer=init, initargs=("ready",)) as pool:
            names = {f.result(WAIT) for f in [pool.submit(task), pool.submit(task)]}
        assert len(names) == 2
        assert initialized == {f"ready:{name}" for name in names}

    def test_failing_initializer_breaks_the_pool(self) -> None:
        """Test that an initializer that raises fails pending futures and later submits with BrokenPoolError."""

        def init() -> None:
            raise OSError("no database")

        pool = ThreadPool(1, initializer=init)
        try:
            future = pool.submit(lambda: "never")
            with pytest.raises(BrokenPoolError) as info:
                future.result(WAIT)
            assert isinstance(info.value, BrokenThreadPool)
            assert isinstance(info.value.__cause__, OSError)
            with pytest.raises(BrokenThreadPool):
                pool.submit(lambda: "never")
        finally:
            pool.shutdown(wait=True)
        assert pool.statistics().workers == 0

    def test_non_callable_initializer_raises_before_anything_starts(self) -> None:
        """Test that a non-callable initializer raises the stdlib's TypeError at construction."""
        with pytest.raises(TypeError, match=r"^initializer must be a callable$"):
            ThreadPool(1, initializer=42)  # type: ignore[arg-type]

    def test_thread_name_prefix_names_threads_like_the_stdlib(self) -> None:
        """Test that with thread_name_prefix the workers are named f"{prefix}_{n}", n from 0."""
        both = threading.Barrier(2, timeout=WAIT)

        def task() -> str:
            both.wait()
            return threading.current_thread().name

        with ThreadPool(2, thread_name_prefix="SpecialPool") as pool:
            names = {f.result(WAIT) for f in [pool.submit(task), pool.submit(task)]}
        assert names == {"SpecialPool_0", "SpecialPool_1"}

    @pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
    def test_the_default_size_is_the_stdlibs_on_this_python(self) -> None:
        """Test that ThreadPool() allows as many threads as ThreadPoolExecutor() in a
        thread allowed on one CPU: from 3.13 the stdlib counts the CPUs it may run on
        (regression: cancelflow counted all of the machine's)."""
        found: list[int] = []

        def compare() -> None:
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
            stdlib = concurrent.futures.ThreadPoolExecutor()
            with ThreadPool() as pool:
                size = re.search(r"max_workers=(\d+)", repr(pool))
                assert size is not None
                found.extend([stdlib._max_workers, int(size.group(1))])
            stdlib.shutdown()

        thread = threading.Thread(target=compare)  # the affinity is this thread's alone
        thread.start()
        thread.join(WAIT)
        assert len(found) == 2
        assert found[1] == found[0]

    @pytest.mark.parametrize("max_workers", [0, -1])
    def test_max_workers_error_uses_stdlib_wording(self, max_workers: int) -> None:
        """Test that a max_workers below 1 raises the stdlib's ValueError message."""
        with pytest.raises(ValueError, match=r"^max_workers must be greater than 0$"):
            ThreadPool(max_workers)


class TestMap:
    @pytest.mark.parametrize("chunksize", [0, -1])
    def test_chunksize_below_one_raises(self, one_worker: ThreadPool, chunksize: int) -> None:
        """Test that map refuses a chunksize below 1 with ProcessPoolExecutor's ValueError and submits nothing."""
        with pytest.raises(ValueError, match=r"^chunksize must be >= 1\.$"):
            one_worker.map(abs, range(3), chunksize=chunksize)
        assert one_worker.statistics().workers == 0

    def test_chunksize_not_an_int_raises(self, one_worker: ThreadPool) -> None:
        """Test that map refuses a chunksize that is not an int with TypeError."""
        with pytest.raises(TypeError, match="chunksize"):
            one_worker.map(abs, range(3), chunksize=1.5)  # type: ignore[arg-type]

    def test_chunksize_is_ignored_and_results_keep_order(self, one_worker: ThreadPool) -> None:
        """Test that a valid chunksize changes nothing: results come in input order."""
        assert list(one_worker.map(abs, range(-7, 0), chunksize=3)) == [7, 6, 5, 4, 3, 2, 1]

    def test_iterables_consumed_at_call_time(self, one_worker: ThreadPool) -> None:
        """Test that map consumes its iterables (and submits every call) before it returns."""
        pulled: list[int] = []

        def numbers() -> Iterator[int]:
            for n in range(4):
                pulled.append(n)
                yield n

        results = one_worker.map(abs, numbers())
        assert pulled == [0, 1, 2, 3]
        assert list(results) == [0, 1, 2, 3]

    def test_timeout_raises_and_cancels_remaining_calls(self, one_worker: ThreadPool) -> None:
        """Test that map's timeout raises TimeoutError and the calls not yet run never run."""
        ran: list[int] = []

        def task(n: int) -> int:
            ran.append(n)
            if n == 0:
                current_token().wait_blocking(WAIT)  # still running when the timeout passes
            return n

        results = one_worker.map(task, range(3), timeout=0.01)
        with pytest.raises(TimeoutError):
            next(results)
        assert one_worker.submit(lambda: "drained").result(WAIT) == "drained"
        assert ran in ([], [0])  # the first call may not have started by the timeout

    def test_buffersize_submits_only_that_many_calls_ahead(self, one_worker: ThreadPool) -> None:
        """Test that map(buffersize=2) reads two arguments before it returns and one more
        each time a result is asked for (Python 3.14's argument, on every version)."""
        pulled: list[int] = []

        def numbers() -> Iterator[int]:
            for n in range(5):
                pulled.append(n)
                yield n

        results = one_worker.map(abs, numbers(), buffersize=2)
        assert pulled == [0, 1]
        assert next(results) == 0
        assert pulled == [0, 1, 2]
        assert list(results) == [1, 2, 3, 4]

    def test_buffersize_maps_an_endless_iterable(self, one_worker: ThreadPool) -> None:
        """Test that map over itertools.count() with buffersize yields in order, and that
        closing it cancels the calls still queued."""
        results = one_worker.map(abs, itertools.count(), buffersize=4)
        assert [next(results) for _ in range(20)] == list(range(20))
        results.close()  # type: ignore[attr-defined]  # (Executor.map says Iterator)
        assert one_worker.submit(lambda: "drained").result(WAIT) == "drained"
        assert one_worker.statistics().queued == 0

    def test_a_map_closed_before_its_first_result_cancels_every_call(
        self, one_worker: ThreadPool
    ) -> None:
        """Test that closing map's iterator before the first next() cancels the calls it
        submitted (regression: a generator that never started ran no cleanup, so they
        all ran)."""
        started, release = threading.Event(), threading.Event()

        def block() -> bool:
            started.set()
            return release.wait(WAIT)

        blocker = one_worker.submit(block)
        assert started.wait(WAIT)
        results = one_worker.map(abs, range(5))
        assert one_worker.statistics().queued == 5
        results.close()  # type: ignore[attr-defined]  # (Executor.map says Iterator)
        assert one_worker.statistics().queued == 0
        assert one_worker.statistics().cancelled == 5
        release.set()
        assert blocker.result(WAIT) is True

    def test_a_map_never_iterated_runs_every_call(self, one_worker: ThreadPool) -> None:
        """Test that a map whose result is dropped unread still runs every call, as the
        stdlib's does (CPython's test_map_submits_without_iteration: fire and forget)."""
        ran: list[int] = []
        one_worker.map(ran.append, range(10))
        gc.collect()
        one_worker.shutdown(wait=True)
        assert sorted(ran) == list(range(10))

    def test_an_error_of_the_iterable_comes_out_of_next_with_buffersize(
        self, one_worker: ThreadPool
    ) -> None:
        """Test that, read lazily, an iterable's error is raised by the next() that reads
        it (not by map), after the results before it."""

        def numbers() -> Iterator[int]:
            yield 1
            yield 2
            raise LookupError("the iterable broke")

        results = one_worker.map(abs, numbers(), buffersize=1)
        assert next(results) == 1  # (reads 2 first)
        with pytest.raises(LookupError, match="the iterable broke"):
            next(results)

    @pytest.mark.parametrize(
        ("buffersize", "error"),
        [(0, ValueError), (-2, ValueError), (1.0, TypeError), (True, TypeError)],
    )
    def test_a_bad_buffersize_raises_before_anything_runs(
        self, one_worker: ThreadPool, buffersize: object, error: type[Exception]
    ) -> None:
        """Test that an invalid buffersize raises at once, naming it, and submits nothing."""
        with pytest.raises(error, match="buffersize"):
            one_worker.map(abs, range(3), buffersize=buffersize)  # type: ignore[arg-type]
        assert one_worker.statistics().workers == 0


class TestShutdown:
    def test_cancel_futures_cancels_only_queued_tasks(self, one_worker: ThreadPool) -> None:
        """Test that shutdown(cancel_futures=True) cancels queued futures and lets the running task finish."""
        started, release = threading.Event(), threading.Event()
        running = one_worker.submit(blocker(started, release))
        queued = one_worker.submit(lambda: "never")
        wait(started)
        # The running task may return only once shutdown has cancelled the queued one.
        queued.add_done_callback(lambda _: release.set())
        one_worker.shutdown(wait=True, cancel_futures=True)
        assert queued.cancelled()
        assert queued.cancel_reason == "pool shut down"
        assert not running.cancelled()
        assert running.result(0) == "late"
        assert running.cancel_reason is None

    def test_cancel_futures_without_wait_leaves_running_task_running(
        self, one_worker: ThreadPool
    ) -> None:
        """Test that shutdown(wait=False, cancel_futures=True) neither cancels nor waits for the running task."""
        started, release = threading.Event(), threading.Event()
        running = one_worker.submit(blocker(started, release))
        queued = one_worker.submit(lambda: "never")
        wait(started)
        one_worker.shutdown(wait=False, cancel_futures=True)
        try:
            assert queued.cancelled()
            assert running.running()
        finally:
            release.set()
        assert running.result(WAIT) == "late"

    def test_cancel_running_stops_running_task(self, one_worker: ThreadPool) -> None:
        """Test that shutdown(cancel_running=True) cancels the running task's token with "pool shut down"."""
        started = threading.Event()

        def task() -> None:
            started.set()
            current_token().wait_blocking(WAIT)
            current_token().raise_if_cancelled()

        running = one_worker.submit(task)
        wait(started)
        one_worker.shutdown(wait=True, cancel_running=True)
        with pytest.raises(CancelledException) as info:
            running.result(0)
        assert info.value.reason == "pool shut down"
        assert running.fate == "cancelled"


class TestInterpreterExit:
    def test_queued_and_running_work_finishes_at_exit(self) -> None:
        """Test that work still queued or running when the main thread ends runs to completion, silently."""
        result = run_script(
            """
            import threading
            from cancelflow import ThreadPool

            pool = ThreadPool(1)
            main_ended = threading.Event()
            # Registered after cancelflow's hook, so it runs first: the main thread has ended
            # and the pool's hook has not run yet.
            threading._register_atexit(main_ended.set)

            def task(n):
                assert main_ended.wait(30)
                print(f"ran {n}", flush=True)

            for n in range(20):
                pool.submit(task, n)
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert result.stdout.split("\n") == [f"ran {n}" for n in range(20)] + [""]

    def test_submit_after_exit_began_raises_runtime_error(self) -> None:
        """Test that a submit from a non-daemon thread once the interpreter is exiting raises the stdlib's RuntimeError."""
        result = run_script(
            """
            import threading
            from cancelflow import ThreadPool

            pool = ThreadPool(1)
            pool.submit(int).result()

            def late():
                threading.main_thread().join()  # returns once the exit hooks have run
                try:
                    pool.submit(print, "must not run")
                except RuntimeError as exc:
                    print(f"{type(exc).__name__}: {exc}", flush=True)

            threading.Thread(target=late).start()
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert result.stdout == (
            "RuntimeError: cannot schedule new futures after interpreter shutdown\n"
        )


class Holder:
    """Something a task refers to through ``self`` of a bound method."""

    def method(self, arg: object) -> Holder:
        return Holder()


class TestReferences:
    def test_idle_worker_drops_last_task(self) -> None:
        """Test that an idle worker keeps no reference to its last task's callable, argument or result."""
        pool = ThreadPool(1)
        try:
            idle = idle_event(pool)
            holder, arg = Holder(), Holder()
            future = pool.submit(holder.method, arg)
            result = future.result(WAIT)
            refs = [weakref.ref(holder), weakref.ref(arg), weakref.ref(result)]
            del holder, arg, result, future
            wait(idle)
            gc.collect()
            assert [ref() for ref in refs] == [None, None, None]
        finally:
            pool.shutdown(wait=True)

    def test_finished_future_drops_callable_and_arguments(self) -> None:
        """Test that a finished future the caller keeps holds no reference to the task's callable or arguments."""
        pool = ThreadPool(1)
        try:
            idle = idle_event(pool)
            holder, arg = Holder(), Holder()
            future = pool.submit(holder.method, arg)
            future.result(WAIT)
            refs = [weakref.ref(holder), weakref.ref(arg)]
            del holder, arg
            wait(idle)
            gc.collect()
            assert [ref() for ref in refs] == [None, None]
            assert future.done()
        finally:
            pool.shutdown(wait=True)

    def test_cancelled_queued_future_drops_callable_and_arguments(
        self, one_worker: ThreadPool
    ) -> None:
        """Test that a queued future, once cancelled, holds no reference to the task's callable or arguments."""
        started, release = threading.Event(), threading.Event()
        try:
            one_worker.submit(blocker(started, release))
            wait(started)
            holder, arg = Holder(), Holder()
            queued = one_worker.submit(holder.method, arg)
            refs = [weakref.ref(holder), weakref.ref(arg)]
            del holder, arg
            assert queued.cancel()
            gc.collect()
            assert [ref() for ref in refs] == [None, None]
            assert queued.cancelled()
        finally:
            release.set()


class TestFutureStates:
    def test_states_follow_the_stdlib(self, one_worker: ThreadPool) -> None:
        """Test that running(), done() and cancelled() read as the stdlib's for queued, running, finished and cancelled tasks."""
        started, release = threading.Event(), threading.Event()
        running = one_worker.submit(blocker(started, release))
        queued = one_worker.submit(lambda: "queued")
        doomed = one_worker.submit(lambda: "doomed")
        wait(started)
        try:
            assert (running.running(), running.done(), running.cancelled()) == (True, False, False)
            assert (queued.running(), queued.done(), queued.cancelled()) == (False, False, False)
            assert doomed.cancel()
            assert (doomed.running(), doomed.done(), doomed.cancelled()) == (False, True, True)
        finally:
            release.set()
        assert queued.result(WAIT) == "queued"
        for future in (running, queued):
            assert (future.running(), future.done(), future.cancelled()) == (False, True, False)

    def test_wait_and_as_completed_see_finished_and_cancelled(self, one_worker: ThreadPool) -> None:
        """Test that concurrent.futures.wait and as_completed report finished and cancelled futures."""
        started, release = threading.Event(), threading.Event()
        running = one_worker.submit(blocker(started, release))
        queued = one_worker.submit(lambda: "queued")
        wait(started)
        queued.cancel()
        done, not_done = concurrent.futures.wait(
            [running, queued], WAIT, return_when=concurrent.futures.FIRST_COMPLETED
        )
        assert (done, not_done) == ({queued}, {running})
        release.set()
        assert set(concurrent.futures.as_completed([running, queued], WAIT)) == {running, queued}
        assert running.result(0) == "late"


# The main thread takes the pool's lock in the method under test; right then a signal
# handler cancels the token of a queued task and of the running one (running the pool's
# on_cancel callbacks on this same thread). It must neither deadlock nor lose a cancel.
SIGNAL_UNDER_POOL_LOCK = """
    import signal, sys, threading
    from cancelflow import CancellationToken, ThreadPool
    from support import SignallingLock

    method = sys.argv[1]
    pool = ThreadPool(1, grace_period=30)
    started = threading.Event()
    running_token, queued_token = CancellationToken(), CancellationToken()

    def running_task():
        started.set()
        running_token.wait_blocking(30)

    running = pool.submit_task(running_task, token=running_token)
    assert started.wait(30)
    queued = pool.submit_task(print, ("must not run",), token=queued_token)
    signal.signal(
        signal.SIGUSR1, lambda *_: (queued_token.cancel("signal"), running_token.cancel("signal"))
    )

    # The pool's own lock; the first time the main thread takes it once armed, the
    # signal is raised (its handler runs before raise_signal returns).
    pool._lock = SignallingLock(pool._lock)
    pool._lock.armed = True
    if method == "submit":
        pool.submit(int, "1")
    elif method == "submit_task":
        pool.submit_task(int, ("1",))
    elif method == "statistics":
        pool.statistics()
    elif method == "shutdown":
        pool.shutdown(wait=True)
    assert not pool._lock.armed, "the signal was never raised"
    assert queued.cancel_reason == "signal" and queued.done()
    assert running.cancel_reason == "signal" and running.done()
    pool.shutdown(wait=True)
    print("ok")
"""

# The main thread is inside Thread.start() of a new worker (holding threading's module
# lock) when a signal handler cancels a running task, whose grace timer needs a thread.
SIGNAL_DURING_WORKER_START = """
    import signal, threading
    from cancelflow import CancellationToken, ThreadPool

    pool = ThreadPool(2, grace_period=30)
    started = threading.Event()
    token = CancellationToken()

    def running_task():
        started.set()
        token.wait_blocking(30)

    running = pool.submit_task(running_task, token=token)
    assert started.wait(30)
    signal.signal(signal.SIGUSR1, lambda *_: token.cancel("signal"))

    class SignallingLimbo(dict):
        armed = True
        def __setitem__(self, thread, value):
            super().__setitem__(thread, value)
            if self.armed and thread.name.startswith("cancelflow-thread-"):
                self.armed = False
                signal.raise_signal(signal.SIGUSR1)

    threading._limbo = SignallingLimbo(threading._limbo)
    second = pool.submit(lambda: "second")  # starts a second worker
    assert not threading._limbo.armed, "the signal was never raised"
    assert second.result(30) == "second"
    assert running.cancel_reason == "signal"
    pool.shutdown(wait=True)
    print("ok")
"""

# The main thread is inside as_completed(), holding its waiter's lock for a moment, when
# a signal handler cancels one of the futures it waits for.
SIGNAL_IN_AS_COMPLETED = """
    import signal, threading
    from concurrent.futures import _base, as_completed
    from cancelflow import CancellationToken, ThreadPool
    from support import SignallingLock

    pool = ThreadPool(1, grace_period=30)
    started, release = threading.Event(), threading.Event()

    def running_task():
        started.set()
        release.wait(30)

    running = pool.submit(running_task)
    assert started.wait(30)
    token = CancellationToken()
    queued = pool.submit_task(print, ("must not run",), token=token)
    signal.signal(signal.SIGUSR1, lambda *_: token.cancel("signal"))
    locks = []

    real_init = _base._AsCompletedWaiter.__init__
    def init(self):
        real_init(self)
        self.lock = SignallingLock(self.lock)
        self.lock.armed = not locks  # the first waiter's lock only
        locks.append(self.lock)
    _base._AsCompletedWaiter.__init__ = init
    try:
        try:
            # A short timeout only gets the main thread into the locked block at once.
            for future in as_completed([queued], timeout=0.01):
                assert future is queued
        except TimeoutError:
            pass
        assert locks and not locks[0].armed, "the signal was never raised"
        assert queued.done() and queued.cancel_reason == "signal"
    finally:
        release.set()
    pool.shutdown(wait=True)
    print("ok")
"""


class TestSignalHandlers:
    @pytest.mark.parametrize("method", ["submit", "submit_task", "statistics", "shutdown"])
    def test_cancel_in_handler_while_pool_lock_held(self, method: str) -> None:
        """Test that a handler cancelling tasks while the main thread holds the pool's lock neither deadlocks nor loses the cancel."""
        result = run_script(SIGNAL_UNDER_POOL_LOCK, method)
        assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr

    def test_cancel_in_handler_while_submit_starts_a_worker(self) -> None:
        """Test that a handler cancelling a running task while submit() is starting a worker thread does not deadlock."""
        result = run_script(SIGNAL_DURING_WORKER_START)
        assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr

    def test_cancel_in_handler_while_as_completed_holds_its_lock(self) -> None:
        """Test that a handler cancelling a future while the main thread is inside as_completed() does not deadlock."""
        result = run_script(SIGNAL_IN_AS_COMPLETED)
        assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr


def wait_child(pid: int) -> int:
    """The exit code of forked child ``pid``; kills it and fails if it does not end in time."""
    child = psutil.Process(pid)
    try:
        code = child.wait(timeout=WAIT)
    except psutil.TimeoutExpired:
        child.kill()
        child.wait()
        pytest.fail("watchdog: the forked child hung")
    assert code is not None
    return code


class TestFork:
    def test_child_cannot_use_parent_pool(self, one_worker: ThreadPool) -> None:
        """Test that in a forked child the parent's pool refuses work and shuts down at once."""
        assert one_worker.submit(lambda: 1).result(WAIT) == 1  # the parent has a worker
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 99
            try:
                try:
                    one_worker.submit(lambda: 2)
                    code = 1
                except PoolClosedError as exc:
                    code = 0 if "parent" in str(exc) else 2
                one_worker.shutdown(wait=True)
                one_worker.statistics()
            finally:
                os._exit(code)
        assert wait_child(pid) == 0
        assert one_worker.submit(lambda: 3).result(WAIT) == 3  # the parent's pool still works

    def test_child_exits_normally_with_parent_pool(self) -> None:
        """Test that a forked child that exits normally is not held up by the parent's pool at exit."""
        result = run_script(
            """
            import faulthandler, os, sys, warnings
            from cancelflow import ThreadPool

            # Python 3.12+ warns about any fork of a threaded process: that is this
            # program's own choice here, not something the pool says.
            warnings.filterwarnings("ignore", "This process", DeprecationWarning)
            pool = ThreadPool(2)
            pool.submit(int).result()
            # faulthandler's watchdog thread does not survive a fork, and a child that
            # exits with it armed hangs in CPython itself: disarm it around the fork.
            faulthandler.cancel_dump_traceback_later()
            pid = os.fork()
            if pid == 0:
                faulthandler.dump_traceback_later(30, exit=True)
                sys.exit(7)  # through interpreter exit: the pools' exit hook runs
            faulthandler.dump_traceback_later(30, exit=True)
            _, status = os.waitpid(pid, 0)
            print(os.waitstatus_to_exitcode(status))
            pool.shutdown()
            """
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, "7\n", "")
