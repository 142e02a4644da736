"""The systems measured: one adapter class per way of using cancelflow or a peer.

Process pools used through a synchronous API (``SyncProcs``) or from an event loop
(``AsyncProcs``, under anyio), and thread pools (``SyncThreads``). A peer is imported
only when its adapter opens, so that this module imports none of them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import multiprocessing.pool
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from .beacon import Signal
from .harness import NEXT_TIMEOUT, Bench
from .results import Cannot


def _wait_futures(futures: list[Any], timeout: float) -> bool:
    done, _ = concurrent.futures.wait(futures, timeout=timeout)
    return len(done) == len(futures)


def _block_future(future: Any, timeout: float) -> bool:
    """The caller's own wait: ``future.result(timeout)``; ``True`` once the future is done
    (with a result, an exception or cancelled), ``False`` if ``timeout`` passed first."""
    try:
        future.result(max(0.0, timeout))
    except BaseException:  # noqa: BLE001 - the outcome, or the timeout: done() tells
        pass
    return bool(future.done())


def _future_error(future: Any) -> BaseException | None:
    try:
        return future.exception(timeout=0)  # type: ignore[no-any-return]
    except BaseException as exc:  # noqa: BLE001 - CancelledError is the outcome here
        return exc


# == process systems driven from a thread (sync APIs) ===========================================
class SyncProcs:
    """A process pool used through its synchronous API; subclasses wrap one system."""

    system = ""
    label = ""
    coop_label = ""
    tag = ""
    via_sink = False  # cancelflow: the task signals through store_partial
    quiet = False  # a bare Process: a cooperative stop exits 1 instead of raising
    caller_hangs: str | None = None  # why the caller is never released after a stop
    crash_caller_hangs: str | None = None

    def __init__(self, bench: Bench) -> None:
        self.bench = bench

    def beacon_arg(self) -> str | None:
        return None if self.via_sink else self.bench.beacon.path

    def open(self, workers: int) -> None:
        raise NotImplementedError

    def ensure(self) -> None:
        """Make the pool usable for the next sample (after a stop that broke it)."""

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        raise NotImplementedError

    def wait(self, handle: Any, timeout: float) -> bool:
        """Block in the system's own wait for the call (``result()``); ``True`` if done."""
        return _block_future(handle, timeout)

    def error(self, handle: Any) -> BaseException | None:
        return _future_error(handle)

    def stop(self, handle: Any, signal_: Signal) -> None:
        raise NotImplementedError

    def next_task(self, timeout: float) -> None:
        raise NotImplementedError

    def throughput(self, n: int, fn: Callable[[int], int] = abs) -> None:
        futures = [self.submit(fn, (i,)) for i in range(n)]
        if not _wait_futures(futures, 20):
            raise TimeoutError(
                f"{sum(not f.done() for f in futures)} of {n} tasks did not finish within 20 s"
            )

    def close(self) -> None:
        raise NotImplementedError


class CancelflowProcs(SyncProcs):
    system = "cancelflow"
    label = "ProcessPool, TaskFuture.cancel() (grace 0 + term grace 0: SIGKILL of the tree at once)"
    coop_label = "ProcessPool, token.cancel(); the task polls check_cancelled()"
    via_sink = True

    def open(self, workers: int) -> None:
        from cancelflow._process import ProcessPool

        self.pool = ProcessPool(workers, grace_period=0, term_grace_period=0, name="bench")
        self.pool.wait_ready(60)
        self.pool.submit(os.getpid).result(60)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        if token is None:
            return self.pool.submit_task(fn, args, partial_sink=self.bench.beacon.sink)
        # Cooperative: a long grace period, so that only the task's own check stops it.
        return self.pool.submit_task(
            fn, args, token=token, grace_period=60.0, partial_sink=self.bench.beacon.sink
        )

    def stop(self, handle: Any, signal_: Signal) -> None:
        handle.cancel()

    def next_task(self, timeout: float) -> None:
        self.pool.submit(os.getpid).result(timeout)

    def close(self) -> None:
        _close_process_pool(self.pool)


