"""Specification of ProcessPool as a concurrent.futures executor, and of what it survives.

Each class is one promise users bring from ``ProcessPoolExecutor`` (or one hostile thing
a task or its owner may do); each test fails on a pool that breaks it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import gc
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from pathlib import Path
from typing import Any

import psutil
import pytest

import contractloads
import workloads
from cancelflow import (
    BrokenPoolError,
    CancellationToken,
    CancelledException,
    Fate,
    PipelineTimeoutException,
    ProcessPool,
    TaskFuture,
    UnreadableResultError,
    WorkerCrashedError,
)
from cancelflow._platform import UnsafeSignalTarget, send_signal
from support import (
    TESTS,
    WAIT,
    Announcements,
    ContendedLock,
    assert_gone,
    assert_not_running,
    ended,
    run_script,
    wait_until,
    zygote_pid,
)


@pytest.fixture
def pool() -> Iterator[ProcessPool]:
    with ProcessPool(2, grace_period=0.05, term_grace_period=2.0) as p:
        yield p


class TestShutdownRightAfterSubmit:
    def test_with_block_runs_every_submitted_task(self) -> None:
        """Test that leaving a ``with`` block right after submit() runs every task
        (regression: all of them failed with PoolClosedError)."""
        with ProcessPool(max_workers=2) as p:
            futures = [p.submit(contractloads.square, i) for i in range(5)]
        assert [f.result(0) for f in futures] == [0, 1, 4, 9, 16]

    def test_shutdown_without_wait_still_runs_the_tasks(self) -> None:
        """Test that shutdown(wait=False) returns at once and the queued tasks still run."""
        p = ProcessPool(max_workers=2)
        futures = [p.submit(contractloads.square, i) for i in range(5)]
        p.shutdown(wait=False)
        assert [f.result(WAIT) for f in futures] == [0, 1, 4, 9, 16]
        p.shutdown(wait=True)

    def test_cancel_futures_cancels_only_the_futures_not_running(self) -> None:
        """Test that shutdown(cancel_futures=True) cancels the pending futures and lets
        the running ones finish: the task running and those handed to its worker to
        start after it (their futures say running, as the stdlib's call-queue items)."""
        p = ProcessPool(max_workers=1)
        announce = Announcements()
        running = p.submit_task(contractloads.wait_until_cancelled, partial_sink=announce)
        announce.wait("pid")
        futures = [p.submit(contractloads.square, i) for i in range(8)]
        assert wait_until(lambda: sum(f.running() for f in futures) == 3)
        held = [f for f in futures if f.running()]
        pending = [f for f in futures if not f.running()]
        token_less = threading.Thread(target=p.shutdown, kwargs={"cancel_futures": True})
        token_less.start()
        done, _ = concurrent.futures.wait(pending, timeout=WAIT)
        assert done == set(pending)
        assert all(f.cancelled() for f in pending)
        assert not running.done()
        running.cancel()
        assert [f.result(WAIT) for f in held] == [i * i for i in range(3)]
        token_less.join(WAIT)
        assert not token_less.is_alive()
        assert running.cancelled()

    @pytest.mark.parametrize("ready", [True, False])
    def test_cancel_futures_right_after_submit_still_runs_what_starts_at_once(
        self, ready: bool
    ) -> None:
        """Test that shutdown(cancel_futures=True) right after many submits cancels most
        of them and runs, without error, one per worker (starting or idle), as the
        stdlib's executor runs what its call queue holds (regression: all cancelled)."""
        p = ProcessPool(max_workers=2)
        if ready:
            assert p.wait_ready(WAIT)
        futures = [p.submit(contractloads.square, i) for i in range(50)]
        p.shutdown(wait=True, cancel_futures=True)
        ran = [f for f in futures if not f.cancelled()]
        assert sum(f.cancelled() for f in futures) > 20
        assert len(ran) >= 1
        assert all(f.done() and f.exception() is None for f in ran)

    def test_a_pool_dropped_without_shutdown_runs_its_work_then_ends(self) -> None:
        """Test that a pool collected without shutdown() still runs what was submitted,
        then ends every process and its thread, as the stdlib's executor does
        (regression: all of it lived on until the interpreter exited)."""
        p = ProcessPool(2)
        future = p.submit(contractloads.square, 7)
        supervisor = p._supervisor
        zygote = zygote_pid(p)
        del p
        gc.collect()
        assert future.result(WAIT) == 49
        assert supervisor.closed.wait(WAIT)
        supervisor.thread.join(WAIT)
        assert not supervisor.thread.is_alive()
        assert_gone(zygote)

    def test_submit_after_shutdown_raises(self) -> None:
        """Test that submit() after shutdown() raises PoolClosedError (a RuntimeError)."""
        p = ProcessPool(1)
        p.shutdown()
        with pytest.raises(RuntimeError):
            p.submit(contractloads.square, 1)


class TestAStopAndHowTheTaskEnds:
    """What ``cancel()`` returned is how the future ends; a task that returns or raises
    after it was asked to stop ends stopped, as in ThreadPool."""

    @staticmethod
    def _raising_after_its_stop(pool: ProcessPool, **options: Any) -> TaskFuture:
        announce = Announcements()
        future = pool.submit_task(
            contractloads.raise_once_cancelled, partial_sink=announce, **options
        )
        announce.wait("pid")
        return future

    def test_an_error_raised_after_cancel_ends_the_future_cancelled(self) -> None:
        """Test that future.cancel() of a task that then raises ValueError (within its
        grace period) ends the future cancelled (regression: it failed with ValueError
        although cancel() had returned True)."""
        with ProcessPool(1, grace_period=WAIT) as pool:
            future = self._raising_after_its_stop(pool)
            assert future.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(WAIT)
            assert future.cancelled()
            assert future.fate == Fate.CANCELLED

    def test_an_error_raised_after_its_token_is_cancelled_is_a_cancel(self) -> None:
        """Test that a task raising ValueError once its token is cancelled ends with
        CancelledException (regression: ValueError)."""
        with ProcessPool(1, grace_period=WAIT) as pool:
            token = CancellationToken()
            future = self._raising_after_its_stop(pool, token=token)
            token.cancel("enough")
            with pytest.raises(CancelledException) as caught:
                future.result(WAIT)
            assert caught.value.reason == "enough"
            assert future.fate == Fate.CANCELLED

    def test_an_error_raised_after_its_timeout_is_a_timeout(self) -> None:
        """Test that a task raising ValueError once its timeout stopped it ends with
        PipelineTimeoutException (regression: ValueError)."""
        with ProcessPool(1, grace_period=WAIT) as pool:
            future = pool.submit_task(contractloads.raise_once_cancelled, timeout=0.2)
            with pytest.raises(PipelineTimeoutException):
                future.result(WAIT)

    def test_a_cancel_between_the_result_and_its_decision_wins(self) -> None:
        """Test that a cancel() that returns True after the supervisor read the task's
        result, before it decided how the task ends, ends the future cancelled
        (regression: the decision read the stop outside the future's lock, and the
        future finished with its result). Staged: the cancel is made from inside the
        supervisor's call that decides."""
        with ProcessPool(1) as pool:
            supervisor = pool._supervisor
            decide = supervisor.finish
            said: list[bool] = []

            def cancel_first(task: Any, fate: Fate, **options: Any) -> None:
                if not said:
                    done = threading.Event()

                    def cancel() -> None:
                        said.append(task.future.cancel())
                        done.set()

                    threading.Thread(target=cancel).start()
                    assert done.wait(WAIT)
                decide(task, fate, **options)

            supervisor.finish = cancel_first  # type: ignore[method-assign]
            future = pool.submit(contractloads.square, 3)
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(WAIT)
            assert said == [True]
            supervisor.finish = decide  # type: ignore[method-assign]

    def test_a_task_waiting_behind_is_cancelled_before_cancel_returns_while_its_slot_is_busy(
        self,
    ) -> None:
        """Test that cancel() of a task handed to a busy worker (not claimed yet) ends it
        cancelled before it returns, even when the worker's slot lock is held at that
        moment by another thread, as the supervisor holds it for an instant while it
        hands the worker a task (regression: the cancel left the decision to the
        supervisor, and returned True with the future not done). Staged: a thread holds
        the lock until this thread tries to take it, and the supervisor's own decision
        waits until the future was read."""
        with ProcessPool(1) as pool:
            supervisor = pool._supervisor
            revoke, checked = supervisor._revoke, threading.Event()

            def revoke_once_checked(task: Any) -> None:
                checked.wait(WAIT)
                revoke(task)

            supervisor._revoke = revoke_once_checked  # type: ignore[method-assign]
            announce = Announcements()
            blocker = pool.submit_task(contractloads.wait_until_cancelled, partial_sink=announce)
            announce.wait("pid")
            behind = pool.submit(contractloads.square, 2)
            task = behind._task
            assert task is not None
            assert wait_until(lambda: task.worker is not None)
            worker = task.worker
            assert worker is not None
            real = worker.slot_lock
            contended = ContendedLock(real, threading.get_ident())
            held = threading.Event()

            def hold_the_slot_lock() -> None:
                with real:
                    held.set()
                    contended.tried.wait(WAIT)

            holder = threading.Thread(target=hold_the_slot_lock)
            worker.slot_lock = contended  # type: ignore[assignment]
            holder.start()
            try:
                assert held.wait(WAIT)
                assert behind.cancel()
                assert behind.cancelled()
            finally:
                checked.set()
                contended.tried.set()
                holder.join(WAIT)
                worker.slot_lock = real
                supervisor._revoke = revoke  # type: ignore[method-assign]
                blocker.cancel()

    def test_cancel_called_again_and_again_keeps_saying_true(self) -> None:
        """Test that cancel(), called in a loop from the first call until the future is
        done, returns True every time for a future that ends cancelled (regression: in
        more than half the rounds one call in the last moments returned False)."""
        with ProcessPool(1, grace_period=0, term_grace_period=0) as pool:
            for _ in range(20):
                announce = Announcements()
                future = pool.submit_task(contractloads.wait_until_cancelled, partial_sink=announce)
                announce.wait("pid")
                said = [future.cancel()]
                while not future.done():
                    said.append(future.cancel())
                said.append(future.cancel())
                assert future.cancelled()
                assert all(said), f"cancel() said False at call {said.index(False)} of {len(said)}"

    def test_cancel_says_true_until_the_future_it_cancelled_ends(self) -> None:
        """Test that cancel(), called again while the pool resolves the future it
        cancelled (at the end of the supervisor's turn), still returns True
        (regression: it returned False in that window, then the future ended
        cancelled). Staged: cancel() is called right before the turn resolves it."""
        with ProcessPool(1, grace_period=0, term_grace_period=0) as pool:
            supervisor = pool._supervisor
            resolve = supervisor._settle_turn
            said: list[bool] = []
            announce = Announcements()
            future = pool.submit_task(contractloads.wait_until_cancelled, partial_sink=announce)
            announce.wait("pid")

            def cancel_again_first() -> None:
                if any(item[0] is future for item in supervisor._settling):
                    said.append(future.cancel())
                resolve()

            supervisor._settle_turn = cancel_again_first  # type: ignore[method-assign]
            assert future.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(WAIT)
            assert said == [True]
            supervisor._settle_turn = resolve  # type: ignore[method-assign]


class TestFuturesSetByTheCaller:
    def test_a_future_the_caller_settled_keeps_its_value_and_the_pool_serves_on(
        self, pool: ProcessPool, tmp_path: Path
    ) -> None:
        """Test that a caller's own set_result() on a running task's future (the stdlib
        allows it) keeps that value when the task's result comes, and breaks nothing."""
        go = tmp_path / "go"
        future = pool.submit(workloads.wait_for_path, str(go))
        assert wait_until(future.running)
        future.set_result("mine")
        go.touch()
        assert future.result(WAIT) == "mine"
        assert pool.submit(contractloads.square, 3).result(WAIT) == 9
        assert "open" in repr(pool)


class TestUnreadableMessages:
    def test_an_exception_that_cannot_be_unpickled_fails_its_task_alone(
        self, pool: ProcessPool
    ) -> None:
        """Test that an exception class whose __init__ takes other arguments fails only its
        own future, with an error that carries the worker's text of it."""
        bad = pool.submit(contractloads.raise_unpicklable_error)
        with pytest.raises(UnreadableResultError) as caught:
            bad.result(WAIT)
        assert caught.value.what == "exception"
        assert "TwoArgumentError" in caught.value.remote_text
        assert "first/second" in caught.value.remote_text
        assert pool.submit(contractloads.square, 3).result(WAIT) == 9
        assert "open" in repr(pool)

    def test_a_result_that_unpickles_only_in_the_worker_fails_its_task_alone(
        self, pool: ProcessPool
    ) -> None:
        """Test that a result that pickles in the worker but not in the parent fails its
        own future (also a BrokenProcessPool, as the stdlib raises) and a sibling task
        running at the same time is unharmed."""
        announce = Announcements()
        sibling = pool.submit_task(contractloads.wait_until_cancelled, partial_sink=announce)
        announce.wait("pid")
        bad = pool.submit(contractloads.return_worker_only)
        with pytest.raises(BrokenProcessPool) as caught:
            bad.result(WAIT)
        assert isinstance(caught.value, UnreadableResultError)
        assert caught.value.what == "result"
        assert not sibling.done()
        sibling.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            sibling.result(WAIT)
        assert pool.submit(contractloads.square, 4).result(WAIT) == 16

    def test_an_unreadable_partial_result_stops_and_fails_its_task(self, pool: ProcessPool) -> None:
        """Test that a partial value the parent cannot unpickle fails that task (stopped,
        not left running) and keeps the partial results read before it."""
        future = pool.submit(contractloads.store_worker_only_then_spin)
        with pytest.raises(UnreadableResultError) as caught:
            future.result(WAIT)
        assert caught.value.what == "partial result 'bad'"
        assert future.partial_results == {"ok": 1}
        assert pool.submit(contractloads.square, 5).result(WAIT) == 25

    def test_arguments_that_cannot_be_unpickled_in_the_worker_fail_their_task_alone(
        self, pool: ProcessPool
    ) -> None:
        """Test that an argument whose unpickling in the worker raises (here SystemExit)
        fails its task with UnreadableResultError, a BrokenProcessPool as the stdlib
        raises, and the worker serves on (regression: the caller got the raw SystemExit)."""
        with pytest.raises(BrokenProcessPool) as caught:
            pool.submit(id, contractloads.ExitsWhenUnpickled()).result(WAIT)
        assert isinstance(caught.value, UnreadableResultError)
        assert caught.value.what == "call"
        assert "SystemExit" in caught.value.remote_text
        assert pool.submit(contractloads.square, 5).result(WAIT) == 25

    def test_a_result_that_does_not_pickle_in_the_worker_raises_the_pickling_error(
        self, pool: ProcessPool
    ) -> None:
        """Test that a result that cannot be pickled fails the future with the pickling
        error, as ProcessPoolExecutor does, and the worker keeps serving."""
        with pytest.raises(TypeError, match="refuses to pickle"):
            pool.submit(contractloads.return_unpicklable).result(WAIT)
        assert pool.submit(contractloads.square, 6).result(WAIT) == 36

    def test_a_broken_pool_says_so_everywhere(self) -> None:
        """Test that when the supervisor itself fails, submit() raises, repr() says
        broken, and no future is left pending."""
        p = ProcessPool(1)
        queued = p.submit(contractloads.square, 2)
        queued.result(WAIT)
        pending = [p.submit(contractloads.wait_until_cancelled) for _ in range(2)]

        def explode() -> None:
            raise RuntimeError("supervisor bug")

        p._supervisor.post(("boom",))  # type: ignore[arg-type]  # not a command, on purpose
        p._supervisor._on_command = lambda command: explode()  # type: ignore[method-assign]
        p._supervisor.post(("boom",))  # type: ignore[arg-type]  # not a command, on purpose
        p._supervisor.closed.wait(WAIT)
        assert "broken" in repr(p)
        with pytest.raises(BrokenPoolError):
            p.submit(contractloads.square, 1)
        for future in pending:
            with pytest.raises(BrokenPoolError):
                future.result(WAIT)
        p.shutdown()


class TestWorkerPid:
    def test_a_task_runs_on_a_worker_whose_pid_is_known(self) -> None:
        """Test that a worker whose "ready" arrives before the zygote's "spawned" gets
        its pid from the worker itself: TaskFuture.pid is the real one, never 0, and
        cancelling the task stops that worker (regression: pid 0 signalled the owner's
        whole process group)."""
        with ProcessPool(1, grace_period=0, term_grace_period=0) as p:
            original = p._supervisor._on_zygote

            def drop_spawned() -> None:
                sock = p._supervisor._zygote_sock
                assert sock is not None
                data = sock.recv(1 << 20, socket_peek())
                if b"spawned" in data:
                    sock.recv(1 << 20)  # swallow it: the worker's "ready" must suffice
                    return
                original()

            p._supervisor._on_zygote = drop_spawned  # type: ignore[method-assign]
            announce = Announcements()
            future = p.submit_task(workloads.announce_and_spin, partial_sink=announce)
            worker_pid = announce.wait("pid")
            assert future.pid == worker_pid
            future.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(WAIT)
            assert_gone(worker_pid)

    @pytest.mark.parametrize("target", ["zero", "negative", "init", "self", "group"])
    def test_signals_are_never_sent_to_the_owner(self, target: str) -> None:
        """Test that the one signal sender refuses pids that can only be a bug."""
        pid = {
            "zero": 0,
            "negative": -os.getpgrp(),
            "init": 1,
            "self": os.getpid(),
            "group": os.getpgrp(),
        }[target]
        with pytest.raises(UnsafeSignalTarget):
            send_signal(pid, 0)

    def test_future_pid_is_the_worker_that_ran_it(self, pool: ProcessPool) -> None:
        """Test that each future's pid is the pid its task saw, across worker crashes."""
        for _ in range(5):
            with pytest.raises(WorkerCrashedError):
                pool.submit(workloads.exit_hard, 3).result(WAIT)
            future = pool.submit(contractloads.whoami)
            assert future.result(WAIT) == future.pid


def socket_peek() -> int:
    import socket

    return socket.MSG_PEEK


class TestSignalHandlerCancel:
    def test_cancel_from_a_handler_inside_submit_does_not_deadlock(self) -> None:
        """Test that a token cancelled by a signal handler while the main thread is
        inside submit() (holding the pool's lock) does not hang (regression: 5 of 20
        Ctrl-C trials hung)."""
        result = run_script(
            """
            import collections, signal
            import contractloads
            from cancelflow import CancellationToken, ProcessPool

            with ProcessPool(1) as pool:
                token = CancellationToken()
                blocker = pool.submit(contractloads.wait_until_cancelled)
                victim = pool.submit_task(contractloads.square, (2,), token=token)
                signal.signal(signal.SIGUSR1, lambda *a: token.cancel("ctrl-c"))

                class Interrupting(collections.deque):
                    def append(self, item):
                        signal.raise_signal(signal.SIGUSR1)  # the lock is held here
                        super().append(item)

                pool._supervisor.queue = Interrupting(pool._supervisor.queue)
                after = pool.submit(contractloads.square, 3)
                blocker.cancel()
            print(victim.cancelled() or type(victim.exception()).__name__, after.result())
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["CancelledException", "9"]


class TestFork:
    def test_a_forked_child_cannot_use_the_pool_and_exits_promptly(self) -> None:
        """Test that in a child forked from the owner, submit() raises a clear error,
        a running task's cancel() and kill() say False (the child cannot stop it),
        shutdown() returns at once, and the child's normal exit does not hang
        (regression: it waited forever on a supervisor that does not exist there;
        cancel() said True for a future that never ended)."""
        result = run_script(
            """
            import os, sys
            import contractloads
            from cancelflow import PoolClosedError, ProcessPool

            pool = ProcessPool(2)
            pool.submit(contractloads.square, 2).result(30)
            running = pool.submit(contractloads.wait_until_cancelled)
            pid = os.fork()
            if pid == 0:
                try:
                    pool.submit(contractloads.square, 3)
                except PoolClosedError as exc:
                    print("child refused:", "fork" in str(exc), flush=True)
                print("child cannot cancel:", not running.cancel(), not running.kill())
                pool.shutdown()
                sys.exit(0)  # a normal exit: the interpreter's exit hooks run
            _, status = os.waitpid(pid, 0)
            print("child status", os.waitstatus_to_exitcode(status), flush=True)
            print(pool.submit(contractloads.square, 4).result(30))
            running.cancel()
            pool.shutdown()
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            "child refused: True",
            "child cannot cancel: True True",
            "child status 0",
            "16",
        ]

    def test_a_submit_from_a_signal_handler_never_catches_cloudpickle_half_imported(
        self,
    ) -> None:
        """Test that making a pool imports what by-value pickling needs, so a submit of a
        __main__ function from a signal handler cannot land in the middle of the first
        such import (regression: TypeError "partially initialized module 'cloudpickle'")."""
        result = run_script(
            """
            import sys
            from cancelflow import ProcessPool
            before = "cloudpickle" in sys.modules
            with ProcessPool(1):
                print(before, "cloudpickle" in sys.modules)
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["False", "True"]

    def test_closing_a_workers_descriptors_twice_closes_nothing_reused(self) -> None:
        """Test that a worker's descriptors, once closed (the pool's teardown), are not
        closed again by a fork of the owner's hook, when their numbers may already be
        another library's (regression: a stdlib ProcessPoolExecutor made right after a
        shutdown(wait=False) broke, 9 to 10 times in 15)."""
        import socket

        from cancelflow._process._protocol import Control
        from cancelflow._process._supervisor import WorkerHandle

        ours, theirs = socket.socketpair()
        try:
            worker = WorkerHandle(
                0, ours, (CancellationToken(), CancellationToken()), threading.Lock(), Control()
            )
            worker.pidfd = os.open(os.devnull, os.O_RDONLY)
            worker.close_descriptors()  # the teardown
            reader, writer = os.pipe()  # (the lowest free number: the old pidfd's)
            try:
                worker.close_descriptors()  # the hook in a fork of the owner
                os.fstat(reader)
                os.fstat(writer)
            finally:
                os.close(reader)
                os.close(writer)
        finally:
            ours.close()
            theirs.close()

    def test_a_forked_child_does_not_keep_the_zygote_alive(self) -> None:
        """Test that when the owner is SIGKILLed while a forked child of it lives on,
        the zygote still exits (regression: the child held the zygote's channel open)."""
        owner = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(
                    f"""
                    import os, signal, sys, time
                    sys.path.insert(0, {TESTS!r})
                    import contractloads
                    from cancelflow import ProcessPool
                    pool = ProcessPool(1)
                    pool.submit(contractloads.square, 2).result(30)
                    child = os.fork()
                    if child == 0:
                        time.sleep(60)
                        os._exit(0)
                    print(pool.statistics().zygote_pid, child, flush=True)
                    sys.stdin.read()
                    """
                ),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert owner.stdout is not None
        assert owner.stdin is not None
        zygote, child = map(int, owner.stdout.readline().split())
        try:
            owner.kill()
            owner.wait(WAIT)
            assert_gone(zygote)
            assert psutil.pid_exists(child)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            owner.stdout.close()
            owner.stdin.close()


class TestReasons:
    def test_a_reason_with_a_lone_surrogate_stops_a_process_task(self, pool: ProcessPool) -> None:
        """Test that any str works as a reason, here one decoded from bytes that are not
        UTF-8 (regression: UnicodeEncodeError, the token was not cancelled)."""
        reason = os.fsdecode(b"caf\xe9")
        token = CancellationToken()
        announce = Announcements()
        future = pool.submit_task(
            workloads.announce_and_wait_cooperatively, token=token, partial_sink=announce
        )
        announce.wait("pid")
        assert token.cancel(reason)
        with pytest.raises(CancelledException) as caught:
            future.result(WAIT)
        assert caught.value.reason == reason
        assert pool.submit(contractloads.square, 2).result(WAIT) == 4


class TestForkingWhileKilled:
    def test_processes_forked_during_the_kill_are_gone_when_the_caller_hears(
        self, tmp_path: Path
    ) -> None:
        """Test that a chain of processes that keep forking a successor and exiting (a
        moving target for the tree walk) is entirely gone and reaped once the caller
        gets the exception, and nothing but live workers is left under the zygote
        (regression: a link escaped the freeze and lived on under the zygote)."""
        record = tmp_path / "pids"
        with ProcessPool(1, grace_period=0, term_grace_period=0) as p:
            announce = Announcements()
            future = p.submit_task(
                contractloads.start_fork_chain, (str(record),), partial_sink=announce
            )
            announce.wait("chain")
            assert wait_until(lambda: len(record.read_bytes().split()) > 50), "watchdog"
            future.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(WAIT)
            assert p.wait_ready(WAIT)  # the replacement worker too has its pid known
            zygote = psutil.Process(zygote_pid(p))
            workers = set(p.statistics().worker_pids)
            strays = [child.pid for child in zygote.children() if child.pid not in workers]
            assert strays == []
            pids = [int(line) for line in record.read_text().split()]
            assert [pid for pid in pids if _alive(pid)] == []


class TestWhatATaskLeaves:
    """A task's orphans (processes whose parent exited: they leave the worker's tree) end
    with the task's stop and with the pool, on every implementation: a subreaper worker
    gets them back ("linux"), a worker leading a process group keeps them in it
    ("posix")."""

    @pytest.mark.parametrize("grace", [5.0, 0.0], ids=["cooperative", "killed"])
    def test_an_orphan_ends_with_the_stopped_task(self, grace: float) -> None:
        """Test that an orphan of a task stopped by its token (the task returns, or is
        killed) is not running once the caller hears (regression, posix: a cooperative
        stop left it running as long as its worker lived)."""
        with ProcessPool(1, grace_period=grace, term_grace_period=0) as p:
            announce = Announcements()
            future = p.submit_task(
                contractloads.orphan_then_wait_until_cancelled, partial_sink=announce
            )
            orphan = announce.wait("orphan")
            future.cancel()
            with contextlib.suppress(concurrent.futures.CancelledError, CancelledException):
                future.result(WAIT)
            assert_not_running(orphan)
            assert p.submit(contractloads.square, 4).result(WAIT) == 16

    def test_an_orphan_of_a_finished_task_ends_with_the_pool(self) -> None:
        """Test that an orphan left running by a task that returned is gone once the pool
        is shut down (regression, posix: it survived 2 shutdowns in 5)."""
        with ProcessPool(2) as p:
            orphan = p.submit(contractloads.leave_an_orphan).result(WAIT)
        assert_not_running(orphan)


class TestSimultaneousExits:
    def test_workers_that_exit_together_all_fail_their_tasks(self) -> None:
        """Test that when every worker exits at the same moment, each task fails with
        WorkerCrashedError and the pool goes on (regression, posix: a worker reaped while
        the zygote swept another was never reported; its task ran forever, and so did
        shutdown)."""
        with ProcessPool(4) as p:
            for _ in range(5):
                assert p.wait_ready(WAIT)
                deadline = time.monotonic() + 0.3
                futures = [p.submit(contractloads.exit_at, deadline) for _ in range(4)]
                for future in futures:
                    with pytest.raises(WorkerCrashedError):
                        future.result(WAIT)
            assert p.submit(contractloads.square, 5).result(WAIT) == 25


#: An owner in a session of its own: a pool whose task leaves an orphan and never
#: stops; it prints the pids of the zygote, the workers and the orphan, then waits.
_OWNER_OF_A_BUSY_POOL = """
import json, sys, time
import contractloads
from cancelflow import ProcessPool
from support import Announcements

if __name__ == "__main__":
    pool = ProcessPool(2)
    announce = Announcements()
    pool.submit_task(contractloads.orphan_then_wait_until_cancelled, partial_sink=announce)
    orphan = announce.wait("orphan")
    assert pool.wait_ready(30)
    stats = pool.statistics()
    print(json.dumps([stats.zygote_pid, *stats.worker_pids, orphan]), flush=True)
    time.sleep(3600)
"""


class TestOwnersGroupKilled:
    def test_nothing_of_the_pool_outlives_a_kill_of_the_owners_process_group(
        self, tmp_path: Path
    ) -> None:
        """Test that SIGKILL to the owner's whole process group (``kill -9 -PGID``, a shell
        killing a job), which ends the owner and the zygote at once, leaves no worker, no
        task and no orphan of a task running (regression, posix: a busy worker leads its
        own group, froze when its zygote died, and stayed frozen for ever)."""
        script = tmp_path / "owner.py"
        script.write_text(
            f"import sys\nsys.path.insert(0, {TESTS!r})\n" + textwrap.dedent(_OWNER_OF_A_BUSY_POOL)
        )
        owner = subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert owner.stdout is not None
        try:
            pids = json.loads(owner.stdout.readline())
        finally:
            os.killpg(owner.pid, signal.SIGKILL)
            owner.wait(WAIT)
            owner.stdout.close()
        for pid in pids:
            assert_not_running(pid)


_OWNER_OF_AN_IDLE_POOL = """
import json, time
import contractloads
from cancelflow import ProcessPool

if __name__ == "__main__":
    pool = ProcessPool(2)
    for _ in range(5):  # bursts: each worker runs tasks back to back, then waits
        [f.result(30) for f in [pool.submit(contractloads.square, i) for i in range(200)]]
    stats = pool.statistics()
    print(json.dumps([stats.zygote_pid, *stats.worker_pids]), flush=True)
    time.sleep(3600)
"""


def _kill_the_zygote_under_a_frozen_owner(tmp_path: Path, program: str, workers: int) -> None:
    """Run ``program`` (an owner that prints ``[zygote_pid, *worker_pids]``, then
    sleeps), freeze it (SIGSTOP: it can neither close its workers' channels nor kill
    them, as when it dies in the same instant), SIGKILL its zygote, and check that each
    of its ``workers`` workers ends by itself."""
    script = tmp_path / "owner.py"
    script.write_text(f"import sys\nsys.path.insert(0, {TESTS!r})\n" + textwrap.dedent(program))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    pids: list[int] = []
    try:
        zygote, *pids = json.loads(owner.stdout.readline())
        assert len(pids) == workers
        os.kill(owner.pid, signal.SIGSTOP)
        os.kill(zygote, signal.SIGKILL)
        for pid in pids:
            assert_not_running(pid)
    finally:
        owner.kill()
        owner.wait(WAIT)
        owner.stdout.close()
        for pid in pids:  # (a worker that froze instead: nothing else would end it)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class TestZygoteKilledUnderAFrozenOwner:
    def test_idle_workers_die_with_their_zygote(self, tmp_path: Path) -> None:
        """Test that workers waiting for work, after bursts of tasks run back to back, die
        with their zygote by themselves: the owner is frozen, then the zygote is
        SIGKILLed (a worker that kept freezing on its zygote's death from one task to the
        next, and never went back to dying with it, stays stopped)."""
        _kill_the_zygote_under_a_frozen_owner(tmp_path, _OWNER_OF_AN_IDLE_POOL, workers=2)

    def test_a_worker_past_its_last_result_dies_with_its_zygote(self, tmp_path: Path) -> None:
        """Test that a worker that sent its last task's result, and has no next task,
        dies with its zygote even before it waits for work again (it is paused there):
        the owner saw it idle, so nothing would kill it if it froze instead."""
        _kill_the_zygote_under_a_frozen_owner(tmp_path, _OWNER_OF_A_PAUSED_WORKER, workers=1)

    def test_a_worker_pickling_its_result_dies_with_its_zygote(self, tmp_path: Path) -> None:
        """Test that a worker whose task returned (its tree is gone) dies with its
        zygote while it pickles the result, however long that takes: nothing would end
        it if it froze, the owner being gone too."""
        marker = tmp_path / "pickling"
        os.mkfifo(marker)  # (the worker writes its pid there as it starts pickling)
        program = _OWNER_OF_A_WORKER_PICKLING.replace("MARKER", repr(str(marker)))
        _kill_the_zygote_under_a_frozen_owner(tmp_path, program, workers=1)


_OWNER_OF_A_WORKER_PICKLING = """
import json, os, time
import contractloads
from cancelflow import ProcessPool

if __name__ == "__main__":
    pool = ProcessPool(1)
    pool.submit(contractloads.slow_to_pickle, MARKER)
    with open(MARKER) as fifo:  # (blocks until the worker has written its pid)
        worker = int(fifo.read())
    print(json.dumps([pool.statistics().zygote_pid, worker]), flush=True)
    time.sleep(3600)
"""


_OWNER_OF_A_PAUSED_WORKER = """
import json, time
import contractloads
from cancelflow import ProcessPool

if __name__ == "__main__":
    pool = ProcessPool(1)
    worker = pool.submit(contractloads.pause_after_its_result).result(30)
    print(json.dumps([pool.statistics().zygote_pid, worker]), flush=True)
    time.sleep(3600)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` still exists, running or (where the pool reaps orphans) as an
    unreaped zombie."""
    return not ended(pid)


class TestZygoteImports:
    def test_the_zygote_does_not_import_from_the_current_directory(self, tmp_path: Path) -> None:
        """Test that a module in the current directory named like one the zygote imports
        is not run inside the pool (regression: python -c put the cwd first)."""
        program = tmp_path / "program"
        program.mkdir()
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        (cwd / "selectors.py").write_text(
            "open({!r}, 'w').write('imported')\nraise SystemExit('shadowed')\n".format(
                str(tmp_path / "marker")
            )
        )
        result = run_script(
            """
            import contractloads
            from cancelflow import ProcessPool
            if __name__ == "__main__":
                with ProcessPool(1) as pool:
                    print(pool.submit(contractloads.square, 7).result(30))
            """,
            cwd=str(cwd),
            path=program / "main.py",
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["49"]
        assert not (tmp_path / "marker").exists()


class TestMainModuleClasses:
    """A script's own classes, in tasks defined in the script (its ``__main__``)."""

    SCRIPT = """
        import concurrent.futures
        from cancelflow import ProcessPool


        class MyError(Exception):
            pass


        class Point:
            def __init__(self, x):
                self.x = x


        def raise_mine():
            raise MyError("boom")


        def return_points():
            return [Point(1), {"p": Point(2)}]


        if __name__ == "__main__":
            with ProcessPool(1) as pool:
                error = pool.submit(raise_mine).exception(30)
                print(type(error) is MyError, str(error), error.__cause__ is not None)
                points = pool.submit(return_points).result(30)
                print(type(points[0]) is Point, points[1]["p"].x)
        """

    def test_a_scripts_exception_and_values_come_back_as_its_own_classes(
        self, tmp_path: Path
    ) -> None:
        """Test that a task of a script raising or returning the script's own classes
        gives the caller those very classes, as ProcessPoolExecutor does (regression:
        the task travelled by value with copies of them, which the worker then could not
        pickle back: UnreadableResultError and PicklingError)."""
        result = run_script(self.SCRIPT, path=tmp_path / "main.py")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["True boom True", "True 2"]


class TestConstructor:
    def test_initializer_runs_in_every_worker(self) -> None:
        """Test that initializer(*initargs) runs in each worker before its tasks."""
        with ProcessPool(1, initializer=contractloads.remember, initargs=(1, "a")) as p:
            assert p.submit(contractloads.initialized).result(WAIT) == [(1, "a")]

    def test_initargs_may_be_any_iterable_as_in_the_stdlib(self) -> None:
        """Test that initargs given as a list reach the initializer, as the stdlib's
        ``*initargs`` takes them (regression: anything but a tuple was refused)."""
        with ProcessPool(1, initializer=contractloads.remember, initargs=[1, "a"]) as p:
            assert p.submit(contractloads.initialized).result(WAIT) == [(1, "a")]

    def test_initargs_that_are_not_arguments_are_refused(self) -> None:
        """Test that a str as initargs raises TypeError naming it, before anything starts."""
        with pytest.raises(TypeError, match="initargs"):
            ProcessPool(1, initializer=print, initargs="ab")

    @pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
    def test_the_default_size_is_the_stdlibs_on_this_python(self) -> None:
        """Test that ProcessPool() has as many workers as ProcessPoolExecutor() in a
        process allowed on one CPU: from 3.13 the stdlib counts the CPUs it may run on
        (regression: cancelflow counted all of the machine's)."""
        result = run_script(
            """
            import concurrent.futures, os, re
            from cancelflow import ProcessPool
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
            if __name__ == "__main__":
                stdlib = concurrent.futures.ProcessPoolExecutor()
                pool = ProcessPool()
                print(stdlib._max_workers, re.search(r"workers=(\\d+)", repr(pool)).group(1))
                pool.shutdown()
                stdlib.shutdown()
            """
        )
        assert result.returncode == 0, result.stderr
        stdlib, ours = result.stdout.split()
        assert ours == stdlib

    def test_a_failing_initializer_breaks_the_pool(self) -> None:
        """Test that an initializer that raises breaks the pool as the stdlib does: the
        pending futures fail with BrokenProcessPool, and so does submit()."""
        p = ProcessPool(1, initializer=contractloads.fail_to_initialize)
        futures = [p.submit(contractloads.square, i) for i in range(3)]
        for future in futures:
            with pytest.raises(BrokenProcessPool):
                future.result(WAIT)
        with pytest.raises(BrokenPoolError):
            p.submit(contractloads.square, 1)
        p.shutdown()

    def test_max_tasks_per_child_replaces_workers(self) -> None:
        """Test that a worker ends after max_tasks_per_child tasks."""
        with ProcessPool(1, max_tasks_per_child=2) as p:
            pids = [p.submit(contractloads.whoami).result(WAIT) for _ in range(6)]
        assert len(set(pids)) == 3
        assert pids[0] == pids[1]
        assert pids[2] == pids[3]
        assert pids[4] == pids[5]

    def test_a_new_worker_for_every_task_keeps_the_pool_healthy(self) -> None:
        """Test that 200 tasks with max_tasks_per_child=1 each run in their own worker
        and the pool stays open (the scenario where a review once saw the supervisor
        crash; the race itself is pinned by the test below)."""
        with ProcessPool(2, max_tasks_per_child=1) as p:
            futures = [p.submit(contractloads.whoami) for _ in range(200)]
            pids = [future.result(WAIT) for future in futures]
            assert len(set(pids)) == 200
            assert "open" in repr(p)

    def test_mp_context_none_is_accepted_and_others_refused(self) -> None:
        """Test that mp_context=None works and a context raises a clear ValueError."""
        import multiprocessing

        ProcessPool(1, mp_context=None).shutdown()
        with pytest.raises(ValueError, match="mp_context"):
            ProcessPool(1, mp_context=multiprocessing.get_context("spawn"))

    @pytest.mark.parametrize("workers", [0, -1])
    def test_max_workers_below_one_uses_the_stdlib_wording(self, workers: int) -> None:
        """Test that max_workers <= 0 raises the stdlib's ValueError."""
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            ProcessPool(workers)

    def test_an_unpicklable_initializer_is_refused_before_anything_starts(self) -> None:
        """Test that an initializer that cannot be sent, even by value, raises TypeError at
        once."""
        with pytest.raises(TypeError, match="initializer"):
            ProcessPool(1, initializer=functools.partial(print, threading.Lock()))

    def test_a_lambda_initializer_runs_in_each_worker(self) -> None:
        """Test that an initializer defined as a lambda travels by value and runs."""
        with ProcessPool(1, initializer=lambda: setattr(sys, "cf_initialised", "yes")) as p:
            assert p.submit(getattr, sys, "cf_initialised", None).result(WAIT) == "yes"


class TestMap:
    @pytest.mark.parametrize("chunksize", [0, -3])
    def test_chunksize_below_one_is_refused(self, pool: ProcessPool, chunksize: int) -> None:
        """Test that chunksize < 1 raises the stdlib's ValueError."""
        with pytest.raises(ValueError, match="chunksize"):
            pool.map(contractloads.square, range(3), chunksize=chunksize)

    def test_chunks_travel_as_one_task_each(self, pool: ProcessPool) -> None:
        """Test that map with chunksize sends one task per chunk, results in order."""
        assert list(pool.map(contractloads.square, range(10), chunksize=4)) == [
            x * x for x in range(10)
        ]
        assert pool.statistics().completed_total == 3

    def test_timeout_raises_timeout_error_and_stops_the_rest(self, pool: ProcessPool) -> None:
        """Test that a map timeout raises TimeoutError from the iterator."""
        results = pool.map(workloads.store_then_spin, [1, 1], timeout=0.2)
        with pytest.raises(TimeoutError):
            list(results)

    def test_buffersize_submits_only_that_many_calls_ahead(self, pool: ProcessPool) -> None:
        """Test that map(buffersize=2) reads two arguments before it returns and one more
        each time a result is asked for (Python 3.14's argument, on every version)."""
        taken: list[int] = []

        def arguments() -> Iterator[int]:
            for x in range(6):
                taken.append(x)
                yield x

        results = pool.map(contractloads.square, arguments(), buffersize=2)
        assert taken == [0, 1]
        assert next(results) == 0
        assert taken == [0, 1, 2]
        assert list(results) == [1, 4, 9, 16, 25]

    def test_buffersize_maps_an_endless_iterable(self, pool: ProcessPool) -> None:
        """Test that map over itertools.count() with buffersize yields results in order
        and, closed, leaves no task behind."""
        results = pool.map(contractloads.square, itertools.count(), buffersize=3)
        assert [next(results) for _ in range(10)] == [x * x for x in range(10)]
        results.close()  # type: ignore[attr-defined]  # (Executor.map says Iterator)
        assert wait_until(lambda: pool.statistics().busy == 0)
        assert pool.statistics().queued == 0

    @pytest.mark.parametrize("chunksize", [1, 2])
    def test_a_map_closed_before_its_first_result_stops_every_call(self, chunksize: int) -> None:
        """Test that closing map's iterator before the first next() drops the tasks it
        queued, with or without chunks (regressions: a generator that never started ran
        no cleanup; with chunksize > 1 the iterator was another generator around it)."""
        with ProcessPool(1) as p:
            seen = Announcements()
            blocker = p.submit_task(contractloads.wait_until_cancelled, partial_sink=seen)
            seen.wait("pid")
            results = p.map(contractloads.square, range(4), chunksize=chunksize)
            assert p.statistics().queued == 4 // chunksize
            results.close()  # type: ignore[attr-defined]  # (Executor.map says Iterator)
            assert p.statistics().queued == 0
            blocker.cancel()
        assert p.statistics().completed_total == 1

    def test_a_task_on_its_way_to_a_busy_worker_is_counted_as_queued(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that statistics() counts a task the supervisor is handing to a busy
        worker (to start after its running task) as queued, while it is on its way.

        Regression: the supervisor took the task off the queue, then added it to what
        the worker holds, and statistics() read the one and then the other: a read in
        between missed it (``queued`` read 3 of a map's 4 calls queued behind a busy
        worker, on a free-threaded build most).
        """
        with ProcessPool(1) as p:
            seen = Announcements()
            blocker = p.submit_task(contractloads.wait_until_cancelled, partial_sink=seen)
            seen.wait("pid")
            supervisor = p._supervisor
            real_claim = supervisor._claim
            handing, go = threading.Event(), threading.Event()

            def claim(task: Any, worker: Any) -> bool:
                claimed: bool = real_claim(task, worker)
                if worker.task is not None and not handing.is_set():  # a busy worker's
                    handing.set()
                    assert go.wait(WAIT)
                return claimed

            monkeypatch.setattr(supervisor, "_claim", claim)
            try:
                results = p.map(contractloads.square, range(4))
                assert handing.wait(WAIT)  # the supervisor hands the first call to the busy worker
                assert p.statistics().queued == 4
            finally:
                go.set()
            results.close()  # type: ignore[attr-defined]  # (Executor.map says Iterator)
            assert p.statistics().queued == 0
            blocker.cancel()

    def test_buffersize_counts_chunks(self, pool: ProcessPool) -> None:
        """Test that with chunksize, buffersize bounds the chunks in flight."""
        taken: list[int] = []

        def arguments() -> Iterator[int]:
            for x in range(9):
                taken.append(x)
                yield x

        results = pool.map(contractloads.square, arguments(), chunksize=3, buffersize=1)
        assert taken == [0, 1, 2]
        assert list(results) == [x * x for x in range(9)]

    @pytest.mark.parametrize(
        ("buffersize", "error"),
        [(0, ValueError), (-1, ValueError), ("2", TypeError), (True, TypeError)],
    )
    def test_a_bad_buffersize_is_refused_before_anything_is_read(
        self, pool: ProcessPool, buffersize: object, error: type[Exception]
    ) -> None:
        """Test that an invalid buffersize raises at once, naming it, and reads nothing."""
        taken: list[int] = []

        def arguments() -> Iterator[int]:
            taken.append(0)
            yield 0

        with pytest.raises(error, match="buffersize"):
            pool.map(contractloads.square, arguments(), buffersize=buffersize)  # type: ignore[arg-type]
        assert taken == []
        assert pool.statistics().completed_total == 0


class TestForcedShutdown:
    """terminate_workers() and kill_workers(): Python 3.14's, on every version."""

    def test_terminate_workers_runs_the_running_tasks_finally_and_cancels_the_queue(
        self,
    ) -> None:
        """Test that terminate_workers() sends SIGTERM at once (the task's finally runs:
        fate terminated), cancels queued tasks, refuses new ones, and returns at once."""
        p = ProcessPool(1, grace_period=WAIT, term_grace_period=WAIT)
        seen = Announcements()
        running = p.submit_task(workloads.announce_and_finish_in_finally, partial_sink=seen)
        seen.wait("pid")
        queued = p.submit(contractloads.square, 2)
        p.terminate_workers()
        with pytest.raises(RuntimeError):
            p.submit(contractloads.square, 3)
        with pytest.raises(CancelledException) as caught:
            running.result(WAIT)
        assert caught.value.fate == "terminated"
        assert caught.value.partial_results["finally"] == "ran"
        assert caught.value.reason == "pool shut down (terminate)"
        assert queued.cancelled()
        p.shutdown()

    def test_terminate_workers_kills_a_task_that_ignores_sigterm(self) -> None:
        """Test that a task ignoring SIGTERM is killed term_grace_period later."""
        p = ProcessPool(1, grace_period=WAIT, term_grace_period=0.1)
        seen = Announcements()
        running = p.submit_task(
            contractloads.set_sigterm_then_spin, ("SIG_IGN",), partial_sink=seen
        )
        pid = seen.wait("pid")
        p.terminate_workers()
        with pytest.raises(CancelledException) as caught:
            running.result(WAIT)
        assert caught.value.fate == "killed"
        assert "finally" not in caught.value.partial_results
        assert_gone(pid)
        p.shutdown()

    def test_kill_workers_kills_each_running_tree_at_once(self) -> None:
        """Test that kill_workers() freezes and kills the running task's whole tree with
        no grace (a SIGTERM-ignoring child in its own session included)."""
        p = ProcessPool(2, grace_period=WAIT, term_grace_period=WAIT)
        seen = Announcements()
        running = p.submit_task(workloads.spawn_stubborn_tree, partial_sink=seen)
        child, grandchild = seen.wait("tree")
        done = p.submit(contractloads.square, 5)
        assert done.result(WAIT) == 25
        p.kill_workers()
        with pytest.raises(CancelledException) as caught:
            running.result(WAIT)
        assert caught.value.fate == "killed"
        assert caught.value.reason == "pool shut down (kill)"
        assert done.result(0) == 25
        for pid in (child, grandchild):
            assert_gone(pid)
        p.shutdown()
        assert p.statistics().worker_pids == ()

    def test_terminate_workers_during_the_grace_period_keeps_the_whole_term_grace(
        self,
    ) -> None:
        """Test that terminate_workers() during a task's grace period sends SIGTERM and
        leaves the task its whole term_grace_period for its finally (regression: the
        grace period's own timer, armed before, killed it when it ran out)."""
        p = ProcessPool(1, grace_period=0.2, term_grace_period=WAIT)
        seen = Announcements()
        token = CancellationToken()
        running = p.submit_task(
            workloads.spin_then_clean_up_for, (1.0,), token=token, partial_sink=seen
        )
        seen.wait("pid")
        token.cancel("stop")
        p.terminate_workers()
        with pytest.raises(CancelledException) as caught:
            running.result(WAIT)
        assert caught.value.fate == "terminated"
        assert caught.value.partial_results["cleanup"] == "done"
        p.shutdown()

    def test_terminate_workers_waits_for_a_critical_section_even_without_term_grace(
        self,
    ) -> None:
        """Test that terminate_workers() on a pool with term_grace_period=0 cancels the
        token and kills a task inside critical_section only once it left the block, as
        the ladder does (regression: killed at once, token never cancelled)."""
        p = ProcessPool(1, grace_period=WAIT, term_grace_period=0)
        seen = Announcements()
        running = p.submit_task(
            workloads.critical_until_cancelled_then_spin, (3600.0,), partial_sink=seen
        )
        seen.wait("pid")
        p.terminate_workers()
        with pytest.raises(CancelledException) as caught:
            running.result(WAIT)
        assert caught.value.fate == "killed"
        assert caught.value.partial_results["left"] is True
        p.shutdown()

    @pytest.mark.parametrize("how", ["terminate_workers", "shutdown"])
    def test_a_task_already_sigtermed_keeps_its_term_grace(self, how: str) -> None:
        """Test that terminate_workers() or shutdown(cancel_running=True) on a task whose
        finally already runs after a SIGTERM lets it finish (regression: both killed it
        at once)."""
        p = ProcessPool(1, grace_period=0, term_grace_period=WAIT)
        seen = Announcements()
        token = CancellationToken()
        running = p.submit_task(
            workloads.spin_then_clean_up_for, (0.5,), token=token, partial_sink=seen
        )
        seen.wait("pid")
        token.cancel("stop")  # grace 0: SIGTERM at once
        if how == "shutdown":
            p.shutdown(wait=False, cancel_running=True)
        else:
            p.terminate_workers()
        with pytest.raises(CancelledException) as caught:
            running.result(WAIT)
        assert caught.value.fate == "terminated"
        assert caught.value.partial_results["cleanup"] == "done"
        p.shutdown()

    @pytest.mark.parametrize("force", ["terminate_workers", "kill_workers"])
    def test_a_forced_shutdown_is_a_no_op_when_nothing_runs(self, force: str) -> None:
        """Test that terminate/kill_workers on an idle, a shut down, or a broken pool
        raises nothing, and the pool still ends cleanly."""
        idle = ProcessPool(1)
        getattr(idle, force)()
        getattr(idle, force)()
        idle.shutdown()
        getattr(idle, force)()
        broken = ProcessPool(1, initializer=contractloads.fail_to_initialize)
        with pytest.raises(BrokenProcessPool):
            broken.submit(contractloads.square, 1).result(WAIT)
        getattr(broken, force)()
        broken.shutdown()


class TestFutures:
    def test_an_exception_keeps_the_worker_traceback_as_its_cause(self, pool: ProcessPool) -> None:
        """Test that a task's exception has the stdlib's _RemoteTraceback as __cause__,
        showing the line that raised in the worker."""
        with pytest.raises(ValueError, match="raised on purpose") as caught:
            pool.submit(contractloads.raise_with_a_line).result(WAIT)
        cause = caught.value.__cause__
        assert type(cause) is _RemoteTraceback
        assert "the remote traceback shows this line" in cause.tb

    @pytest.mark.parametrize("how", ["token", "timeout"])
    def test_a_task_that_returns_after_being_asked_to_stop_ends_stopped(
        self, pool: ProcessPool, how: str
    ) -> None:
        """Test that a task returning a value after its token was cancelled (or its
        timeout passed) fails with CancelledException (PipelineTimeoutException), fate
        cancelled, as submit_task documents and as ThreadPool does (regression: the
        future finished with the value)."""
        seen = Announcements()
        token = CancellationToken()
        future = pool.submit_task(
            contractloads.wait_until_cancelled,
            token=token,
            partial_sink=seen,
            timeout=0.3 if how == "timeout" else None,
        )
        seen.wait("pid")
        if how == "token":
            token.cancel("enough")
        with pytest.raises(CancelledException) as caught:
            future.result(WAIT)
        assert caught.value.fate == "cancelled"
        assert isinstance(caught.value, TimeoutError) == (how == "timeout")
        assert caught.value.partial_results["pid"] == seen.values["pid"]

    def test_running_is_true_while_the_task_runs(self, pool: ProcessPool) -> None:
        """Test running()/done()/cancelled() through a running task's life."""
        announce = Announcements()
        future = pool.submit_task(contractloads.wait_until_cancelled, partial_sink=announce)
        announce.wait("pid")
        assert future.running()
        assert not future.done()
        assert not future.cancelled()
        assert future.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(WAIT)
        assert future.cancelled()
        assert future.done()
        assert not future.running()

    def test_a_queued_future_is_cancelled_at_once(self) -> None:
        """Test that cancelling a queued task makes its future cancelled before cancel()
        returns, and wait() sees it done."""
        with ProcessPool(1) as p:
            announce = Announcements()
            blocker = p.submit_task(contractloads.wait_until_cancelled, partial_sink=announce)
            announce.wait("pid")
            queued = p.submit(contractloads.square, 2)
            assert queued.cancel()
            assert queued.cancelled()
            done, _ = concurrent.futures.wait([queued], timeout=0)
            assert done == {queued}
            blocker.cancel()

    def test_a_sigterm_from_outside_is_a_crash_not_a_cancel(self, pool: ProcessPool) -> None:
        """Test that a SIGTERM someone else sends to a busy worker fails its task with
        WorkerCrashedError (a BrokenProcessPool, as the stdlib raises), not the
        CancelledException of a stop the pool made, and the pool serves on
        (regression: fate "terminated", a CancelledException with no reason)."""
        seen = Announcements()
        future = pool.submit_task(workloads.announce_and_spin, partial_sink=seen)
        os.kill(seen.wait("pid"), signal.SIGTERM)
        with pytest.raises(BrokenProcessPool) as caught:
            future.result(WAIT)
        assert isinstance(caught.value, WorkerCrashedError)
        assert caught.value.signal == signal.SIGTERM
        assert future.fate == "crashed"
        assert pool.submit(contractloads.square, 9).result(WAIT) == 81

    def test_a_worker_crash_is_a_broken_process_pool_and_the_pool_heals(
        self, pool: ProcessPool
    ) -> None:
        """Test that except BrokenProcessPool catches a worker's death, and the pool
        still runs tasks afterwards."""
        with pytest.raises(BrokenProcessPool):
            pool.submit(workloads.exit_hard, 7).result(WAIT)
        assert pool.submit(contractloads.square, 8).result(WAIT) == 64


class TestInterpreterExit:
    def test_queued_and_running_work_finishes_at_exit(self, tmp_path: Path) -> None:
        """Test that a program that ends without shutdown() still runs every task it
        submitted, and prints nothing."""
        result = run_script(
            """
            import contractloads
            from cancelflow import ProcessPool
            if __name__ == "__main__":
                pool = ProcessPool(1)
                futures = [pool.submit(contractloads.square, i) for i in range(4)]
                futures[-1].add_done_callback(lambda f: print("last", f.result(), flush=True))
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["last", "9"]
        assert result.stderr == ""

    def test_submit_from_atexit_raises_the_stdlib_error(self) -> None:
        """Test that submit() after the interpreter began to exit raises RuntimeError
        with the stdlib's message."""
        result = run_script(
            """
            import atexit
            import contractloads
            from cancelflow import ProcessPool
            if __name__ == "__main__":
                pool = ProcessPool(1)
                def late():
                    try:
                        pool.submit(contractloads.square, 2)
                    except RuntimeError as exc:
                        print(exc, flush=True)
                atexit.register(late)
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "cannot schedule new futures after interpreter shutdown"


class TestHostileReview:
    """Regressions found by a hostile review of the rewritten pool."""

    def test_a_frozen_worker_never_blocks_the_supervisor(self) -> None:
        """Test that a task whose large argument cannot be delivered (its worker is
        frozen) can still be killed, and the pool keeps answering (regression: the
        supervisor blocked in sendall forever)."""
        with ProcessPool(1, grace_period=0, term_grace_period=0) as p:
            assert p.wait_ready(WAIT)
            (worker,) = p.statistics().worker_pids
            os.kill(worker, signal.SIGSTOP)
            try:
                future = p.submit(contractloads.size_of, bytes(32 << 20))
                # The supervisor must have handed the task over (and met the frozen
                # worker) before the kill, or the kill would just drop a queued task.
                assert wait_until(future.running), "watchdog: the task was never dispatched"
                future.kill()
                with pytest.raises(concurrent.futures.CancelledError):
                    future.result(WAIT)
                assert p.submit(contractloads.square, 3).result(WAIT) == 9
            finally:  # if the test failed, let the worker go so that the pool can end
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGCONT)

    def test_a_process_groups_sigterm_leaves_no_worker(self) -> None:
        """Test that SIGTERM to the owner's whole process group (timeout(1), a service
        stop) ends the zygote and every worker (regression: idle workers froze for ever
        under init)."""
        owner = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {TESTS!r})\n"
                + textwrap.dedent(
                    """
                    import contractloads
                    from cancelflow import ProcessPool
                    if __name__ == "__main__":
                        pool = ProcessPool(2)
                        assert pool.wait_ready(30)
                        pids = [pool.statistics().zygote_pid, *pool.statistics().worker_pids]
                        print(*pids, flush=True)
                        sys.stdin.read()
                    """
                ),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert owner.stdout is not None
        assert owner.stdin is not None
        try:
            pids = [int(pid) for pid in owner.stdout.readline().split()]
            assert len(pids) == 3
            os.killpg(owner.pid, signal.SIGTERM)
            owner.wait(WAIT)
            for pid in pids:
                assert_not_running(pid)
        finally:
            owner.stdout.close()
            owner.stdin.close()

    def test_a_forked_child_returning_from_the_task_does_not_answer_for_it(self) -> None:
        """Test that a child forked by the task, returning out of it, neither delivers
        the result nor serves later tasks (regression: both)."""
        with ProcessPool(1) as p:
            kind, pid = p.submit(contractloads.fork_and_return_in_both).result(WAIT)
            assert kind == "parent"
            assert {p.submit(contractloads.whoami).result(WAIT) for _ in range(10)} == {pid}

    def test_killing_the_zygote_of_a_large_pool_does_not_break_it(self) -> None:
        """Test that a zygote death with many workers heals the pool (regression: each
        worker the pool ended itself counted as a failed start, breaking it)."""
        with ProcessPool(12) as p:
            assert p.wait_ready(WAIT)
            os.kill(zygote_pid(p), signal.SIGKILL)
            for _ in range(3):  # a task that races the death fails with its worker
                try:
                    assert p.submit(contractloads.square, 5).result(WAIT) == 25
                    break
                except WorkerCrashedError:
                    continue
            else:
                pytest.fail("the pool did not heal")
            assert "open" in repr(p)

    def test_large_initargs_reach_the_workers(self) -> None:
        """Test that initargs larger than one socket record work, as with the stdlib
        (regression: OSError 'Message too long' and a leaked zygote)."""
        blob = bytes(300_000)
        with ProcessPool(1, initializer=contractloads.remember, initargs=(blob,)) as p:
            assert p.submit(contractloads.initialized).result(WAIT) == [(blob,)]

    def test_cancel_returns_true_only_if_the_future_ends_cancelled(self) -> None:
        """Test that future.cancel() racing a token cancel on queued tasks never leaves
        an error behind, and returns True exactly when the future ends cancelled."""
        with ProcessPool(1) as p:
            announce = Announcements()
            blocker = p.submit_task(contractloads.wait_until_cancelled, partial_sink=announce)
            announce.wait("pid")
            pairs = []
            for _ in range(300):
                token = CancellationToken()
                pairs.append((p.submit_task(contractloads.square, (1,), token=token), token))
            returned: dict[int, bool] = {}

            def cancel_futures() -> None:
                for index, (future, _) in enumerate(pairs):
                    returned[index] = future.cancel()

            thread = threading.Thread(target=cancel_futures)
            thread.start()
            for _, token in pairs:
                token.cancel("token")
            thread.join(WAIT)
            blocker.cancel()
            for index, (future, _) in enumerate(pairs):
                assert future.done()
                assert returned[index] == future.cancelled()

    def test_a_finished_task_with_a_timeout_keeps_nothing_alive(self) -> None:
        """Test that a task's pending timeout timer does not keep its result alive once
        the caller dropped the future (regression: held until the timeout)."""
        import gc
        import weakref

        with ProcessPool(1) as p:
            future = p.submit_task(contractloads.Big, timeout=3600)
            ref = weakref.ref(future.result(WAIT))
            del future
            gc.collect()
            if getattr(sys, "_is_gil_enabled", lambda: True)():
                assert ref() is None
            else:
                # Without the GIL the last reference dropped here is merged by the thread
                # that made the object (the supervisor) when it next runs: soon, but not
                # at once. Held until the timeout (the regression) would still fail.
                assert wait_until(lambda: gc.collect() >= 0 and ref() is None)

    def test_interpreter_flags_reach_the_workers(self) -> None:
        """Test that python -O in the owner is -O in the workers, as with spawn."""
        result = subprocess.run(
            [
                sys.executable,
                "-O",
                "-c",
                f"import sys; sys.path.insert(0, {TESTS!r})\n"
                + textwrap.dedent(
                    """
                    import contractloads
                    from cancelflow import ProcessPool
                    if __name__ == "__main__":
                        with ProcessPool(1) as pool:
                            print(pool.submit(contractloads.debug_flag).result(30))
                    """
                ),
            ],
            capture_output=True,
            text=True,
            timeout=WAIT * 2,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["False"]

    def test_a_cancel_in_progress_when_the_zygote_dies_still_ends_cancelled(self) -> None:
        """Test that a task the user cancelled ends cancelled even if the zygote dies
        during the stop (regression: reported as a crash)."""
        with ProcessPool(1, grace_period=WAIT, term_grace_period=WAIT) as p:
            announce = Announcements()
            future = p.submit_task(workloads.announce_and_spin, partial_sink=announce)
            announce.wait("pid")
            assert future.cancel()
            os.kill(zygote_pid(p), signal.SIGKILL)
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(WAIT)
            assert future.cancelled()
            assert p.submit(contractloads.square, 2).result(WAIT) == 4


class TestSupervisorEvents:
    def test_a_socket_event_for_a_worker_retired_in_the_same_select_is_ignored(self) -> None:
        """Test that a worker's socket event handled after the worker was retired (its
        socket closed by an earlier event of the same select, e.g. the zygote's "swept")
        is ignored (regression: ValueError 'Invalid file descriptor: -1' escaped the
        supervisor and broke the pool)."""
        import socket

        from cancelflow._process._protocol import Control
        from cancelflow._process._supervisor import WorkerHandle

        with ProcessPool(1) as p:
            ours, theirs = socket.socketpair()
            theirs.close()
            slots = (CancellationToken(), CancellationToken())
            retired = WorkerHandle(0, ours, slots, threading.Lock(), Control())
            ours.close()
            p._supervisor._on_socket(retired)  # what the supervisor does with the late event
            assert p.submit(contractloads.square, 3).result(WAIT) == 9
