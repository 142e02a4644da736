"""The pool contract (``cancelflow._backends._base.PoolBackend``), one suite for every backend.

Each test states one promise of the protocol's docstring and runs, with the same body, on
each backend (as trio and anyio run one suite over their backends):

* ``thread``: a :class:`cancelflow.ThreadPool` (default size), made for the test;
* ``process``: a :class:`cancelflow.ProcessPool` of 2 workers, made for the test;
* ``dask``: a :class:`cancelflow.DaskRunner` (``run_in="process"``, its default) with its
  own client, on one ``distributed.LocalCluster`` per module (1 worker process, 2
  threads, 127.0.0.1 only, dashboard on a free 127.0.0.1 port), started and closed by
  the ``dask_cluster`` fixture.

A test body is ``async def body(pool)``; ``backend.run(body)`` makes the pool, runs the
body in a fresh event loop, then stops the pool (and, for Dask, checks that nothing of the
test is left on the worker or the scheduler). Task functions live in
``tests/backendloads.py`` so that every backend's workers import them by name.
Synchronisation is by the tasks' partial results (awaited), their tokens and files; no
test sleeps or measures time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psutil
import pytest

import backendloads
from cancelflow import (
    CancellationToken,
    CancelledException,
    DaskRunner,
    Fate,
    PipelineTimeoutException,
    PoolClosedError,
    ProcessPool,
    ThreadPool,
)
from cancelflow._backends._base import PoolBackend
from support import WAIT

if TYPE_CHECKING:
    # mypy proves that each backend fits the protocol (run it on this file).
    _thread: PoolBackend = ThreadPool()
    _process: PoolBackend = ProcessPool(2)
    _dask: PoolBackend = DaskRunner("tcp://127.0.0.1:8786")

T = TypeVar("T")
Body = Callable[[PoolBackend], Awaitable[None]]


# -- helpers ---------------------------------------------------------------------------------
class Reports:
    """A partial_sink that records every call in order and lets the test await a key
    (called from any thread: the task's, a supervisor's, a client loop's)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self._loop = asyncio.get_running_loop()
        self._events: dict[str, asyncio.Event] = {}

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.log)

    def _event(self, key: str) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())

    def __call__(self, key: str, value: Any) -> None:
        self.log.append((key, value))
        with contextlib.suppress(RuntimeError):  # the test's loop is closed: nobody waits
            self._loop.call_soon_threadsafe(lambda: self._event(key).set())

    async def wait(self, key: str) -> Any:
        """The value stored under ``key``, once the task stored it (watchdog ``WAIT``)."""
        try:
            await asyncio.wait_for(self._event(key).wait(), WAIT)
        except TimeoutError:
            pytest.fail(f"watchdog: the task never stored {key!r} (got {self.log})")
        return self.values[key]


