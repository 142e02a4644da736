"""No lock that a signal handler's cancel path can take while the interrupted code holds it.

A signal handler runs on the main thread, between two bytecodes of whatever the main
thread was doing. If that code holds a plain lock and the handler's path (``cancel()`` →
callbacks → registry / executor callbacks → whatever they start) takes the same lock, the
process hangs for good. Each test puts the main thread *inside* the locked region of an
ordinary call and raises ``SIGUSR1`` right there (``signal.raise_signal`` runs the Python
handler at once), then checks that the handler's work finishes and has its effect.

The locks the token layer, registry and executor can reach on that path are all
re-entrant (the slot-accounting lock of ``_cell``; ``threading``'s module lock, taken to
start the timer and hub threads) or refuse re-entry (loguru's handler lock, see
``_log``); the registry and executor hold none. These tests are guards: each fails (the
child hangs) if one of those locks becomes a plain ``Lock`` or the path starts taking a
new one.

Each scenario runs in a fresh interpreter under a watchdog: a deadlock cannot be undone
in-process (it would be this test runner's main thread), so the child has a
``faulthandler`` alarm that dumps its stacks and exits, and the test fails instead of
hanging.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import needs_process_pools, needs_shared_tokens

CHILD_ALARM = 20  # seconds: the child dumps its stacks and exits if still running then
WATCHDOG = 60.0  # seconds: the test's own bound on the child

#: Run first in every scenario: makes ``threading``'s module lock observable.
PRELUDE = """
import faulthandler, os, signal, sys, threading
faulthandler.dump_traceback_later({alarm}, exit=True)
MAIN = threading.get_ident()


class Tripwire(dict):
    '''Stands in for ``threading._limbo``, which ``Thread.start()`` (``_limbo[t] = t``)
    and ``threading.enumerate()`` (``_limbo.values()``) touch while they hold threading's
    module lock (``_active_limbo_lock``, a plain Lock): raises SIGUSR1 there, once, on
    the main thread, as if the signal had landed at that moment.'''

    fired = False

    def _trip(self):
        if not Tripwire.fired and threading.get_ident() == MAIN:
            Tripwire.fired = True
            signal.raise_signal(signal.SIGUSR1)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._trip()

    def values(self):
        self._trip()
        return super().values()


def arm():
    threading._limbo = Tripwire(threading._limbo)


def check(condition, what):
    if not condition:
        print("FAILED:", what, flush=True)
        sys.exit(1)
