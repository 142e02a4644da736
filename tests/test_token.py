"""Tests for :mod:`cancelflow._token` (``CancellationToken``, ``CallbackHandle``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.process
import multiprocessing.resource_tracker
import os
import pickle
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from loguru import logger

from cancelflow import CallbackHandle, CancellationToken, CancelledException, _cell, _timer, _token
from cancelflow._token import token_on_slot
from support import (
    WAIT,
    LogCapture,
    Recorder,
    memfds,
    needs_shared_tokens,
    pipe,
    receive,
    run_script,
    running,
    share,
    wait_until,
)


# -- helpers ------------------------------------------------------------------------------
class _OtherProcessWinsThenInterrupt:
    """A slot lock whose wait ends as if another process's cancel had won meanwhile
    (flag and reason written), and a KeyboardInterrupt lands before it is ours. (A class
    at module level: free-threaded 3.13 keeps classes made in a test alive, and with
    them what they close over.)"""

    def __init__(self, token: CancellationToken) -> None:
        self.token = token

    def __enter__(self) -> None:
        self.token._write_shared_reason("theirs")
        self.token._flag = True
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        pass


# Child-process bodies (module level, so spawn and forkserver can import them).


def _child_waits(token: CancellationToken, ready: Any, conn: Any) -> None:
    ready.set()
    woke = token.wait_blocking(WAIT)
    conn.send((woke, token.is_cancelled, token.cancel_reason))


def _child_cancels(token: CancellationToken, go: Any, reason: str) -> None:
    if go.wait(WAIT):
        token.cancel(reason)


def _child_awaits(token: CancellationToken, ready: Any, conn: Any) -> None:
    async def main() -> bool:
        waiter = asyncio.ensure_future(token.wait())
        await asyncio.sleep(0)  # let the waiter register
        ready.set()
        await asyncio.wait_for(waiter, WAIT)
        return token.is_cancelled

    conn.send(asyncio.run(main()))


def _child_reports_callbacks(token: CancellationToken, conn: Any) -> None:
    conn.send(len(token._callbacks))


def _child_reports_states(tokens: list[CancellationToken], conn: Any) -> None:
    conn.send([(token.is_cancelled, token.cancel_reason) for token in tokens])


def _child_cancels_and_reports(tokens: list[CancellationToken], mine: int, conn: Any) -> None:
    """Cancel ``tokens[mine:]``; once the last of ``tokens[:mine]`` is cancelled (the
    parent cancels them in order), send what each of them reads."""
    for token in tokens[mine:]:
        token.cancel("child")
    if mine:
        tokens[mine - 1].wait_blocking(WAIT)
    conn.send([token.is_cancelled for token in tokens[:mine]])


def _child_times_out(conn: Any) -> None:
    conn.send(CancellationToken(timeout=0.01).wait_blocking(WAIT))


def race_cancels(token: CancellationToken, count: int) -> list[bool | None]:
    """Release ``count`` threads at once through a barrier, each calling ``cancel()``."""
    barrier = threading.Barrier(count)
    results: list[bool | None] = [None] * count

    def racer(index: int) -> None:
        barrier.wait(WAIT)
        results[index] = token.cancel(f"thread-{index}")

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    return results


# -- signal storms -------------------------------------------------------------------------


@contextlib.contextmanager
def sigusr1_storm(handler: Callable[[], object]) -> Iterator[list[int]]:
    """Run ``handler`` in the main thread on SIGUSR1, sent non-stop by another thread.

    Yields a one-item list counting handler runs. The switch interval is shortened so that
    signals land at many different points of the main thread's code. A handler may be
    interrupted by the next signal once (one nested handler); deeper nesting is skipped, or
    a flood of signals would only measure the recursion limit.
    """
    main_ident = threading.main_thread().ident
    assert main_ident == threading.get_ident(), "signal tests must run in the main thread"
    assert main_ident is not None
    handled = [0]
    depth = [0]
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if depth[0] >= 2:
            return
        depth[0] += 1
        try:
            handled[0] += 1
            handler()
        finally:
            depth[0] -= 1

    def sender() -> None:
        while not stop.is_set():
            signal.pthread_kill(main_ident, signal.SIGUSR1)

    old_handler = signal.signal(signal.SIGUSR1, on_signal)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    thread = threading.Thread(target=sender, name="sigusr1-storm")
    thread.start()
    try:
        yield handled
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)
        signal.signal(signal.SIGUSR1, old_handler)


def storm_loop(handled: list[int], *, signals: int, body: Callable[[int], None]) -> int:
    """Run ``body(i)`` until ``signals`` signals were handled (and at least that many times)."""
    i = 0
    while handled[0] < signals or i < signals:
        body(i)
        i += 1
    return i


# -- tests ---------------------------------------------------------------------------------


class TestCancellationToken:
    # -- state and cancel ------------------------------------------------------------------
    def test_new_token_is_not_cancelled(self) -> None:
        """Test that a new token is not cancelled and has no reason."""
        token = CancellationToken()
        assert token.is_cancelled is False
        assert token.cancel_reason is None

    def test_cancel_sets_flag_and_reason(self) -> None:
        """Test that cancel() sets is_cancelled and keeps the reason."""
        token = CancellationToken()
        token.cancel("New message received")
        assert token.is_cancelled is True
        assert token.cancel_reason == "New message received"

    def test_cancel_without_reason(self) -> None:
        """Test that cancel() without a reason leaves cancel_reason None."""
        token = CancellationToken()
        assert token.cancel() is True
        assert token.is_cancelled
        assert token.cancel_reason is None

    def test_cancel_is_idempotent_and_first_reason_wins(self) -> None:
        """Test that only the first cancel() returns True and its reason is kept."""
        token = CancellationToken()
        assert token.cancel("first") is True
        assert token.cancel("second") is False
        assert token.cancel() is False
        assert token.cancel_reason == "first"

    def test_cancel_rejects_non_string_reason(self) -> None:
        """Test that a non-string reason raises TypeError naming the argument, at once."""
        token = CancellationToken()
        with pytest.raises(TypeError, match="reason"):
            token.cancel(42)  # type: ignore[arg-type]
        assert not token.is_cancelled
        token.cancel("ok")
        with pytest.raises(TypeError, match="reason"):
            token.cancel(b"bytes")  # type: ignore[arg-type]

    def test_is_cancelled_is_read_only_data(self) -> None:
        """Test that is_cancelled is a plain bool, not a method to call."""
        token = CancellationToken()
        assert isinstance(token.is_cancelled, bool)

    def test_raise_if_cancelled_does_nothing_while_active(self) -> None:
        """Test that raise_if_cancelled() returns quietly while not cancelled."""
        CancellationToken().raise_if_cancelled()

    def test_raise_if_cancelled_raises_cancelled_exception(self) -> None:
        """Test that raise_if_cancelled() raises CancelledException carrying the reason."""
        token = CancellationToken()
        token.cancel("user interrupted")
        with pytest.raises(CancelledException) as info:
            token.raise_if_cancelled()
        assert info.value.reason == "user interrupted"
        assert "user interrupted" in str(info.value)
        assert not isinstance(info.value, asyncio.CancelledError)

    def test_reset_makes_token_active_again(self) -> None:
        """Test that reset() clears the flag and reason and allows a new cancel."""
        token = CancellationToken()
        token.cancel("one")
        token.reset()
        assert not token.is_cancelled
        assert token.cancel_reason is None
        assert token.cancel("two") is True
        assert token.cancel_reason == "two"

    def test_reset_forgets_callbacks_that_ran(self) -> None:
        """Test that callbacks that ran before reset() do not run again after it."""
        token = CancellationToken()
        recorder = Recorder()
        token.on_cancel(recorder)
        token.cancel()
        token.reset()
        token.cancel()
        assert recorder.calls == 1

    def test_name_and_repr(self) -> None:
        """Test that the name appears in repr along with the state and reason."""
        token = CancellationToken(name="job-7")
        assert token.name == "job-7"
        assert "job-7" in repr(token)
        assert "active" in repr(token)
        token.cancel("stop")
        assert "cancelled" in repr(token)
        assert "'stop'" in repr(token)

    def test_name_must_be_string(self) -> None:
        """Test that a non-string name raises TypeError naming the argument."""
        with pytest.raises(TypeError, match="name"):
            CancellationToken(name=5)  # type: ignore[arg-type]

    @pytest.mark.parametrize("bad", [-1, -0.001, math.nan, math.inf])
    def test_timeout_rejects_bad_values(self, bad: float) -> None:
        """Test that a negative, NaN or infinite timeout raises ValueError naming it."""
        with pytest.raises(ValueError, match="timeout"):
            CancellationToken(timeout=bad)

    @pytest.mark.parametrize("bad", ["1", True, [1]])
    def test_timeout_rejects_non_numbers(self, bad: object) -> None:
        """Test that a timeout that is not a number raises TypeError naming it."""
        with pytest.raises(TypeError, match="timeout"):
            CancellationToken(timeout=bad)  # type: ignore[arg-type]

    def test_failed_construction_releases_the_slot(self) -> None:
        """Test that a constructor refusing its arguments leaves no descriptor behind."""
        gc.collect()
        before = memfds()
        for bad in ({"name": 1}, {"timeout": -1}):
            with pytest.raises((TypeError, ValueError)):
                CancellationToken(**bad)  # type: ignore[arg-type]
        gc.collect()
        assert memfds() == before

    # -- callbacks ---------------------------------------------------------------------------
    def test_on_cancel_runs_callback_once(self) -> None:
        """Test that a callback runs exactly once, on the first cancel."""
        token = CancellationToken()
        recorder = Recorder(token)
        token.on_cancel(recorder)
        assert recorder.calls == 0
        token.cancel("go")
        token.cancel("again")
        assert recorder.calls == 1
        assert recorder.reasons == ["go"]

    def test_on_cancel_runs_at_once_when_already_cancelled(self) -> None:
        """Test that a callback registered on a cancelled token runs immediately, once."""
        token = CancellationToken()
        token.cancel()
        recorder = Recorder()
        handle = token.on_cancel(recorder)
        assert recorder.calls == 1
        assert handle.remove() is False
        token.cancel()
        assert recorder.calls == 1

    def test_on_cancel_rejects_non_callable(self) -> None:
        """Test that a non-callable callback raises TypeError naming the argument."""
        with pytest.raises(TypeError, match="callback"):
            CancellationToken().on_cancel("not callable")  # type: ignore[arg-type]

    def test_raising_callback_is_logged_and_others_run(self, logs: LogCapture) -> None:
        """Test that a raising callback is logged with the token's context and others run."""
        token = CancellationToken(name="logged-token")
        before, after = Recorder(), Recorder()

        def boom() -> None:
            raise RuntimeError("callback failed")

        token.on_cancel(before)
        token.on_cancel(boom)
        token.on_cancel(after)
        assert token.cancel("why") is True
        assert before.calls == after.calls == 1
        errors = [r for r in logs.records if r["level"].name == "ERROR"]
        assert len(errors) == 1
        record = errors[0]
        assert record["extra"]["token"] == "logged-token"
        assert record["extra"]["cancel_reason"] == "why"
        assert record["extra"]["cancelflow"] is True
        assert record["exception"] is not None
        assert isinstance(record["exception"].value, RuntimeError)

    def test_callback_raising_base_exception_does_not_skip_others(self) -> None:
        """Test that a callback raising KeyboardInterrupt still lets the others run once."""
        token = CancellationToken()
        first, last = Recorder(), Recorder()

        def interrupt() -> None:
            raise KeyboardInterrupt

        token.on_cancel(first)
        token.on_cancel(interrupt)
        token.on_cancel(last)
        with pytest.raises(KeyboardInterrupt):
            token.cancel()
        assert token.is_cancelled
        assert first.calls == last.calls == 1
        token.cancel()
        assert first.calls == last.calls == 1

    def test_interrupted_cancel_leaves_callbacks_to_next_cancel(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that callbacks skipped by an exception inside cancel() run at the next cancel()."""
        token = CancellationToken()
        recorder = Recorder()
        token.on_cancel(recorder)

        def interrupted(self: CancellationToken) -> None:
            raise KeyboardInterrupt  # as if SIGINT landed inside cancel()

        monkeypatch.setattr(CancellationToken, "_detach", interrupted)
        with pytest.raises(KeyboardInterrupt):
            token.cancel("first")
        monkeypatch.undo()
        assert token.is_cancelled
        assert recorder.calls == 0
        assert token.cancel("second") is False
        assert recorder.calls == 1
        assert token.cancel_reason == "first"

    @needs_shared_tokens
    def test_an_interrupted_wake_of_a_shared_token_is_made_by_the_next_cancel(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a cancel of a shared token cut short while it wakes the processes
        (a KeyboardInterrupt in the ring, which runs under the slot's lock) leaves the
        wake-up and the callbacks to the next cancel() (regression: both were lost)."""
        token = CancellationToken()
        share(token)
        recorder = Recorder()
        token.on_cancel(recorder)
        woke = threading.Event()

        def wait() -> None:
            if token.wait_blocking(WAIT):
                woke.set()

        waiting = threading.Thread(target=wait)
        waiting.start()

        def interrupted(self: _cell.Chunk, *, own_hub: bool = True) -> None:
            raise KeyboardInterrupt  # as if SIGINT landed inside the ring

        monkeypatch.setattr(_cell.Chunk, "ring", interrupted)
        with pytest.raises(KeyboardInterrupt):
            token.cancel("first")
        monkeypatch.undo()
        assert token.is_cancelled
        assert token.cancel("second") is False
        assert recorder.calls == 1
        waiting.join(WAIT)
        assert woke.is_set()
        assert token.cancel_reason == "first"

    @needs_shared_tokens
    def test_a_cancel_interrupted_after_another_process_won_leaves_delivery_open(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a cancel() interrupted while it waited for the slot's lock, which
        another process's cancel held, leaves that cancel deliverable here: the hub (or a
        waiter) that takes it runs the callbacks (regression: they never ran)."""
        token = CancellationToken()
        share(token)
        recorder = Recorder()
        token.on_cancel(recorder)

        monkeypatch.setattr(
            token._chunk, "lock_slot", lambda offset: _OtherProcessWinsThenInterrupt(token)
        )
        with pytest.raises(KeyboardInterrupt):
            token.cancel("ours")
        monkeypatch.undo()
        token._take_remote_cancel()  # what this process's hub does for the other's cancel
        assert recorder.calls == 1
        assert token.cancel_reason == "theirs"

    def test_callback_registered_during_cancel_runs_once(self) -> None:
        """Test that a callback added by another callback during cancel() runs once."""
        token = CancellationToken()
        late = Recorder()
        token.on_cancel(lambda: token.on_cancel(late))
        token.cancel()
        assert late.calls == 1

    def test_callback_can_cancel_its_own_token(self) -> None:
        """Test that a callback calling cancel() on its own token gets False, no recursion."""
        token = CancellationToken()
        results: list[bool] = []
        token.on_cancel(lambda: results.append(token.cancel("inner")))
        assert token.cancel("outer") is True
        assert results == [False]
        assert token.cancel_reason == "outer"

    def test_callbacks_run_in_cancelling_thread(self) -> None:
        """Test that callbacks run in the thread that calls cancel(), before it returns."""
        token = CancellationToken()
        seen: list[int] = []
        token.on_cancel(lambda: seen.append(threading.get_ident()))
        thread = threading.Thread(target=token.cancel)
        thread.start()
        thread.join(WAIT)
        assert seen == [thread.ident]

    def test_on_cancel_after_all_removed_does_not_keep_listeners(self) -> None:
        """Test that removing every callback leaves nothing registered anywhere."""
        token = CancellationToken()
        handles = [token.on_cancel(Recorder()) for _ in range(10)]
        for handle in handles:
            handle.remove()
        assert token._callbacks == {}
        assert token._id not in token._chunk.listeners

    # -- racing threads ---------------------------------------------------------------------
    @pytest.mark.parametrize("shared", [False, True], ids=["local", "shared"])
    def test_racing_cancels_have_one_winner(self, shared: bool) -> None:
        """Test that 8 threads cancelling at once yield one True and one run per callback."""
        threads_count = 8
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        try:
            for _ in range(40):
                token = CancellationToken()
                if shared:
                    share(token)
                recorders = [Recorder(token) for _ in range(5)]
                for recorder in recorders:
                    token.on_cancel(recorder)
                results = race_cancels(token, threads_count)
                assert results.count(True) == 1
                assert results.count(False) == threads_count - 1
                winner = results.index(True)
                assert token.cancel_reason == f"thread-{winner}"
                for recorder in recorders:
                    assert recorder.calls == 1
                    assert recorder.reasons == [f"thread-{winner}"]
        finally:
            sys.setswitchinterval(old_interval)

    def test_on_cancel_racing_cancel_runs_every_callback_once(self) -> None:
        """Test that callbacks registered while another thread cancels each run exactly once."""
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        try:
            for _ in range(20):
                token = CancellationToken()
                recorders = [Recorder() for _ in range(200)]
                barrier = threading.Barrier(2)

                def register(
                    token: CancellationToken = token,
                    barrier: threading.Barrier = barrier,
                    recorders: list[Recorder] = recorders,
                ) -> None:
                    barrier.wait(WAIT)
                    for recorder in recorders:
                        token.on_cancel(recorder)

                registrar = threading.Thread(target=register)
                registrar.start()
                barrier.wait(WAIT)
                token.cancel()
                registrar.join(WAIT)
                assert [r.calls for r in recorders] == [1] * len(recorders)
        finally:
            sys.setswitchinterval(old_interval)

    def test_tokens_made_and_dropped_on_many_threads_keep_accounts(self) -> None:
        """Test that concurrent creation and collection never closes a chunk in use."""
        gc.collect()
        before = memfds()
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        errors: list[BaseException] = []
        keep: list[CancellationToken] = []

        def churn() -> None:
            try:
                for i in range(3000):
                    token = CancellationToken()
                    if i % 500 == 0:
                        keep.append(token)
                    del token
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        try:
            threads = [threading.Thread(target=churn) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT)
        finally:
            sys.setswitchinterval(old_interval)
        assert errors == []
        assert all(token._chunk.fd >= 0 for token in keep)  # no chunk closed under a token
        keep.clear()
        gc.collect()
        assert memfds() == before  # and none was left open with no token

    # -- waiting -----------------------------------------------------------------------------
    def test_wait_blocking_returns_true_when_cancelled_from_thread(self) -> None:
        """Test that wait_blocking() returns True once another thread cancels."""
        token = CancellationToken()
        ready = threading.Event()
        result: list[bool] = []

        def waiter() -> None:
            ready.set()
            result.append(token.wait_blocking(WAIT))

        thread = threading.Thread(target=waiter)
        thread.start()
        assert ready.wait(WAIT)
        token.cancel()
        thread.join(WAIT)
        assert result == [True]

    def test_wait_blocking_times_out(self) -> None:
        """Test that wait_blocking() returns False when the timeout passes uncancelled."""
        token = CancellationToken()
        assert token.wait_blocking(0.01) is False
        assert token.wait_blocking(0) is False

    def test_wait_blocking_on_cancelled_token_returns_at_once(self) -> None:
        """Test that wait_blocking() on a cancelled token returns True without waiting."""
        token = CancellationToken()
        token.cancel()
        assert token.wait_blocking() is True

    @pytest.mark.parametrize("bad", [-1, math.nan])
    def test_wait_blocking_rejects_bad_timeout(self, bad: float) -> None:
        """Test that wait_blocking() refuses a negative or NaN timeout, naming it."""
        with pytest.raises(ValueError, match="timeout"):
            CancellationToken().wait_blocking(bad)

    def test_wait_blocking_with_huge_timeout_does_not_spin(self) -> None:
        """Test that a wait with an enormous timeout sleeps in the kernel instead of spinning."""
        token = CancellationToken()
        cpu: list[float] = []

        def waiter() -> None:
            start = time.thread_time()
            token.wait_blocking(1e19)  # past what a timespec holds
            cpu.append(time.thread_time() - start)

        thread = threading.Thread(target=waiter)
        thread.start()
        thread.join(0.3)  # the waiter is blocked for this long ...
        token.cancel()
        thread.join(WAIT)
        assert cpu
        assert cpu[0] < 0.1

    def test_async_wait_returns_when_cancelled_from_thread(self) -> None:
        """Test that await wait() resumes once another thread cancels the token."""
        token = CancellationToken()

        async def main() -> None:
            waiter = asyncio.ensure_future(token.wait())
            await asyncio.sleep(0)
            threading.Thread(target=token.cancel, args=("from thread",)).start()
            await asyncio.wait_for(waiter, WAIT)

        asyncio.run(main())
        assert token.cancel_reason == "from thread"

    def test_async_wait_resumes_on_its_own_loop_thread(self) -> None:
        """Test that a waiter resumes on its loop's thread, not the cancelling thread."""
        token = CancellationToken()
        canceller: list[int] = []

        async def main() -> int:
            waiter = asyncio.ensure_future(token.wait())
            await asyncio.sleep(0)
            thread = threading.Thread(target=token.cancel)
            thread.start()
            canceller.append(thread.ident or 0)
            await asyncio.wait_for(waiter, WAIT)
            thread.join(WAIT)
            return threading.get_ident()

        assert asyncio.run(main()) == threading.get_ident() != canceller[0]

    def test_async_wait_does_not_poll(self) -> None:
        """Test that a waiting token schedules no timer on the event loop."""
        token = CancellationToken()

        async def main() -> None:
            loop = asyncio.get_running_loop()
            waiter = asyncio.ensure_future(token.wait())
            await asyncio.sleep(0)
            assert not loop._scheduled  # type: ignore[attr-defined]
            token.cancel()
            await asyncio.wait_for(waiter, WAIT)

        asyncio.run(main())

    def test_async_wait_wakes_waiters_on_several_loops(self) -> None:
        """Test that one cancel wakes waiters on event loops in different threads."""
        token = CancellationToken()
        loops = 3
        ready = threading.Barrier(loops + 1)
        woke: list[bool] = []

        def loop_thread() -> None:
            async def main() -> None:
                waiter = asyncio.ensure_future(token.wait())
                await asyncio.sleep(0)
                ready.wait(WAIT)
                await asyncio.wait_for(waiter, WAIT)
                woke.append(token.is_cancelled)

            asyncio.run(main())

        threads = [threading.Thread(target=loop_thread) for _ in range(loops)]
        for thread in threads:
            thread.start()
        ready.wait(WAIT)
        token.cancel()
        for thread in threads:
            thread.join(WAIT)
        assert woke == [True] * loops

    def test_async_wait_on_cancelled_token_returns_at_once(self) -> None:
        """Test that await wait() on a cancelled token returns without suspending."""
        token = CancellationToken()
        token.cancel()
        asyncio.run(asyncio.wait_for(token.wait(), WAIT))

    def test_cancelled_waiter_leaves_no_callback(self) -> None:
        """Test that cancelling the waiting task removes its callback from the token."""
        token = CancellationToken()

        async def main() -> None:
            waiter = asyncio.ensure_future(token.wait())
            await asyncio.sleep(0)
            assert len(token._callbacks) == 1
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter

        asyncio.run(main())
        assert token._callbacks == {}

    def test_repeated_waits_do_not_grow_the_token(self) -> None:
        """Test that many completed or abandoned waits leave no callbacks behind."""
        token = CancellationToken()

        async def main() -> None:
            for _ in range(200):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(token.wait(), 0)

        asyncio.run(main())
        assert token._callbacks == {}

    # -- linked tokens, timeouts ---------------------------------------------------------------
    def test_child_cancelled_with_parent(self) -> None:
        """Test that a child is cancelled, with the parent's reason, when the parent is."""
        parent = CancellationToken()
        child = parent.child()
        grandchild = child.child()
        parent.cancel("shutdown")
        assert child.is_cancelled
        assert grandchild.is_cancelled
        assert child.cancel_reason == grandchild.cancel_reason == "shutdown"

    def test_child_cancel_does_not_reach_parent(self) -> None:
        """Test that cancelling a child leaves its parent and siblings alone."""
        parent = CancellationToken()
        child, sibling = parent.child(), parent.child()
        child.cancel()
        assert not parent.is_cancelled
        assert not sibling.is_cancelled

    def test_child_of_cancelled_parent_starts_cancelled(self) -> None:
        """Test that a child made from a cancelled parent is cancelled at once."""
        parent = CancellationToken()
        parent.cancel("early")
        child = parent.child()
        assert child.is_cancelled
        assert child.cancel_reason == "early"

    def test_linked_cancelled_when_any_source_is(self) -> None:
        """Test that linked(a, b, c) is cancelled, with that reason, when b is."""
        a, b, c = CancellationToken(), CancellationToken(), CancellationToken()
        linked = CancellationToken.linked(a, b, c)
        assert not linked.is_cancelled
        b.cancel("b went")
        assert linked.is_cancelled
        assert linked.cancel_reason == "b went"
        assert not a.is_cancelled
        assert not c.is_cancelled

    def test_linked_rejects_non_tokens(self) -> None:
        """Test that linked() names the argument that is not a token."""
        with pytest.raises(TypeError, match=r"tokens\[1\]"):
            CancellationToken.linked(CancellationToken(), "nope")  # type: ignore[arg-type]

    def test_cancelled_link_is_dropped_from_sources(self) -> None:
        """Test that once a linked token is cancelled, its sources hold no callback for it."""
        a, b = CancellationToken(), CancellationToken()
        linked = CancellationToken.linked(a, b)
        assert len(a._callbacks) == len(b._callbacks) == 1
        linked.cancel()
        assert a._callbacks == {}
        assert b._callbacks == {}

    def test_close_unlinks_child(self) -> None:
        """Test that a closed child is no longer cancelled by its parent."""
        parent = CancellationToken()
        child = parent.child()
        child.close()
        parent.cancel()
        assert not child.is_cancelled
        assert parent._callbacks == {}

    def test_context_manager_closes_token(self) -> None:
        """Test that leaving a ``with`` block closes the token's links and timer."""
        parent = CancellationToken()
        before = _timer.pending()
        with parent.child(timeout=60) as child:
            assert _timer.pending() == before + 1
        assert _timer.pending() == before
        parent.cancel()
        assert not child.is_cancelled

    def test_short_lived_children_do_not_grow_parent(self) -> None:
        """Test that collected children leave the parent's callbacks and timers as before."""
        parent = CancellationToken()
        refs = []
        for _ in range(500):
            child = parent.child(timeout=60)
            refs.append(weakref.ref(child))
            del child
        gc.collect()
        assert all(ref() is None for ref in refs)
        assert parent._callbacks == {}
        assert _timer.pending() == 0

    def test_linked_token_collected_leaves_sources_clean(self) -> None:
        """Test that a collected linked token removes its callback from every source."""
        sources = [CancellationToken() for _ in range(3)]
        for _ in range(100):
            CancellationToken.linked(*sources)
        gc.collect()
        assert all(source._callbacks == {} for source in sources)

    def test_parent_does_not_keep_children_alive(self) -> None:
        """Test that a parent holds its children only weakly."""
        parent = CancellationToken()
        ref = weakref.ref(parent.child())
        gc.collect()
        assert ref() is None

    def test_timeout_cancels_token(self) -> None:
        """Test that CancellationToken(timeout=s) cancels itself with a timeout reason."""
        token = CancellationToken(timeout=0.01)
        assert token.wait_blocking(WAIT) is True
        assert token.cancel_reason == "timeout after 0.01s"
        assert _timer.pending() == 0

    def test_child_timeout_cancels_child_only(self) -> None:
        """Test that a child's timeout cancels the child but not its parent."""
        parent = CancellationToken()
        child = parent.child(timeout=0)
        assert child.wait_blocking(WAIT)
        assert not parent.is_cancelled

    def test_manual_cancel_removes_timer(self) -> None:
        """Test that cancelling a timeout token unschedules its timer at once."""
        token = CancellationToken(timeout=3600)
        assert _timer.pending() == 1
        token.cancel()
        assert _timer.pending() == 0

    def test_collected_timeout_token_removes_timer(self) -> None:
        """Test that dropping an uncancelled timeout token unschedules its timer."""
        ref = weakref.ref(CancellationToken(timeout=3600))
        gc.collect()
        assert ref() is None
        assert _timer.pending() == 0

    # -- resources and pickling ---------------------------------------------------------------

    def test_pickle_outside_process_start_raises(self) -> None:
        """Test that pickling a token outside a process start raises TypeError."""
        with pytest.raises(TypeError, match="process"):
            pickle.dumps(CancellationToken())

    def test_sending_through_pipe_raises(self) -> None:
        """Test that sending a token through a pipe to a running process raises TypeError."""
        with pipe() as (_reader, writer), pytest.raises(TypeError):
            writer.send(CancellationToken())

    # -- across processes ------------------------------------------------------------------------
    @needs_shared_tokens
    def test_parent_cancel_wakes_child(
        self, mp_context: multiprocessing.context.BaseContext
    ) -> None:
        """Test that a cancel in the parent wakes wait_blocking() in the child, with the reason."""
        token = CancellationToken()
        ready = mp_context.Event()
        with (
            pipe() as (reader, writer),
            running(mp_context, _child_waits, token, ready, writer) as proc,
        ):
            assert ready.wait(WAIT)
            token.cancel("parent says stop")
            assert receive(reader) == (True, True, "parent says stop")
            proc.join(WAIT)
            assert proc.exitcode == 0

    @needs_shared_tokens
    def test_child_cancel_reaches_parent_callbacks(
        self, mp_context: multiprocessing.context.BaseContext
    ) -> None:
        """Test that a cancel in the child runs the parent's callbacks and sets flag and reason."""
        token = CancellationToken()
        recorder = Recorder(token)
        token.on_cancel(recorder)
        go = mp_context.Event()
        with running(mp_context, _child_cancels, token, go, "child says stop") as proc:
            go.set()
            assert recorder.called.wait(WAIT)
            proc.join(WAIT)
            assert proc.exitcode == 0
        assert token.is_cancelled
        assert token.cancel_reason == "child says stop"
        assert recorder.calls == 1
        assert recorder.reasons == ["child says stop"]
        assert token.cancel("late") is False

    @needs_shared_tokens
    def test_child_cancel_wakes_parent_asyncio_waiter(
        self, mp_context: multiprocessing.context.BaseContext
    ) -> None:
        """Test that a cancel in the child wakes an asyncio waiter in the parent."""
        token = CancellationToken()
        go = mp_context.Event()

        async def main() -> None:
            waiter = asyncio.ensure_future(token.wait())
            await asyncio.sleep(0)
            with running(mp_context, _child_cancels, token, go, "from child") as proc:
                go.set()
                await asyncio.wait_for(waiter, WAIT)
                proc.join(WAIT)
                assert proc.exitcode == 0

        asyncio.run(main())
        assert token.cancel_reason == "from child"

    @needs_shared_tokens
    def test_several_tokens_go_to_one_process(
        self, mp_context: multiprocessing.context.BaseContext
    ) -> None:
        """Test that many tokens of one chunk can be given to one process start.

        Regression: spawn refused the chunk's descriptor listed once per token.
        """
        tokens = [CancellationToken() for _ in range(5)]
        tokens[3].cancel("three")
        with (
            pipe() as (reader, writer),
            running(mp_context, _child_reports_states, tokens, writer) as proc,
        ):
            states = receive(reader)
            proc.join(WAIT)
            assert proc.exitcode == 0
        assert states == [(False, None)] * 3 + [(True, "three"), (False, None)]

    @needs_shared_tokens
    def test_reason_set_before_sharing_reaches_child(self, mp_singletons: None) -> None:
        """Test that a reason given while only this process saw the token reaches a child,
        even when another token had already shared the memory.

        Regression: the child saw the token cancelled with no reason.
        """
        ctx = multiprocessing.get_context("spawn")
        early, other = CancellationToken(), CancellationToken()
        early.cancel("before sharing")
        with pipe() as (reader, writer), running(ctx, _child_reports_states, [other], writer):
            receive(reader)
        with pipe() as (reader, writer), running(ctx, _child_reports_states, [early], writer):
            assert receive(reader) == [(True, "before sharing")]

    @needs_shared_tokens
    def test_token_made_after_another_was_shared_stays_private(self, mp_singletons: None) -> None:
        """Test that handing one token to a process leaves tokens made later private:
        their callbacks need no hub thread and run in cancel() itself.

        Regression: sharing was per chunk, so every later token paid for cross-process
        delivery (a hub thread started per ``on_cancel``/``wait()``, a slot lock per cancel).
        """
        ctx = multiprocessing.get_context("spawn")
        handed = CancellationToken()
        with pipe() as (reader, writer), running(ctx, _child_reports_states, [handed], writer):
            receive(reader)
        later = CancellationToken()
        assert later._chunk is handed._chunk
        recorder = Recorder()
        later.on_cancel(recorder)
        assert not [t for t in threading.enumerate() if t.name == "cancelflow-token-hub"]
        later.cancel()
        assert recorder.calls == 1

    @needs_shared_tokens
    def test_parent_cancel_wakes_asyncio_waiter_in_child(self, mp_singletons: None) -> None:
        """Test that an asyncio waiter in a forked child wakes on the parent's cancel.

        Regression: a callback registered in the parent before the fork used to stop the
        child from watching the token, so the child's waiter never woke.
        """
        ctx = multiprocessing.get_context("fork")
        token = CancellationToken()
        token.on_cancel(Recorder())
        ready = ctx.Event()
        with pipe() as (reader, writer), running(ctx, _child_awaits, token, ready, writer) as proc:
            assert ready.wait(WAIT)
            token.cancel()
            assert receive(reader) is True
            proc.join(WAIT)
            assert proc.exitcode == 0

    def test_forked_child_starts_without_parent_callbacks(self, mp_singletons: None) -> None:
        """Test that a forked child does not inherit (and so never reruns) parent callbacks."""
        ctx = multiprocessing.get_context("fork")
        token = CancellationToken()
        token.on_cancel(Recorder())
        with pipe() as (reader, writer), running(ctx, _child_reports_callbacks, token, writer):
            assert receive(reader) == 0

    def test_forked_child_timeouts_fire(self, mp_singletons: None) -> None:
        """Test that a timeout made in a forked child fires while the parent has timers too.

        Regression: the child inherited "timer thread running" without the thread.
        """
        ctx = multiprocessing.get_context("fork")
        pending = CancellationToken(timeout=3600)
        with pipe() as (reader, writer), running(ctx, _child_times_out, writer) as proc:
            assert receive(reader) is True
            proc.join(WAIT)
        pending.close()

    @needs_shared_tokens
    def test_long_reason_is_cut_across_processes(self, mp_singletons: None) -> None:
        """Test that a reason crosses processes cut to 120 bytes of whole UTF-8 characters."""
        ctx = multiprocessing.get_context("spawn")
        token = CancellationToken()
        ready = ctx.Event()
        reason = "é" * 100  # 200 bytes
        with pipe() as (reader, writer), running(ctx, _child_waits, token, ready, writer):
            assert ready.wait(WAIT)
            token.cancel(reason)
            assert receive(reader) == (True, True, "é" * 60)
        assert token.cancel_reason == reason

    @needs_shared_tokens
    def test_shared_token_releases_descriptor(self, mp_singletons: None) -> None:
        """Test that a token passed to a child still frees its descriptor when collected."""
        ctx = multiprocessing.get_context("spawn")
        gc.collect()
        before = memfds()
        token = CancellationToken()
        ready = ctx.Event()
        with pipe() as (reader, writer), running(ctx, _child_waits, token, ready, writer):
            assert ready.wait(WAIT)
            token.cancel()
            receive(reader)
        del token
        gc.collect()
        assert memfds() == before

    # -- signal handlers ---------------------------------------------------------------------
    @pytest.mark.timeout(60)
    def test_signal_cancel_while_checking_flag(self) -> None:
        """Test that a handler's cancel() ends a hot is_cancelled loop in the main thread."""
        token = CancellationToken()
        with sigusr1_storm(lambda: token.cancel("signal")):
            while not token.is_cancelled:
                pass
        assert token.cancel_reason == "signal"

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize("shared", [False, True], ids=["local", "shared"])
    def test_signal_cancel_during_on_cancel_and_remove(self, shared: bool) -> None:
        """Test that a handler cancelling the token being (un)registered never deadlocks.

        Every callback either ran once or was removed, never both, never twice.
        """
        tokens = [CancellationToken() for _ in range(60)]
        if shared:
            share(tokens[0])
        wins: list[tuple[int, bool]] = []
        current = [0]

        def handler() -> None:
            index = current[0]
            if index < len(tokens) - 1:
                wins.append((index, tokens[index].cancel("signal")))
                current[0] = index + 1

        recorders: list[Recorder] = []
        removed: list[bool] = []

        def body(i: int) -> None:
            recorder = Recorder()
            recorders.append(recorder)
            handle = tokens[current[0]].on_cancel(recorder)
            removed.append(handle.remove())

        with sigusr1_storm(handler) as handled:
            storm_loop(handled, signals=50, body=body)
        cancelled = {index for index, _ in wins}
        assert sorted(index for index, won in wins if won) == sorted(cancelled)
        for recorder, was_removed in zip(recorders, removed, strict=True):
            assert recorder.calls + was_removed == 1
        assert all(token._callbacks == {} for token in tokens)

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize("shared", [False, True], ids=["local", "shared"])
    def test_signal_cancels_other_token_during_on_cancel_and_remove(self, shared: bool) -> None:
        """Test that a handler cancelling token B while main (un)registers on A never deadlocks."""
        a = CancellationToken()
        victims = [CancellationToken() for _ in range(200)]
        if shared:
            share(a)
        victim_recorders = [Recorder() for _ in victims]
        for victim, recorder in zip(victims, victim_recorders, strict=True):
            victim.on_cancel(recorder)
        a_recorder = Recorder()
        index = [0]

        def handler() -> None:
            i = index[0]
            if i < len(victims):
                index[0] = i + 1
                victims[i].cancel("signal")

        def body(i: int) -> None:
            a.on_cancel(a_recorder).remove()

        with sigusr1_storm(handler) as handled:
            storm_loop(handled, signals=100, body=body)
        assert not a.is_cancelled
        assert a_recorder.calls == 0
        assert a._callbacks == {}
        assert index[0] > 0
        assert [r.calls for r in victim_recorders] == [int(v.is_cancelled) for v in victims]

    @pytest.mark.timeout(60)
    def test_signal_cancel_during_cancel_and_reset_that_log(self, logs: LogCapture) -> None:
        """Test that a handler cancelling A or B while main cancels/resets A, both with
        logging callbacks, never deadlocks and runs each callback exactly once."""
        a = CancellationToken(name="A")
        victims = [CancellationToken(name=f"B{i}") for i in range(200)]
        victim_calls = [0] * len(victims)
        a_calls: list[int] = []
        # Wins are appended, never counted with +=: a nested handler may land between
        # the read and the write of a +=, and that update would be lost (seen without GIL).
        handler_wins: list[bool] = []
        turn = [0]

        def victim_callback(i: int) -> Callable[[], None]:
            def callback() -> None:
                victim_calls[i] += 1
                logger.trace("victim {} cancelled", i)

            return callback

        for i, victim in enumerate(victims):
            victim.on_cancel(victim_callback(i))

        def handler() -> None:
            turn[0] += 1
            if turn[0] % 2:
                handler_wins.append(a.cancel("signal"))
            elif turn[0] // 2 < len(victims):
                victims[turn[0] // 2].cancel("signal")

        main_wins: list[bool] = []

        def body(i: int) -> None:
            a_calls.append(0)

            def callback(slot: int = i) -> None:
                a_calls[slot] += 1
                logger.trace("A cancelled in round {}", slot)

            a.on_cancel(callback)
            main_wins.append(a.cancel("main"))
            a.reset()

        with sigusr1_storm(handler) as handled:
            rounds = storm_loop(handled, signals=200, body=body)
        assert a_calls == [1] * rounds
        # One winning cancel per round, plus one if the handler cancelled after the last reset.
        assert sum(main_wins) + sum(handler_wins) == rounds + int(a.is_cancelled)
        cancelled = [v.is_cancelled for v in victims]
        assert victim_calls == [int(c) for c in cancelled]
        assert any(r["message"].startswith("A cancelled") for r in logs.records)

    @pytest.mark.timeout(60)
    def test_signal_cancel_while_cancel_logs_callback_errors(self, logs: LogCapture) -> None:
        """Test that a handler cancelling B while main's cancel() logs a callback error
        (some of B's callbacks raising too) never deadlocks and runs every callback once."""
        victims = [CancellationToken() for _ in range(100)]
        victim_calls = [0] * len(victims)

        def counting(counter: list[int], i: int, *, fail: bool) -> Callable[[], None]:
            def callback() -> None:
                counter[i] += 1
                if fail:
                    raise ValueError("callback failure")

            return callback

        for i, victim in enumerate(victims):
            # Every 4th raises, so that the handler logs (re-entering loguru) now and then;
            # every logged error costs loguru a rendering of pytest's whole stack.
            victim.on_cancel(counting(victim_calls, i, fail=i % 4 == 0))
        index = [0]

        def handler() -> None:
            i = index[0]
            if i < len(victims):
                index[0] = i + 1
                victims[i].cancel("signal")

        main_calls: list[int] = []

        def body(i: int) -> None:
            token = CancellationToken()
            main_calls.append(0)
            token.on_cancel(counting(main_calls, i, fail=True))
            assert token.cancel("main") is True

        with sigusr1_storm(handler) as handled:
            rounds = storm_loop(handled, signals=20, body=body)
        assert main_calls == [1] * rounds
        assert victim_calls == [int(v.is_cancelled) for v in victims]
        errors = [r for r in logs.records if r["level"].name == "ERROR"]
        assert 0 < len(errors) <= rounds + index[0]

    @pytest.mark.timeout(60)
    def test_signal_cancel_of_timeout_token_during_timer_work(self) -> None:
        """Test that a handler cancelling a timeout token while main arms and disarms
        timers never deadlocks (regression: the timer lock was taken by cancel())."""
        before = _timer.pending()
        victims = [CancellationToken(timeout=3600) for _ in range(200)]
        index = [0]

        def handler() -> None:
            i = index[0]
            if i < len(victims):
                index[0] = i + 1
                victims[i].cancel("signal")

        def body(i: int) -> None:
            CancellationToken(timeout=3600).close()

        with sigusr1_storm(handler) as handled:
            storm_loop(handled, signals=100, body=body)
        assert any(v.is_cancelled for v in victims)
        for victim in victims:
            victim.close()
        assert _timer.pending() == before

    @pytest.mark.timeout(60)
    def test_signal_cancel_wakes_asyncio_waiter_in_same_thread(self) -> None:
        """Test that a cancel() from a signal handler wakes an asyncio waiter on that thread.

        As with any Python signal handler and an event loop, the loop must be woken by the
        signal itself (asyncio's ``add_signal_handler`` does this with a wakeup fd): a
        signal landing just before the loop blocks only runs its handler once the loop
        wakes. The test sets that wakeup fd up the same way.
        """
        token = CancellationToken()
        main_ident = threading.get_ident()
        ready = threading.Event()
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_handler = signal.signal(signal.SIGUSR1, lambda signum, frame: token.cancel("sig"))
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())

        def kicker() -> None:
            if ready.wait(WAIT):
                signal.pthread_kill(main_ident, signal.SIGUSR1)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.add_reader(wake_r, wake_r.recv, 64)  # the handler runs once the loop wakes
            waiter = asyncio.ensure_future(token.wait())
            await asyncio.sleep(0)
            thread = threading.Thread(target=kicker)
            thread.start()
            ready.set()
            try:
                await asyncio.wait_for(waiter, WAIT)
            finally:
                thread.join(WAIT)
                loop.remove_reader(wake_r)

        try:
            asyncio.run(main())
        finally:
            signal.set_wakeup_fd(old_wakeup)
            signal.signal(signal.SIGUSR1, old_handler)
            wake_r.close()
            wake_w.close()
        assert token.cancel_reason == "sig"


class TestConcurrentCancels:
    """Several threads cancel one token at once (what a free-threaded build runs truly in
    parallel; a thread switch can land in the same places under the GIL)."""

    def test_a_losing_cancel_returns_with_the_token_cancelled(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a cancel() that loses to one still on its way to the flag returns
        False only once the token reads cancelled, with the winner's reason (regression:
        it returned at once, the token not cancelled yet)."""
        token = CancellationToken()
        claimed, go, waiting = threading.Event(), threading.Event(), threading.Event()
        real_is_shared = CancellationToken._is_shared
        real_await = getattr(CancellationToken, "_await_claim", None)
        held = [True]

        def held_is_shared(self: CancellationToken) -> bool:
            # The winner's first step after its claim, before it sets the flag: held.
            if threading.current_thread().name == "winner" and held:
                held.clear()
                claimed.set()
                assert go.wait(WAIT)
            return real_is_shared(self)

        def watched_await(self: CancellationToken, me: int) -> bool:
            waiting.set()
            assert real_await is not None
            return bool(real_await(self, me))

        monkeypatch.setattr(CancellationToken, "_is_shared", held_is_shared)
        monkeypatch.setattr(CancellationToken, "_await_claim", watched_await, raising=False)
        winner = threading.Thread(target=token.cancel, args=("first",), name="winner")
        winner.start()
        assert claimed.wait(WAIT)
        seen: list[tuple[bool, bool, str | None]] = []

        def lose() -> None:
            seen.append((token.cancel("second"), token.is_cancelled, token.cancel_reason))

        loser = threading.Thread(target=lose)
        loser.start()
        assert wait_until(lambda: waiting.is_set() or not loser.is_alive())
        go.set()
        loser.join(WAIT)
        winner.join(WAIT)
        assert seen == [(False, True, "first")]

    def test_the_winner_runs_every_callback_itself(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Test that a cancel() arriving while the winning one is about to run the callbacks
        runs none of them: the winner runs them all, in its thread, before it returns
        (regression: the late call took them for leftovers of an interrupted delivery)."""
        token = CancellationToken()
        ran_in: list[str] = []
        for _ in range(5):
            token.on_cancel(lambda: ran_in.append(threading.current_thread().name))
        delivering, go = threading.Event(), threading.Event()
        real_finish = CancellationToken._finish
        first = [True]

        def held_finish(self: CancellationToken) -> None:
            if first:
                first.clear()
                delivering.set()
                assert go.wait(WAIT)
            real_finish(self)

        monkeypatch.setattr(CancellationToken, "_finish", held_finish)
        winner = threading.Thread(target=token.cancel, args=("first",), name="winner")
        winner.start()
        assert delivering.wait(WAIT)
        late = threading.Thread(target=token.cancel, args=("late",), name="late")
        late.start()
        late.join(WAIT)
        assert not late.is_alive()
        go.set()
        winner.join(WAIT)
        assert ran_in == ["winner"] * 5


class TestTheFlagOtherProcessesSee:
    """A token that only this process can see keeps its flag in a plain attribute (the
    cheapest read); one that another process may see reads the flag in shared memory. A
    cancel always writes the shared flag, so the switch loses nothing."""

    @needs_shared_tokens
    def test_a_cancel_in_another_process_is_read_at_once_without_a_callback(
        self, mp_context: multiprocessing.context.BaseContext
    ) -> None:
        """Test that a cancel made by a child process (any start method) turns the
        parent's ``is_cancelled`` true with nothing registered on the token (no hub)."""
        token = CancellationToken()
        go = mp_context.Event()
        with running(mp_context, _child_cancels, token, go, "from the child") as proc:
            go.set()
            proc.join(WAIT)
            assert proc.exitcode == 0
        assert token.is_cancelled
        assert token.cancel_reason == "from the child"

    @needs_shared_tokens
    def test_a_cancel_made_before_sharing_reads_the_same_through_the_slot(self) -> None:
        """Test that a token cancelled while only this process saw it reads cancelled
        through another object on its slot once shared (what a child builds)."""
        token = CancellationToken()
        token.cancel("early")
        share(token)
        view = token_on_slot(token._chunk, token._offset)
        assert (token.is_cancelled, view.is_cancelled) == (True, True)

    @needs_shared_tokens
    def test_reset_clears_the_flag_every_process_reads(self) -> None:
        """Test that reset() after sharing clears the token and every view of its slot."""
        token = CancellationToken()
        share(token)
        view = token_on_slot(token._chunk, token._offset)
        token.cancel()
        token.reset()
        assert (token.is_cancelled, view.is_cancelled) == (False, False)
        view.cancel("again")
        assert token.is_cancelled

    @needs_shared_tokens
    def test_a_shared_token_is_still_an_instance_of_its_own_class(self) -> None:
        """Test that sharing keeps a user's subclass: its methods, its name, isinstance."""

        class AuditedToken(CancellationToken):
            def cancel(self, reason: str | None = None) -> bool:
                self.audit = reason
                return super().cancel(reason)

        token = AuditedToken(name="audited")
        share(token)
        view = token_on_slot(token._chunk, token._offset, kind=AuditedToken)
        for each in (token, view):
            assert isinstance(each, AuditedToken)
            assert type(each).__name__ == "AuditedToken"
        assert token.cancel("kept") is True
        assert token.audit == "kept"
        assert view.is_cancelled
        assert repr(token) == "<CancellationToken audited cancelled, reason='kept'>"

    @needs_shared_tokens
    def test_a_fork_while_another_thread_cancels_shares_every_token(self) -> None:
        """Test that tokens alive at a fork, some cancelled by another thread of the parent
        while it forks, read the same on both sides: the child sees the parent's cancels
        and the parent sees the child's, through ``is_cancelled`` alone."""
        ctx = multiprocessing.get_context("fork")
        tokens = [CancellationToken() for _ in range(300)]
        theirs = tokens[200:]  # cancelled by the child
        started = threading.Event()

        def cancel_ours() -> None:
            started.set()
            for token in tokens[:200]:
                token.cancel("parent")

        canceller = threading.Thread(target=cancel_ours)
        canceller.start()
        assert started.wait(WAIT)
        with pipe() as (reader, writer):
            with running(ctx, _child_cancels_and_reports, tokens, 200, writer) as proc:
                canceller.join(WAIT)
                seen = receive(reader)
                proc.join(WAIT)
                assert proc.exitcode == 0
        assert seen == [True] * 200  # the parent's cancels, all of them, in the child
        assert all(token.is_cancelled for token in theirs)
        assert {token.cancel_reason for token in theirs} == {"child"}

    @needs_shared_tokens
    def test_a_subclass_whose_init_subclass_wants_keywords_is_shared_through_a_fork(
        self,
    ) -> None:
        """Test that a fork shares a token of a user's subclass whose ``__init_subclass__``
        requires a keyword, and the tokens made after it: no subclass of the user's class
        is made (which would call that hook), and a child's cancels reach the parent."""

        class Tagged(CancellationToken):
            tags: dict[str, type[CancellationToken]] = {}  # noqa: RUF012 - a user's registry

            def __init_subclass__(cls, *, tag: str, **kwargs: Any) -> None:
                super().__init_subclass__(**kwargs)
                Tagged.tags[tag] = cls

        class JobToken(Tagged, tag="job"):
            pass

        ctx = multiprocessing.get_context("fork")
        tokens = [JobToken(), CancellationToken()]
        with pipe() as (reader, writer):
            with running(ctx, _child_cancels_and_reports, tokens, 0, writer) as proc:
                receive(reader)
                proc.join(WAIT)
                assert proc.exitcode == 0
        assert [token.is_cancelled for token in tokens] == [True, True]
        assert Tagged.tags == {"job": JobToken}
        assert JobToken.__subclasses__() == []

    @needs_shared_tokens
    @pytest.mark.skipif(
        not getattr(sys, "_is_gil_enabled", lambda: True)(),
        reason="free-threaded 3.13t keeps classes made after a fork with threads alive even "
        "when no token of theirs was shared (measured), so this cannot tell sharing apart",
    )
    def test_a_subclass_made_at_run_time_is_not_kept_by_sharing(self) -> None:
        """Test that sharing a token of a class made at run time does not keep the class
        alive once its tokens are gone."""

        def shared_token_of_a_new_class() -> weakref.ref[type[CancellationToken]]:
            class PerJob(CancellationToken):
                pass

            share(PerJob())
            return weakref.ref(PerJob)

        classes = [shared_token_of_a_new_class() for _ in range(3)]

        def all_collected() -> bool:
            gc.collect()  # a free-threaded build may free a type only at a later pass
            return all(ref() is None for ref in classes)

        assert wait_until(all_collected), [ref() for ref in classes]

    def test_an_interrupted_fork_hook_still_shares_every_token(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a KeyboardInterrupt (Ctrl-C during a fork) raised while the fork hook
        shares one token does not leave the others on their local copy: every token is
        shared, and the interrupt is raised once the hook is done."""
        tokens = [CancellationToken() for _ in range(3)]
        real = CancellationToken._share
        interrupts = [KeyboardInterrupt()]

        def share_once_interrupted(token: CancellationToken) -> None:
            if token is tokens[1] and interrupts:
                raise interrupts.pop()
            real(token)

        monkeypatch.setattr(CancellationToken, "_share", share_once_interrupted)
        with pytest.raises(KeyboardInterrupt):
            _token._share_every_token()
        assert [type(token)._shared_view for token in tokens] == [True, True, True]

    def test_a_token_collected_at_interpreter_exit_is_quiet(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a token collected after the module's globals were cleared (interpreter
        exit, where a free-threaded build runs late finalizers) reports nothing."""
        token = CancellationToken()
        unraisable: list[Any] = []
        monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
        monkeypatch.setattr(_token, "_local_tokens", None)
        del token
        gc.collect()
        assert unraisable == []

    @needs_shared_tokens
    def test_a_local_cancel_also_writes_the_flag_other_processes_read(self) -> None:
        """Test that cancelling a token only this process sees also sets the flag in its
        slot: what makes sharing it at any moment (a fork from another thread, a signal
        handler) lose nothing."""
        token = CancellationToken()
        view = token_on_slot(token._chunk, token._offset)
        token.cancel("local")
        assert not token._is_shared()
        assert view.is_cancelled
        share(token)
        assert token.is_cancelled
        assert token.cancel_reason == "local"


#: Threads make, link, cancel and drop tokens while the main thread forks; each child
#: cancels every token alive at its fork, and the parent checks that it sees each cancel.
_FORKS_WHILE_THREADS_DROP_TOKENS = """
import gc, os, sys, threading
from cancelflow import CancellationToken

root = CancellationToken()
tokens = []
stop = threading.Event()

def churn():
    i = 0
    while not stop.is_set():
        i += 1
        kind = i % 4
        if kind == 0:
            t = CancellationToken()
        elif kind == 1:
            t = root.child()
        elif kind == 2:
            t = CancellationToken(timeout=3600)
        else:
            t = CancellationToken.linked(root, CancellationToken())
        if i % 7 == 0:
            t.cancel("local")
        if i % 50 == 0:  # cyclic garbage, collected: on a free-threaded build each
            loop = [None]  # collection stops the world, as a __class__ switch does
            loop[0] = loop
            gc.collect(0)
        tokens.append(t)
        if len(tokens) > 1500:
            del tokens[:500]

threads = [threading.Thread(target=churn) for _ in range(4)]
for thread in threads:
    thread.start()
missed = 0
for _ in range(int(sys.argv[1])):
    before = list(tokens)  # taken here: a list another thread locks is not safe to read
    read, write = os.pipe()  # in a child of a free-threaded build
    pid = os.fork()
    if pid == 0:
        for token in before:
            token.cancel("child")
        os.write(write, repr([token._id for token in before]).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 1 << 20):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    by_id = {token._id: token for token in before}
    missed += sum(not by_id[i].is_cancelled for i in eval(data))
stop.set()
for thread in threads:
    thread.join()
print("missed", missed)
"""


class TestForkWhileThreadsDropTokens:
    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    def test_every_fork_completes_and_the_child_cancels_what_it_inherited(self) -> None:
        """Test that forks made while other threads make, cancel and drop tokens all
        complete and that every cancel a child makes is seen by the parent (regression,
        free-threaded 3.13: a token freed in the child before the fork hooks ran waited
        for the slots' lock held by a thread the child does not have, and dropped tokens'
        finalizers nested until the recursion limit; a token registered between the
        parent's fork hook and the fork made the child switch its class, which stops the
        world, whose lock a collecting thread of the parent could hold at the fork: the
        child hung)."""
        done = run_script(_FORKS_WHILE_THREADS_DROP_TOKENS, "25")
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.split() == ["missed", "0"], done.stdout + done.stderr[-3000:]
        assert "RecursionError" not in done.stderr, done.stderr[-3000:]


class TestCallbackHandle:
    def test_remove_before_cancel_prevents_run(self) -> None:
        """Test that a removed callback never runs and remove() returns True."""
        token = CancellationToken()
        recorder = Recorder()
        handle = token.on_cancel(recorder)
        assert isinstance(handle, CallbackHandle)
        assert handle.remove() is True
        token.cancel()
        assert recorder.calls == 0

    def test_remove_is_idempotent(self) -> None:
        """Test that a second remove() returns False and changes nothing."""
        token = CancellationToken()
        handle = token.on_cancel(Recorder())
        assert handle.remove() is True
        assert handle.remove() is False

    def test_remove_after_run_returns_false(self) -> None:
        """Test that remove() after the callback ran returns False."""
        token = CancellationToken()
        handle = token.on_cancel(Recorder())
        token.cancel()
        assert handle.remove() is False

    def test_remove_leaves_other_callbacks(self) -> None:
        """Test that removing one callback keeps the others registered."""
        token = CancellationToken()
        kept, dropped = Recorder(), Recorder()
        token.on_cancel(kept)
        token.on_cancel(dropped).remove()
        token.cancel()
        assert (kept.calls, dropped.calls) == (1, 0)

    def test_context_manager_removes_callback(self) -> None:
        """Test that leaving a ``with handle`` block removes the callback."""
        token = CancellationToken()
        recorder = Recorder()
        with token.on_cancel(recorder):
            pass
        token.cancel()
        assert recorder.calls == 0