async def off_loop(fn: Callable[[], T]) -> T:
    """``fn()`` in a thread of its own (joined before this returns): a call that may
    block, such as ``shutdown(wait=True)``, never blocks the event loop."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, result)

    thread = threading.Thread(target=work, name="contract-off-loop")
    thread.start()
    try:
        return await done
    finally:
        thread.join()


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


class Backend:
    """One backend under test: makes its pool, runs a test body, stops the pool."""

    def __init__(self, name: str, cluster: Any = None) -> None:
        self.name = name
        self.cluster = cluster
        self._threads: set[threading.Thread] = set()
        self._processes: set[int] = set()

    def _make(self) -> PoolBackend:
        if self.name == "thread":
            return ThreadPool()
        if self.name == "process":
            return ProcessPool(2)
        return DaskRunner(self.cluster.scheduler_address)

    def leftovers(self) -> dict[str, list[Any]]:
        """Threads of this process and processes under it that did not exist before the
        pool was made, and still run (a process not reaped yet counts)."""
        threads = [t.name for t in threading.enumerate() if t not in self._threads and t.is_alive()]
        processes = []
        for pid in _descendants() - self._processes:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                processes.append(f"{pid} {proc.status()} {' '.join(proc.cmdline())[:80]}")
        return {"threads": threads, "processes": processes}

    def run(self, body: Body) -> None:
        self._threads = set(threading.enumerate())
        self._processes = _descendants()
        asyncio.run(asyncio.wait_for(self._main(body), WAIT * 2))

    async def _main(self, body: Body) -> None:
        pool = self._make()
        passed = False
        try:
            await body(pool)
            passed = True
        finally:
            if isinstance(pool, DaskRunner):
                if passed and pool.client is not None:
                    from dasksupport import assert_workers_clean

                    await assert_workers_clean(pool.client)
                await pool.aclose()
            elif isinstance(pool, (ThreadPool, ProcessPool)):
                pool.shutdown(wait=True, cancel_futures=True, cancel_running=True)


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Any]:
    """One warm LocalCluster (1 worker process, 2 threads) for the module's Dask tests."""
    pytest.importorskip("distributed", reason="cancelflow[dask] is not installed")
    from dasksupport import warm_process_cluster

    cluster = warm_process_cluster(n_workers=1, threads_per_worker=2)
    try:
        yield cluster
    finally:
        cluster.close()


# Module-scoped so that pytest runs every thread test, then every process test, then the
# Dask ones: the module's cluster (which opens sockets in this process whenever its
# workers connect) only starts once the per-test leak checks of the others are done.
@pytest.fixture(
    scope="module",
    params=[
        "thread",
        "process",
        # The module's cluster (scheduler in this process, its pooled connections) outlives
        # the test: the per-test leak check cannot apply. Backend.run checks instead that
        # nothing of the test is left on the worker or the scheduler.
        pytest.param("dask", marks=pytest.mark.allow_leaks),
    ],
)
def backend(request: pytest.FixtureRequest) -> Backend:
    name: str = request.param
    cluster = request.getfixturevalue("dask_cluster") if name == "dask" else None
    return Backend(name, cluster)


# == the contract =============================================================================
class TestResults:
    def test_returns_the_result(self, backend: Backend) -> None:
        """Test that run_sync returns what the task returned."""

        async def body(pool: PoolBackend) -> None:
            assert await pool.run_sync(backendloads.add, 2, 3) == 5

        backend.run(body)

    def test_reraises_the_task_exception(self, backend: Backend) -> None:
        """Test that the task's exception is raised by run_sync with its type and message."""

        async def body(pool: PoolBackend) -> None:
            with pytest.raises(ValueError) as info:
                await pool.run_sync(backendloads.raise_value_error, "raised on purpose")
            assert type(info.value) is ValueError
            assert info.value.args == ("raised on purpose",)

        backend.run(body)