def _close_process_pool(pool: Any, timeout: float = 10.0) -> None:
    """Shut a cancelflow ``ProcessPool`` down without hanging the benchmark if it is stuck.

    Only the public API: ``shutdown(wait=True)`` runs in a helper thread; if it has not
    returned within ``timeout``, the zygote (``statistics().zygote_pid``) is killed, which
    ends its workers and wakes the supervisor, and the benchmark reports the cell as failed.
    """
    zygote_pid = pool.statistics().zygote_pid
    closer = threading.Thread(
        target=pool.shutdown,
        kwargs={"wait": True, "cancel_futures": True, "cancel_running": True},
        name="bench-close-pool",
        daemon=True,
    )
    closer.start()
    closer.join(timeout)
    if closer.is_alive():
        if zygote_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(zygote_pid, signal.SIGKILL)
        closer.join(timeout)
        raise RuntimeError(
            f"ProcessPool.shutdown() did not finish within {timeout:g}s (supervisor asleep)"
        )


class PebbleProcs(SyncProcs):
    system = "pebble"
    label = "pebble.ProcessPool, future.cancel()"
    coop_label = "pebble.ProcessPool; the task polls a shared-memory flag"

    def open(self, workers: int) -> None:
        import pebble

        self.pool: Any = pebble.ProcessPool(max_workers=workers)
        self.pool.schedule(os.getpid).result(60)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        return self.pool.schedule(fn, args=args)

    def stop(self, handle: Any, signal_: Signal) -> None:
        handle.cancel()

    def next_task(self, timeout: float) -> None:
        self.pool.schedule(os.getpid).result(timeout)

    def close(self) -> None:
        self.pool.close()
        self.pool.join(30)
        if self.pool.active:
            self.pool.stop()
            self.pool.join(30)


class LokyProcs(SyncProcs):
    system = "loky"
    label = "loky reusable executor, shutdown(kill_workers=True) (no per-task cancel)"
    coop_label = "loky reusable executor; the task polls a shared-memory flag"

    def open(self, workers: int) -> None:
        import loky

        self.workers = workers
        self.ex = loky.get_reusable_executor(max_workers=workers)
        self.ex.submit(os.getpid).result(60)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        return self.ex.submit(fn, *args)

    def stop(self, handle: Any, signal_: Signal) -> None:
        self.shut = True
        self.ex.shutdown(wait=False, kill_workers=True)

    def ensure(self) -> None:
        if getattr(self, "shut", False):
            self.next_task(NEXT_TIMEOUT)

    def next_task(self, timeout: float) -> None:
        import loky

        self.ex = loky.get_reusable_executor(max_workers=self.workers)
        self.shut = False
        self.ex.submit(os.getpid).result(timeout)

    def close(self) -> None:
        self.ex.shutdown(wait=True, kill_workers=True)


class CfProcs(SyncProcs):
    system = "concurrent.futures"
    label = "ProcessPoolExecutor, future.cancel()"
    coop_label = "ProcessPoolExecutor; the task polls a shared-memory flag"

    def open(self, workers: int) -> None:
        self.workers = workers
        self.ex = concurrent.futures.ProcessPoolExecutor(max_workers=workers)
        self.ex.submit(os.getpid).result(60)
        self.broken = False

    def ensure(self) -> None:
        if self.broken:
            self.ex.shutdown(wait=True)
            self.open(self.workers)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        return self.ex.submit(fn, *args)

    def stop(self, handle: Any, signal_: Signal) -> None:
        if not handle.cancel():
            self.broken = True  # the benchmark will kill the worker
            raise Cannot(
                "Future.cancel() returns False for a running call; the task runs on "
                "(Python 3.14 adds pool-wide terminate_workers() only)"
            )

    def next_task(self, timeout: float) -> None:
        self.broken = True
        raise Cannot("the executor is broken (BrokenProcessPool): a new executor is needed")

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


