"""Specification of ``cancelflow._timer``: one timer thread per process for every deadline.

``call_at`` runs a callback on the timer thread once a ``time.monotonic()`` deadline has
passed; ``TimerHandle.cancel`` removes it at once; the thread runs only while a timer is
pending. Every test waits on events under a watchdog; the deadlines it sets are a few
milliseconds away, and what it checks is order, never how long anything took.
"""

from __future__ import annotations

import math
import multiprocessing
import threading
import time
from typing import Any

import pytest

from cancelflow import CancellationToken, _timer
from cancelflow._platform import HAVE_ALARM
from support import WAIT, LogCapture, pipe, receive, running, wait, wait_until


def soon(seconds: float = 0.005) -> float:
    """A deadline ``seconds`` from now."""
    return time.monotonic() + seconds


def timer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "cancelflow-timer" and t.is_alive()]


def _child_reports_timers(conn: Any) -> None:
    """In a forked child: the timers it inherited, then whether one of its own fires."""
    fired = threading.Event()
    inherited = _timer.pending()
    _timer.call_at(soon(), fired.set)
    conn.send((inherited, fired.wait(WAIT)))


class TestCallAt:
    def test_runs_the_callback_on_the_timer_thread_once_the_deadline_passed(self) -> None:
        """Test that the callback runs on the cancelflow-timer thread, at or after its
        deadline by the monotonic clock."""
        ran = threading.Event()
        seen: list[tuple[str, float]] = []
        deadline = soon()

        def callback() -> None:
            seen.append((threading.current_thread().name, time.monotonic()))
            ran.set()

        _timer.call_at(deadline, callback)
        wait(ran)
        ((thread_name, at),) = seen
        assert thread_name == "cancelflow-timer"
        assert at >= deadline

    def test_callbacks_run_in_deadline_order(self) -> None:
        """Test that timers run in the order of their deadlines, not of their scheduling."""
        order: list[str] = []
        last = threading.Event()
        # The timer thread is held in a callback while the three are scheduled, so that
        # none is due (or run) before the last one is in: their order is the heap's alone.
        entered, gate = threading.Event(), threading.Event()

        def hold() -> None:
            entered.set()
            gate.wait(WAIT)

        _timer.call_at(time.monotonic(), hold)
        assert entered.wait(WAIT)
        base = time.monotonic()
        _timer.call_at(base + 0.002, lambda: order.append("second"))

        def third() -> None:
            order.append("third")
            last.set()

        _timer.call_at(base + 0.004, third)
        _timer.call_at(base, lambda: order.append("first"))
        gate.set()
        wait(last)
        assert order == ["first", "second", "third"]

    def test_a_timer_due_before_the_one_the_thread_sleeps_for_wakes_it(self) -> None:
        """Test that a timer scheduled while the thread sleeps until a later deadline runs
        at its own deadline, not at the later one."""
        later, sooner = threading.Event(), threading.Event()
        far = time.monotonic() + 10 * WAIT
        handle = _timer.call_at(far, later.set)
        try:
            # asleep until `far`, or a timer left pending by another test that is due
            # later than the one below
            assert wait_until(lambda: _timer._wakes_at > time.monotonic() + 1)
            _timer.call_at(soon(), sooner.set)
            wait(sooner)
            assert not later.is_set()
        finally:
            handle.cancel()

    @pytest.mark.skipif(not _timer._GIL, reason="without a GIL every new timer kicks")
    def test_a_timer_due_after_the_one_the_thread_sleeps_for_does_not_wake_it(self) -> None:
        """Test that a timer due after the deadline the thread sleeps until is scheduled
        without waking it (no kick: a woken thread takes the GIL from the program), and
        runs after that deadline's timer."""
        order: list[str] = []
        done = threading.Event()
        first = soon(0.3)
        _timer.call_at(first, lambda: order.append("first"))
        assert wait_until(lambda: _timer._wakes_at == first)
        kicks = _timer._kicks.value

        def second() -> None:
            order.append("second")
            done.set()

        _timer.call_at(first + 0.01, second)
        assert _timer._kicks.value == kicks
        wait(done)
        assert order == ["first", "second"]

    @pytest.mark.skipif(
        not (HAVE_ALARM and _timer._GIL), reason="needs the alarm (timerfd) and a GIL"
    )
    def test_a_timer_due_before_the_one_the_thread_sleeps_for_wakes_no_thread_now(
        self,
    ) -> None:
        """Test that with an alarm, a timer due before the thread's deadline is scheduled
        by bringing the alarm forward, not by waking the thread (which would take the
        GIL from the program at once: a cancel's grace timer), and runs at its own
        deadline."""
        later, sooner = threading.Event(), threading.Event()
        handle = _timer.call_at(time.monotonic() + 10 * WAIT, later.set)
        try:
            assert wait_until(lambda: _timer._wakes_at > time.monotonic() + 1)
            kicks = _timer._kicks.value
            deadline = soon(0.05)
            _timer.call_at(deadline, sooner.set)
            assert _timer._kicks.value == kicks
            assert _timer._alarm_at == deadline
            wait(sooner)
            assert not later.is_set()
        finally:
            handle.cancel()

    def test_a_deadline_in_the_past_runs_at_once(self) -> None:
        """Test that a timer whose deadline has already passed still runs."""
        ran = threading.Event()
        _timer.call_at(time.monotonic() - 1.0, ran.set)
        wait(ran)

    def test_a_callback_can_schedule_another_timer(self) -> None:
        """Test that call_at from inside a timer callback (on the timer thread) works."""
        second = threading.Event()
        _timer.call_at(soon(), lambda: _timer.call_at(soon(), second.set))
        wait(second)

    def test_a_raising_callback_is_logged_and_the_next_one_runs(self, logs: LogCapture) -> None:
        """Test that a callback that raises is logged as an error and does not stop the
        timers after it."""
        after = threading.Event()

        def explode() -> None:
            raise RuntimeError("timer boom")

        base = soon()
        _timer.call_at(base, explode)
        _timer.call_at(base + 0.001, after.set)
        wait(after)
        record = logs.wait_for(lambda r: r["message"].startswith("timer callback raised\n"))
        assert record["message"].endswith("RuntimeError: timer boom")  # its traceback
        assert record["level"].name == "ERROR"
        assert record["exception"] is not None
        assert isinstance(record["exception"].value, RuntimeError)

    def test_timers_scheduled_from_many_threads_all_run(self) -> None:
        """Test that call_at from several threads at once loses no timer."""
        count = 8 * 25
        done = threading.Semaphore(0)
        barrier = threading.Barrier(8, timeout=WAIT)

        def schedule() -> None:
            barrier.wait()
            for _ in range(25):
                _timer.call_at(soon(), done.release)

        threads = [threading.Thread(target=schedule) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert all(done.acquire(timeout=WAIT) for _ in range(count))


def _child_disarms_its_alarm(conn: Any) -> None:
    """In a forked child: run a timer, then hold the thread idle (its alarm disarmed)."""
    fired = threading.Event()
    _timer.call_at(soon(), fired.set)
    held = _timer.hold()
    assert fired.wait(WAIT)
    assert wait_until(lambda: _timer._wakes_at == math.inf)
    conn.send(_timer._alarm_fd)
    held.release()


class TestTimerHandle:
    def test_cancel_before_the_deadline_unschedules_the_callback(self) -> None:
        """Test that a cancelled timer never runs (a later timer runs, and the cancelled
        one's earlier deadline has passed by then) and is no longer pending."""
        cancelled_ran = threading.Event()
        later = threading.Event()
        # The timer thread runs callbacks one at a time: while it is held in this one,
        # nothing scheduled below can run, however long this thread is descheduled.
        blocking, gate = threading.Event(), threading.Event()

        def hold_the_timer_thread() -> None:
            blocking.set()
            gate.wait(WAIT)

        _timer.call_at(soon(0), hold_the_timer_thread)
        wait(blocking)
        try:
            before = _timer.pending()
            handle = _timer.call_at(soon(0.01), cancelled_ran.set)
            _timer.call_at(soon(0.02), later.set)
            assert _timer.pending() == before + 2
            assert handle.cancel() is True
            assert _timer.pending() == before + 1
        finally:
            gate.set()
        wait(later)
        assert not cancelled_ran.is_set()

    def test_cancel_after_the_callback_ran_returns_false(self) -> None:
        """Test that cancel returns False once the callback has run."""
        ran = threading.Event()
        handle = _timer.call_at(soon(), ran.set)
        wait(ran)
        assert handle.cancel() is False

    def test_cancel_is_idempotent(self) -> None:
        """Test that a second cancel returns False and changes nothing."""
        handle = _timer.call_at(soon(3600), lambda: None)
        before = _timer.pending()
        assert handle.cancel() is True
        assert handle.cancel() is False
        assert _timer.pending() == before - 1

    @pytest.mark.skipif(not HAVE_ALARM, reason="needs the alarm (timerfd)")
    @pytest.mark.parametrize("letting_go", ["cancel", "release"])
    def test_letting_go_does_not_wait_for_a_thread_setting_the_alarm(
        self, monkeypatch: pytest.MonkeyPatch, letting_go: str
    ) -> None:
        """Test that cancelling a timer, or releasing a hold (both run in finalizers,
        wherever a token or a pool is freed), returns while another thread is inside the
        alarm's set (that thread may wait for a lock the caller holds), and that the kick
        it skipped is made once that thread is done: the timer thread ends.

        Regression (free-threaded 3.13, a hang at a fork): a token freed inside the
        alarm's set waited in its finalizer for the token slots' lock, which a thread
        held whose own token finalizer cancelled a timer, and that cancel's kick waited
        for the alarm's lock. (Review: a pool's finalizer releasing its hold did too.)"""
        monkeypatch.setattr(_timer, "_holds", set())  # (a cancel then always kicks)
        inside, cancelled = threading.Event(), threading.Event()
        real_alarm_set = _timer.alarm_set  # type: ignore[attr-defined]

        def slow_alarm_set(fd: int, deadline: float) -> None:
            if threading.current_thread().name == "bench-setter" and not inside.is_set():
                inside.set()
                cancelled.wait(WAIT)  # (as a finalizer waiting for the canceller's lock)
            real_alarm_set(fd, deadline)

        monkeypatch.setattr(_timer, "alarm_set", slow_alarm_set)
        handle = _timer.call_at(soon(3600), lambda: None)
        held = _timer.hold()
        setter = threading.Thread(target=_timer._kick, name="bench-setter")
        setter.start()
        try:
            assert inside.wait(WAIT)

            def let_go() -> None:
                if letting_go == "cancel":
                    handle.cancel()
                    held.release()  # (before the setter goes on: no kick from it here)
                else:
                    handle.cancel()  # (its kick is skipped: the setter holds the lock)
                    _timer._kick_missed = False  # (so that only the release's can help)
                    held.release()
                cancelled.set()

            canceller = threading.Thread(target=let_go)
            canceller.start()
            canceller.join(WAIT)
            assert cancelled.is_set(), f"{letting_go} waited for the alarm's lock"
        finally:
            cancelled.set()
            setter.join(WAIT)
            held.release()
        assert wait_until(lambda: not timer_threads()), "the skipped kick was never made"


class TestTimerThread:
    def test_timeout_tokens_share_one_timer_thread(self) -> None:
        """Test that many pending timeouts use a single timer thread."""
        tokens = [CancellationToken(timeout=60 + i) for i in range(20)]
        timer_threads = [t for t in threading.enumerate() if t.name == "cancelflow-timer"]
        assert len(timer_threads) == 1
        for token in tokens:
            token.close()
        assert _timer.pending() == 0

    def test_the_thread_ends_when_no_timer_is_pending(self) -> None:
        """Test that the timer thread exits once its last timer has run or been
        cancelled, so an idle program holds no cancelflow thread."""
        ran = threading.Event()
        handle = _timer.call_at(soon(3600), lambda: None)
        _timer.call_at(soon(), ran.set)
        assert timer_threads()
        wait(ran)
        handle.cancel()
        assert wait_until(lambda: not timer_threads())
        assert _timer.pending() == 0

    def test_a_new_timer_after_the_thread_ended_starts_it_again(self) -> None:
        """Test that a timer scheduled once the thread has ended still runs."""
        first, second = threading.Event(), threading.Event()
        _timer.call_at(soon(), first.set)
        wait(first)
        assert wait_until(lambda: not timer_threads())
        _timer.call_at(soon(), second.set)
        wait(second)

    def test_wait_idle_end_returns_at_once_while_a_hold_keeps_the_thread(self) -> None:
        """Test that wait_idle_end() does not wait for a timer thread that something
        else still holds (it is not the caller's), and waits it out once released."""
        held = _timer.hold()
        try:
            _timer.wait_idle_end()
            assert timer_threads()
        finally:
            held.release()
        _timer.wait_idle_end()
        assert timer_threads() == []

    def test_wait_idle_end_returns_at_once_while_a_timer_is_pending(self) -> None:
        """Test that wait_idle_end() does not wait for a pending timer's deadline."""
        handle = _timer.call_at(soon(3600), lambda: None)
        try:
            _timer.wait_idle_end()
            assert timer_threads()
        finally:
            handle.cancel()
        _timer.wait_idle_end()
        assert timer_threads() == []

    def test_wait_idle_end_returns_at_once_while_a_callback_runs(self) -> None:
        """Test that wait_idle_end() does not wait for a callback that is running (it is
        someone's work, which may itself wait for the caller)."""
        entered, release = threading.Event(), threading.Event()

        def busy() -> None:
            entered.set()
            release.wait(WAIT)

        _timer.call_at(soon(), busy)
        wait(entered)
        try:
            waiter = threading.Thread(target=_timer.wait_idle_end)
            waiter.start()
            waiter.join(WAIT)
            assert not waiter.is_alive(), "wait_idle_end() waited for a running callback"
            assert timer_threads()
        finally:
            release.set()
        _timer.wait_idle_end()
        assert wait_until(lambda: not timer_threads())

    @pytest.mark.skipif(not HAVE_ALARM, reason="needs the alarm (timerfd)")
    def test_a_forked_child_does_not_move_the_parents_alarm(self) -> None:
        """Test that a forked child sets an alarm of its own: the parent's timer still
        runs after the child ran a timer and then left its alarm disarmed (a shared
        timerfd would have disarmed the parent's too, and its timer would never run)."""
        fired = threading.Event()
        handle = _timer.call_at(soon(0.5), fired.set)
        try:
            assert wait_until(lambda: _timer._alarm_fd >= 0)
            with (
                pipe() as (reader, writer),
                running(
                    multiprocessing.get_context("fork"), _child_disarms_its_alarm, writer
                ) as child,
            ):
                assert isinstance(receive(reader), int)
                child.join(WAIT)
                assert child.exitcode == 0
            wait(fired)
        finally:
            handle.cancel()

    @pytest.mark.skipif(not HAVE_ALARM, reason="needs the alarm (timerfd)")
    def test_the_alarm_is_one_descriptor_kept_across_timer_threads(self) -> None:
        """Test that each new timer thread sleeps on the same alarm: the process holds one
        descriptor for it, however often the thread starts and ends."""
        fired = threading.Event()
        _timer.call_at(soon(), fired.set)
        wait(fired)
        first = _timer._alarm_fd
        assert first >= 0
        for _ in range(3):
            _timer.wait_idle_end()
            assert wait_until(lambda: not timer_threads())
            fired.clear()
            _timer.call_at(soon(), fired.set)
            wait(fired)
            assert _timer._alarm_fd == first

    def test_a_forked_child_starts_with_no_timers_and_runs_its_own(self) -> None:
        """Test that a forked child inherits none of the parent's pending timers, can
        schedule its own, and the parent's timer still runs in the parent."""
        parent_ran = threading.Event()
        parent_timer = _timer.call_at(soon(3600), lambda: None)
        try:
            with (
                pipe() as (reader, writer),
                running(
                    multiprocessing.get_context("fork"), _child_reports_timers, writer
                ) as child,
            ):
                assert receive(reader) == (0, True)
                child.join(WAIT)
                assert child.exitcode == 0
            _timer.call_at(soon(), parent_ran.set)
            wait(parent_ran)
        finally:
            parent_timer.cancel()