class TestCancellation:
    def test_cancelled_token_before_the_call_never_runs_the_task(
        self, backend: Backend, tmp_path: Path
    ) -> None:
        """Test that a token cancelled before the call raises CancelledException with its
        reason and the function never runs."""
        marker = tmp_path / "ran"

        async def body(pool: PoolBackend) -> None:
            token = CancellationToken()
            token.cancel("too late")
            with pytest.raises(CancelledException) as info:
                await pool.run_sync(backendloads.touch, str(marker), token=token)
            assert info.value.reason == "too late"
            # A later call through the same pool completes; the first task still never ran.
            assert await pool.run_sync(backendloads.add, 1, 1) == 2
            assert not marker.exists()

        backend.run(body)

    def test_cooperative_cancel_raises_with_reason_and_partial_results(
        self, backend: Backend
    ) -> None:
        """Test that cancelling the caller's token while a cooperative task runs raises
        CancelledException with the reason and, in partial_results, what the task stored,
        which partial_sink received too."""

        async def body(pool: PoolBackend) -> None:
            token = CancellationToken()
            reports = Reports()
            call = asyncio.ensure_future(
                pool.run_sync(
                    backendloads.store_then_poll,
                    2,
                    token=token,
                    grace_period=WAIT,
                    partial_sink=reports,
                )
            )
            await reports.wait("step-1")
            token.cancel("stop now")
            with pytest.raises(CancelledException) as info:
                await call
            assert info.value.reason == "stop now"
            assert info.value.partial_results == {"step-0": 0, "step-1": 1}
            assert reports.values == {"step-0": 0, "step-1": 1}

        backend.run(body)

    def test_cooperative_stop_has_fate_cancelled(self, backend: Backend) -> None:
        """Test that the exception of a task that stopped cooperatively has fate
        "cancelled"."""

        async def body(pool: PoolBackend) -> None:
            token = CancellationToken()
            reports = Reports()
            call = asyncio.ensure_future(
                pool.run_sync(
                    backendloads.store_then_poll,
                    1,
                    token=token,
                    grace_period=WAIT,
                    partial_sink=reports,
                )
            )
            await reports.wait("step-0")
            token.cancel("stop now")
            with pytest.raises(CancelledException) as info:
                await call
            assert info.value.fate == Fate.CANCELLED

        backend.run(body)

    def test_timeout_raises_pipeline_timeout_exception(self, backend: Backend) -> None:
        """Test that a task running past its timeout raises PipelineTimeoutException, also
        a TimeoutError, that carries the timeout."""

        async def body(pool: PoolBackend) -> None:
            with pytest.raises(PipelineTimeoutException) as info:
                await pool.run_sync(backendloads.store_then_poll, 0, timeout=0.2, grace_period=WAIT)
            assert isinstance(info.value, TimeoutError)
            assert info.value.timeout == 0.2

        backend.run(body)

    def test_task_token_is_cancelled_with_the_callers(self, backend: Backend) -> None:
        """Test that cancelling the caller's token cancels the task's current_token(),
        with the same reason."""

        async def body(pool: PoolBackend) -> None:
            token = CancellationToken()
            reports = Reports()
            call = asyncio.ensure_future(
                pool.run_sync(
                    backendloads.report_cancel, token=token, grace_period=WAIT, partial_sink=reports
                )
            )
            await reports.wait("started")
            token.cancel("from the caller")
            with pytest.raises(CancelledException):
                await call
            assert await reports.wait("seen") == "from the caller"

        backend.run(body)

    def test_cancel_inside_the_task_stops_it_but_not_the_caller(self, backend: Backend) -> None:
        """Test that cancelling current_token() inside the task stops the task
        (CancelledException with that reason) and leaves the caller's token uncancelled."""

        async def body(pool: PoolBackend) -> None:
            token = CancellationToken()
            with pytest.raises(CancelledException) as info:
                await pool.run_sync(
                    backendloads.cancel_own_token, "gave up", token=token, grace_period=WAIT
                )
            assert info.value.reason == "gave up"
            assert not token.is_cancelled, (
                f"the caller's token was cancelled: {token.cancel_reason!r}"
            )

        backend.run(body)

    def test_caller_is_released_only_once_the_task_is_over(
        self, backend: Backend, tmp_path: Path
    ) -> None:
        """Test that after a cancel run_sync does not raise while the task is still in its
        cleanup (within the grace period), and raises once it ended, with what the cleanup
        stored."""
        gate = tmp_path / "gate"

        async def body(pool: PoolBackend) -> None:
            token = CancellationToken()
            reports = Reports()
            call = asyncio.ensure_future(
                pool.run_sync(
                    backendloads.clean_up_behind_gate,
                    str(gate),
                    token=token,
                    grace_period=WAIT,
                    partial_sink=reports,
                )
            )
            try:
                await reports.wait("started")
                token.cancel("stop now")
                await reports.wait("cleaning")  # the task is in its cleanup until the gate
                released_early = call.done()
            finally:
                gate.touch()
            with pytest.raises(CancelledException) as info:
                await call
            assert not released_early, "run_sync raised while the task was still running"
            assert info.value.partial_results.get("cleaned") is True

        backend.run(body)

    def test_cancelling_the_awaiting_coroutine_stops_the_task_through_its_token(
        self, backend: Backend, tmp_path: Path
    ) -> None:
        """Test that cancelling the asyncio task awaiting run_sync stops the task through its
        token (it sees the cancel and completes its cleanup, within the grace period) and
        asyncio.CancelledError propagates only once the task is over."""
        gate = tmp_path / "gate"

        async def body(pool: PoolBackend) -> None:
            reports = Reports()
            call = asyncio.ensure_future(
                pool.run_sync(
                    backendloads.clean_up_behind_gate,
                    str(gate),
                    grace_period=WAIT,
                    partial_sink=reports,
                )
            )
            cleaning = asyncio.ensure_future(reports.wait("cleaning"))
            try:
                await reports.wait("started")
                call.cancel()
                # Whichever comes first: the task in its cleanup (it saw its token), or
                # the caller released (the task not seen to be over).
                await asyncio.wait({call, cleaning}, return_when=asyncio.FIRST_COMPLETED)
                released_early = call.done()
            finally:
                gate.touch()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert not released_early, (
                f"asyncio.CancelledError came while the task was not over; it stored {reports.log}"
            )
            assert (await cleaning) is True
            assert "cleaned" in reports.values, (
                f"the task was stopped before its cleanup ended; it stored {reports.log}"
            )

        backend.run(body)