class CfKillProcs(CfProcs):
    label = "ProcessPoolExecutor + SIGKILL of the worker by hand (not a documented cancel)"
    tag = "worker killed by hand"

    def stop(self, handle: Any, signal_: Signal) -> None:
        self.broken = True
        os.kill(signal_.pid, signal.SIGKILL)


class _ApplyAsync:
    """submit / wait / error for the multiprocessing pools (process and thread), whose
    handles are ``AsyncResult``s."""

    pool: Any

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        return self.pool.apply_async(fn, args)

    def wait(self, handle: Any, timeout: float) -> bool:
        """``AsyncResult.get(timeout)``, the caller's own wait; ``True`` if ready."""
        with contextlib.suppress(BaseException):
            handle.get(max(0.0, timeout))
        return bool(handle.ready())

    def error(self, handle: Any) -> BaseException | None:
        try:
            handle.get(0)
        except BaseException as exc:  # noqa: BLE001 - the outcome being measured
            return exc
        return None


class MpPoolProcs(_ApplyAsync, SyncProcs):
    system = "multiprocessing.Pool"
    label = "multiprocessing.Pool, terminate() (no per-task cancel)"
    coop_label = "multiprocessing.Pool.apply_async; the task polls a shared-memory flag"
    caller_hangs = "AsyncResult.get() never returns after terminate() (verified)"
    crash_caller_hangs = "AsyncResult.get() never returns when its worker dies (verified)"

    def open(self, workers: int) -> None:
        self.workers = workers
        self.pool = multiprocessing.Pool(workers)
        self.pool.apply(os.getpid)
        self.terminated = False

    def ensure(self) -> None:
        if self.terminated:
            self.pool.join()
            self.open(self.workers)

    def stop(self, handle: Any, signal_: Signal) -> None:
        self.terminated = True
        self.pool.terminate()

    def next_task(self, timeout: float) -> None:
        if self.terminated:
            raise Cannot("terminate() ends the pool: a new Pool is needed")
        self.pool.apply_async(os.getpid).get(timeout)

    def throughput(self, n: int, fn: Callable[[int], int] = abs) -> None:
        results = [self.pool.apply_async(fn, (i,)) for i in range(n)]
        for result in results:
            result.get(20)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


#: The raw floor's "next task": a fresh process sends its pid through a pipe. A builtin
#: (``exec``) again, so that the fresh process imports nothing of ours.
_SEND_PID = "import os\nconn.send(os.getpid())\nconn.close()\n"


class RawProcs(SyncProcs):
    """The floor: one bare ``multiprocessing.Process`` per task, killed with SIGKILL.

    The processes are forked by multiprocessing's *forkserver*, a small process, not by
    the measuring process: a fork of the measuring process (which holds every peer's
    modules, their threads and the run's samples, hundreds of MB) takes the kernel
    milliseconds to tear down after SIGKILL (its page tables and copy-on-write pages),
    which was charged to the floor's "worker gone" and "caller released" (measured here:
    3.7 ms for a fork of a 250 MB process against 0.6 ms from the forkserver). cancelflow
    forks its workers from a small zygote, so the floor must too.
    """

    system = "raw"
    label = "multiprocessing.Process (forkserver) per task, Process.kill() + join()"
    coop_label = "multiprocessing.Process (forkserver) per task; polls a shared-memory flag; join()"
    quiet = True

    def open(self, workers: int) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        warm = self.ctx.Process(target=exec, args=("pass", {}), daemon=True)
        warm.start()  # starts the fork server itself (interpreter-lifetime, a helper)
        warm.join(60)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        process = self.ctx.Process(target=fn, args=args, daemon=True)
        process.start()
        return process

    def wait(self, handle: Any, timeout: float) -> bool:
        """``Process.join(timeout)``, the caller's own wait; ``True`` once it exited."""
        handle.join(max(0.0, timeout))
        return handle.exitcode is not None

    def error(self, handle: Any) -> BaseException | None:
        code = handle.exitcode
        return None if code == 0 else RuntimeError(f"exit code {code}")

    def stop(self, handle: Any, signal_: Signal) -> None:
        handle.kill()

    def next_task(self, timeout: float) -> None:
        parent, child = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=exec, args=(_SEND_PID, {"conn": child}), daemon=True)
        process.start()
        child.close()
        try:
            if not parent.poll(timeout):
                raise TimeoutError("the new process did not answer")
            parent.recv()
        finally:
            parent.close()
            process.join(timeout)

    def throughput(self, n: int, fn: Callable[[int], int] = abs) -> None:
        raise Cannot("no pool: one new process per task")

    def close(self) -> None:
        pass