"""

#: What the main thread is doing, with threading's module lock held, when the signal lands.
MAIN_CALLS = {
    "Thread.start": "arm(); worker = threading.Thread(target=lambda: None); worker.start(); "
    "worker.join()",
    "threading.enumerate": "arm(); threading.enumerate()",
}


def run_scenario(body: str) -> None:
    """Run ``PRELUDE + body`` in a fresh interpreter; fail on a hang or a failed check."""
    code = PRELUDE.format(alarm=CHILD_ALARM) + textwrap.dedent(body) + "\nprint('OK')\n"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=WATCHDOG,
            cwd=Path(__file__).parent,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"watchdog: the scenario hung (deadlock)\n{exc.stderr!r}")
    if "Timeout (0:" in proc.stderr:
        pytest.fail(f"deadlock: the scenario's main thread never returned\n{proc.stderr}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


class TestThreadingLockOnCancelPath:
    @pytest.mark.parametrize("main_call", MAIN_CALLS.values(), ids=MAIN_CALLS.keys())
    def test_callback_making_timeout_token_in_signal_handler(self, main_call: str) -> None:
        """Test that a signal handler whose cancel() runs a callback that makes a timeout
        token (so the timer thread must start) finishes while the interrupted main thread
        holds threading's module lock, and that the timeout then fires.

        Guard: ``_timer.call_at`` starts the timer thread with ``Thread.start()``, which
        takes that lock again (safe only because it is an ``RLock``).
        """
        run_scenario(
            f"""
            from cancelflow import CancellationToken, _timer
            check(_timer.pending() == 0, "no timer yet: the handler must start the thread")
            token = CancellationToken()
            made = []
            token.on_cancel(lambda: made.append(CancellationToken(timeout=0.001)))
            signal.signal(signal.SIGUSR1, lambda *_: token.cancel("signal"))
            {main_call}
            check(Tripwire.fired, "the signal landed while the lock was held")
            check(token.cancel_reason == "signal", "the handler's cancel happened")
            check(made[0].wait_blocking(30), "the timeout made in the handler fired")
            """
        )

    def test_registry_cancel_in_signal_handler_during_cleanup_thread_start(self) -> None:
        """Test that ``registry.cancel_threadsafe()`` in a signal handler finishes while
        the registry, on the interrupted main thread, is starting a sync cleanup handler's
        thread (holding threading's module lock), when a callback on the cancelled
        pipeline's token makes a timeout token.

        Guard: as above, with the registry (which holds no lock) on both sides.
        """
        run_scenario(
            """
            import asyncio
            from cancelflow import CancellationRegistry, CancellationToken

            registry = CancellationRegistry()
            made = []

            async def main():
                registry.register("a")
                registry.register_cleanup_handler("a", lambda: None)
                token_b = registry.register("b")
                token_b.on_cancel(lambda: made.append(CancellationToken(timeout=0.001)))
                signal.signal(
                    signal.SIGUSR1, lambda *_: registry.cancel_threadsafe("b", "signal")
                )
                arm()
                await registry.cancel("a", "first")  # starts the cleanup handler's thread
                check(Tripwire.fired, "the signal landed while the lock was held")
                await registry.cancel("b")
                return token_b

            token_b = asyncio.run(main())
            check(token_b.cancel_reason == "signal", "the handler's cancel happened")
            check(made[0].wait_blocking(30), "the timeout made in the handler fired")
            """
        )

    @needs_shared_tokens
    @pytest.mark.parametrize("main_call", MAIN_CALLS.values(), ids=MAIN_CALLS.keys())
    def test_on_cancel_of_shared_token_in_signal_handler(self, main_call: str) -> None:
        """Test that ``on_cancel()`` on a token shared with another process (which must
        start this process's hub thread) finishes in a signal handler while the
        interrupted main thread holds threading's module lock, and that a cancel made in
        another process then reaches the callback.

        Guard: ``Chunk.ensure_hub`` starts the hub with ``Thread.start()``; the token's
        docstring used to forbid this call in a handler, and now promises it.
        """
        run_scenario(
            f"""
            from cancelflow import CancellationToken
            token = CancellationToken()
            pid = os.fork()  # the token is now shared: its callbacks need the hub thread
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            heard = threading.Event()
            signal.signal(signal.SIGUSR1, lambda *_: token.on_cancel(heard.set))
            {main_call}
            check(Tripwire.fired, "the signal landed while the lock was held")
            pid = os.fork()
            if pid == 0:
                token.cancel("from the other process")
                os._exit(0)
            os.waitpid(pid, 0)
            check(heard.wait(30), "the hub delivered the other process's cancel")
            check(token.cancel_reason == "from the other process", "its reason")
            """
        )


class TestSlotLockOnCancelPath:
    def test_callback_making_tokens_while_main_holds_slot_lock(self) -> None:
        """Test that a signal handler whose cancel() runs a callback that makes and drops
        tokens (child tokens included) finishes while the interrupted main thread is
        handing out a slot (holding the slot-accounting lock), and accounts stay right.

        Guard, not a regression: the lock is re-entrant on purpose (``_cell``); this fails
        if it ever becomes a plain lock.
        """
        run_scenario(
            """
            import gc
            from cancelflow import CancellationToken, _cell

            token = CancellationToken()
            made = []

            def callback():
                child = token.child()  # already cancelled parent: cancelled at once
                made.append((child.is_cancelled, child.cancel_reason))
                CancellationToken()  # made and dropped: allocate, then release

            token.on_cancel(callback)
            signal.signal(signal.SIGUSR1, lambda *_: token.cancel("signal"))
            allocate = _cell.Chunk.allocate
            tripped = []

            def tripping_allocate(self):
                with _cell._slots_lock:
                    if not tripped:
                        tripped.append(None)
                        signal.raise_signal(signal.SIGUSR1)
                    return allocate(self)

            _cell.Chunk.allocate = tripping_allocate
            other = CancellationToken()
            _cell.Chunk.allocate = allocate
            check(tripped, "the signal landed while the lock was held")
            check(made == [(True, "signal")], "the callback ran once, fully")
            chunk = token._chunk
            del other
            gc.collect()
            check(chunk.live == 1, f"only `token` holds a slot, not {chunk.live}")
            """
        )


#: A queue that raises SIGUSR1 right after its first append on the main thread: the
#: signal lands inside a pool's submit, after the task was queued, under the pool's lock.
TRIP_QUEUE = """
import collections


class TripQueue(collections.deque):
    fired = False

    def append(self, item):
        super().append(item)
        if not TripQueue.fired and threading.get_ident() == MAIN:
            TripQueue.fired = True
            signal.raise_signal(signal.SIGUSR1)
"""


class TestShutdownFromASignalHandler:
    """A handler that shuts a pool down while the main thread is inside its submit()."""

    @pytest.mark.parametrize("wait", [True, False])
    @pytest.mark.parametrize("cancel_futures", [True, False])
    def test_thread_pool_refuses_the_interrupted_submit_and_ends(
        self, wait: bool, cancel_futures: bool
    ) -> None:
        """Test that ThreadPool.shutdown() in a handler that interrupted submit() (past
        its queue's append, holding the pool's lock) returns, the interrupted submit
        raises PoolClosedError, nothing is left pending and the workers end
        (regression: the handler waited for the lock its own thread held, for ever)."""
        run_scenario(
            TRIP_QUEUE
            + textwrap.dedent(
                f"""
            import concurrent.futures
            from cancelflow import ThreadPool, PoolClosedError
            pool = ThreadPool(2)
            earlier = [pool.submit(abs, -i) for i in range(5)]
            pool._queue = TripQueue(pool._queue)
            signal.signal(
                signal.SIGUSR1,
                lambda *_: pool.shutdown(wait={wait}, cancel_futures={cancel_futures}),
            )
            try:
                pool.submit(abs, -9)
            except PoolClosedError:
                refused = True
            else:
                refused = False
            check(TripQueue.fired, "the signal landed inside submit")
            check(refused, "the interrupted submit was refused")
            done, pending = concurrent.futures.wait(earlier, timeout=30)
            check(not pending, "every earlier task settled")
            pool.shutdown()
            check(pool.statistics().workers == 0, "the workers ended")
            from cancelflow import _thread_pool
            check(pool not in _thread_pool._queued, "nothing keeps the pool for its queue")
            """
            )
        )

    @needs_process_pools
    @pytest.mark.parametrize("how", ["shutdown", "terminate_workers", "kill_workers"])
    def test_process_pool_waits_and_the_queued_task_is_not_lost(self, how: str) -> None:
        """Test that ProcessPool.shutdown(wait=True) (or terminate/kill_workers) in a
        handler that interrupted submit() right after its task was queued returns once
        the pool is gone, and that task ended (ran or was cancelled), never pending
        (regression: the supervisor waited for the pool lock the interrupted submit held,
        while the handler waited for the supervisor)."""
        call = (
            "pool.shutdown(wait=True)" if how == "shutdown" else f"(pool.{how}(), pool.shutdown())"
        )
        run_scenario(
            TRIP_QUEUE
            + textwrap.dedent(
                f"""
            import concurrent.futures
            from cancelflow import ProcessPool
            pool = ProcessPool(1)
            pool.wait_ready(30)
            supervisor = pool._supervisor
            supervisor.queue = TripQueue(supervisor.queue)
            signal.signal(signal.SIGUSR1, lambda *_: {call})
            future = pool.submit(abs, -9)
            check(TripQueue.fired, "the signal landed inside submit")
            check(supervisor.closed.is_set(), "the handler returned once the pool was gone")
            check(future.done(), "the interrupted submit's task ended")
            if {how == "shutdown"}:
                check(future.result(0) == 9, "queued before the shutdown, it ran")
            """
            )
        )

    @needs_process_pools
    def test_process_pool_refuses_a_submit_interrupted_before_its_append(self) -> None:
        """Test that a handler's shutdown(wait=True) landing inside submit() after the
        pool's open check but before the queue's append returns, and the submit raises
        PoolClosedError instead of queueing into a pool that is gone (regression: a
        deadlock, or with wait=False a task left pending for ever)."""
        run_scenario(
            """
            from cancelflow import ProcessPool, PoolClosedError
            pool = ProcessPool(1)
            pool.wait_ready(30)
            supervisor = pool._supervisor
            opened = supervisor.check_open
            fired = []

            def check_open():
                opened()
                if not fired and supervisor.lock._is_owned():  # the call in enqueue
                    fired.append(True)
                    signal.raise_signal(signal.SIGUSR1)

            supervisor.check_open = check_open
            signal.signal(signal.SIGUSR1, lambda *_: pool.shutdown(wait=True))
            try:
                pool.submit(abs, -9)
            except PoolClosedError:
                refused = True
            else:
                refused = False
            check(fired, "the signal landed inside submit")
            check(refused, "the interrupted submit was refused")
            check(not supervisor.queue, "nothing was left queued")
            """
        )