class TestPartialResults:
    def test_store_partial_reaches_the_sink_in_order(self, backend: Backend) -> None:
        """Test that every store_partial of a task reaches partial_sink, in order, before
        run_sync returns."""

        async def body(pool: PoolBackend) -> None:
            reports = Reports()
            assert await pool.run_sync(backendloads.store_in_order, 20, partial_sink=reports) == 20
            assert reports.log == [(f"k{i}", i) for i in range(20)]

        backend.run(body)


class TestShutdown:
    def test_shutdown_leaves_no_thread_or_process_of_the_pool(self, backend: Backend) -> None:
        """Test that shutdown(wait=True) after a completed call returns only once every
        thread and process the pool started is gone."""

        async def body(pool: PoolBackend) -> None:
            assert await pool.run_sync(backendloads.add, 1, 2) == 3
            await off_loop(lambda: pool.shutdown(wait=True))
            assert backend.leftovers() == {"threads": [], "processes": []}

        backend.run(body)

    def test_shutdown_waits_for_the_running_call(self, backend: Backend, tmp_path: Path) -> None:
        """Test that shutdown(wait=True) returns only once the call already running is
        over (everything it stored has reached partial_sink)."""
        gate = tmp_path / "gate"

        def open_gate_and_shut_down(pool: PoolBackend) -> None:
            gate.touch()  # the task may end from now on: shutdown must wait for that
            pool.shutdown(wait=True)

        async def body(pool: PoolBackend) -> None:
            reports = Reports()
            call = asyncio.ensure_future(
                pool.run_sync(backendloads.finish_behind_gate, str(gate), partial_sink=reports)
            )
            try:
                await reports.wait("started")
                await off_loop(lambda: open_gate_and_shut_down(pool))
                stored_at_return = list(reports.log)
            finally:
                gate.touch()
            assert await call == "done"
            assert ("done", True) in stored_at_return, (
                f"shutdown returned while the call ran (the task had stored {stored_at_return})"
            )

        backend.run(body)

    def test_run_sync_after_shutdown_raises_pool_closed(self, backend: Backend) -> None:
        """Test that run_sync after shutdown() raises PoolClosedError."""

        async def body(pool: PoolBackend) -> None:
            assert await pool.run_sync(backendloads.add, 1, 2) == 3
            await off_loop(lambda: pool.shutdown(wait=True))
            with pytest.raises(PoolClosedError):
                await pool.run_sync(backendloads.add, 1, 2)

        backend.run(body)