# == process systems driven from an event loop (anyio harness) =================================
class AsyncProcs:
    """A process pool used from an event loop; every sample runs under anyio."""

    system = ""
    label = ""
    tag = ""
    coop_label = ""
    backend = "asyncio"
    kills_worker = True  # False: cancelling the awaiting task leaves the worker running

    def __init__(self, bench: Bench) -> None:
        self.bench = bench

    async def open(self, workers: int) -> None:
        raise NotImplementedError

    async def ensure(self) -> None:
        pass

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    async def next_task(self) -> None:
        await self.call(os.getpid)

    async def throughput(self, n: int) -> None:
        import anyio

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(self.call, abs, i)

    async def close(self) -> None:
        pass


class AnyioProcs(AsyncProcs):
    system = "anyio"
    label = "anyio.to_process.run_sync(cancellable=True), cancel scope"
    coop_label = "anyio.to_process.run_sync; the task polls a shared-memory flag"

    async def open(self, workers: int) -> None:
        import anyio

        self.limiter = anyio.CapacityLimiter(workers)
        await self.call(os.getpid)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        from anyio import to_process

        return await to_process.run_sync(fn, *args, cancellable=True, limiter=self.limiter)


class TrioParallelProcs(AsyncProcs):
    system = "trio-parallel"
    label = "trio_parallel run_sync(kill_on_cancel=True), cancel scope (spawn workers)"
    coop_label = "trio_parallel run_sync; the task polls a shared-memory flag"
    backend = "trio"

    async def open(self, workers: int) -> None:
        import trio
        import trio_parallel

        self.limiter = trio.CapacityLimiter(workers)
        self._cm = trio_parallel.open_worker_context()
        self.ctx = await self._cm.__aenter__()
        await self.call(os.getpid)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.ctx.run_sync(fn, *args, kill_on_cancel=True, limiter=self.limiter)

    async def close(self) -> None:
        await self._cm.__aexit__(None, None, None)


class AsyncioProcs(AsyncProcs):
    system = "asyncio"
    label = "loop.run_in_executor(ProcessPoolExecutor), Task.cancel()"
    coop_label = "loop.run_in_executor(ProcessPoolExecutor); the task polls a shared-memory flag"
    kills_worker = False

    async def open(self, workers: int) -> None:
        self.workers = workers
        self.ex = concurrent.futures.ProcessPoolExecutor(max_workers=workers)
        self.broken = False
        await self.call(os.getpid)

    async def ensure(self) -> None:
        if self.broken:
            self.ex.shutdown(wait=True, cancel_futures=True)
            await self.open(self.workers)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.ex, fn, *args)

    async def next_task(self) -> None:
        raise Cannot(
            "the only worker still runs the cancelled task (it never ends): the next task "
            "queues behind it"
        )

    async def throughput(self, n: int) -> None:
        await asyncio.gather(*(self.call(abs, i) for i in range(n)))

    async def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


SYNC_PROCS: dict[str, list[type[SyncProcs]]] = {
    "cancelflow": [CancelflowProcs],
    "raw": [RawProcs],
    "pebble": [PebbleProcs],
    "loky": [LokyProcs],
    "concurrent.futures": [CfProcs, CfKillProcs],
    "multiprocessing.Pool": [MpPoolProcs],
}
ASYNC_PROCS: dict[str, type[AsyncProcs]] = {
    "anyio": AnyioProcs,
    "trio-parallel": TrioParallelProcs,
    "asyncio": AsyncioProcs,
}


# == thread systems ============================================================================
class SyncThreads:
    """A thread pool used through its synchronous API."""

    system = ""
    label = ""
    uses_token = False

    def open(self, workers: int) -> None:
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        raise NotImplementedError

    def wait(self, handle: Any, timeout: float) -> bool:
        """Block in the system's own wait for the call (``result()``); ``True`` if done."""
        return _block_future(handle, timeout)

    def error(self, handle: Any) -> BaseException | None:
        return _future_error(handle)

    def throughput(self, n: int, fn: Callable[[int], int] = abs) -> None:
        futures = [self.submit(fn, (i,)) for i in range(n)]
        if not _wait_futures(futures, 20):
            raise TimeoutError(
                f"{sum(not f.done() for f in futures)} of {n} tasks did not finish within 20 s"
            )

    def close(self) -> None:
        raise NotImplementedError


class CancelflowThreads(SyncThreads):
    system = "cancelflow"
    label = "ThreadPool, token.cancel(); the task polls check_cancelled()"
    uses_token = True

    def __init__(self, bench: Bench) -> None:
        self.bench = bench

    def open(self, workers: int) -> None:
        from cancelflow._thread_pool import ThreadPool

        self.pool = ThreadPool(workers, name="bench")

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        return self.pool.submit_task(fn, args, token=token, partial_sink=self.bench.beacon.sink)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True, cancel_running=True)


class CfThreads(SyncThreads):
    system = "concurrent.futures"
    label = "ThreadPoolExecutor; the task polls a threading.Event"

    def open(self, workers: int) -> None:
        self.ex = concurrent.futures.ThreadPoolExecutor(max_workers=workers)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        return self.ex.submit(fn, *args)

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


class PebbleThreads(SyncThreads):
    system = "pebble"
    label = "pebble.ThreadPool; the task polls a threading.Event"

    def open(self, workers: int) -> None:
        import pebble

        self.pool: Any = pebble.ThreadPool(max_workers=workers)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        return self.pool.schedule(fn, args=args)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


class MpThreads(_ApplyAsync, SyncThreads):
    system = "multiprocessing.Pool"
    label = "multiprocessing.pool.ThreadPool; the task polls a threading.Event"

    def open(self, workers: int) -> None:
        self.pool = multiprocessing.pool.ThreadPool(workers)

    def throughput(self, n: int, fn: Callable[[int], int] = abs) -> None:
        results = [self.pool.apply_async(fn, (i,)) for i in range(n)]
        for result in results:
            result.get(20)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


class RawThreads(SyncThreads):
    system = "raw"
    label = "threading.Thread per task; polls a threading.Event; join()"

    def open(self, workers: int) -> None:
        pass

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        errors: list[BaseException] = []

        def target() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                errors.append(exc)

        thread = threading.Thread(target=target, name="bench-raw-thread")
        thread.start()
        return (thread, errors)

    def wait(self, handle: Any, timeout: float) -> bool:
        handle[0].join(timeout)
        return not handle[0].is_alive()

    def error(self, handle: Any) -> BaseException | None:
        errors: list[BaseException] = handle[1]
        return errors[0] if errors else None

    def throughput(self, n: int, fn: Callable[[int], int] = abs) -> None:
        raise Cannot("no pool: one new thread per task")

    def close(self) -> None:
        pass


SYNC_THREADS: dict[str, type[SyncThreads]] = {
    "concurrent.futures": CfThreads,
    "pebble": PebbleThreads,
    "multiprocessing.Pool": MpThreads,
    "raw": RawThreads,
}
