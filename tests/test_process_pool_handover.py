"""Specification of the hand-over of tasks to a ProcessPool's workers.

A busy worker is handed its next task before the running one ends (it then starts it
without waiting for the pool: the throughput of short tasks). Handed over is not
started: a task waiting behind another is stopped before it starts when asked, is taken
back when another worker goes idle, runs elsewhere when its worker ends first, and no
signal meant for one task ever reaches the next.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import contractloads
import workloads
from cancelflow import (
    CancellationToken,
    CancelledException,
    ProcessPool,
    TaskFuture,
    WorkerCrashedError,
    _cell,
)
from cancelflow._process import _supervisor
from cancelflow._process._channel import FrameSource, encode
from cancelflow._process._protocol import (
    DEPTH,
    SHALLOW,
    WORKER_SLOTS,
    Control,
    Held,
    Release,
    read,
    wire,
)
from cancelflow._process._worker import _Worker
from cancelflow._token import token_on_slot
from support import WAIT, Announcements, run_script, wait_until, zygote_pid


def _busy_with_a_cooperative_task(pool: ProcessPool) -> TaskFuture:
    seen = Announcements()
    first = pool.submit_task(workloads.announce_and_wait_cooperatively, partial_sink=seen)
    seen.wait("pid")
    return first


def _runs(path: Path) -> int:
    return path.read_text().count("ran\n") if path.exists() else 0


class TestATaskWaitingBehindARunningOne:
    def test_is_handed_to_the_busy_worker(self, tmp_path: Path) -> None:
        """Test that a task queued while the only worker is busy is handed to that
        worker (running, as the stdlib's call-queue items are) and runs once the first
        task ends."""
        with ProcessPool(1) as pool:
            first = _busy_with_a_cooperative_task(pool)
            waiting = pool.submit(workloads.record_run, str(tmp_path / "runs"))
            assert wait_until(waiting.running)
            assert _runs(tmp_path / "runs") == 0
            first.cancel()
            assert waiting.result(WAIT) == "ran"
            assert _runs(tmp_path / "runs") == 1

    def test_its_token_cancelled_ends_it_before_it_starts(self, tmp_path: Path) -> None:
        """Test that cancelling the token of a waiting task releases its caller while the
        task before it still runs, and the task never runs."""
        with ProcessPool(1) as pool:
            first = _busy_with_a_cooperative_task(pool)
            token = CancellationToken()
            waiting = pool.submit_task(workloads.record_run, (str(tmp_path / "runs"),), token=token)
            assert wait_until(waiting.running)
            token.cancel("not needed")
            assert waiting.done()  # settled by the cancelling thread
            with pytest.raises(CancelledException) as info:
                waiting.result(WAIT)
            assert info.value.reason == "not needed"
            assert waiting.fate == "cancelled"
            assert first.running()
            first.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                first.result(WAIT)
            assert pool.submit(workloads.add, 1, 2).result(WAIT) == 3
        assert _runs(tmp_path / "runs") == 0

    @pytest.mark.parametrize("how", ["cancel", "kill"])
    def test_its_future_stopped_ends_it_cancelled_before_it_starts(
        self, tmp_path: Path, how: str
    ) -> None:
        """Test that future.cancel() and future.kill() of a waiting task end it cancelled
        at once (the stdlib's cancelled(), never started), the running task untouched."""
        with ProcessPool(1) as pool:
            first = _busy_with_a_cooperative_task(pool)
            waiting = pool.submit(workloads.record_run, str(tmp_path / "runs"))
            assert wait_until(waiting.running)
            stop: Callable[[], bool] = getattr(waiting, how)
            assert stop()
            assert waiting.done()  # settled before stop() returned
            with pytest.raises(concurrent.futures.CancelledError):
                waiting.result(WAIT)
            assert waiting.cancelled()
            assert waiting.fate == "cancelled"
            assert first.running()
            first.cancel()
        assert _runs(tmp_path / "runs") == 0

    def test_a_shutdown_that_cancels_the_queue_lets_it_run(self, tmp_path: Path) -> None:
        """Test that shutdown(cancel_futures=True) cancels the queued tasks but lets the
        waiting ones (their futures say running) run, as the stdlib's call-queue items."""
        pool = ProcessPool(1)
        first = _busy_with_a_cooperative_task(pool)
        futures = [pool.submit(workloads.record_run, str(tmp_path / "runs")) for _ in range(5)]
        assert wait_until(lambda: sum(f.running() for f in futures) == 3)
        held, queued = futures[:3], futures[3:]
        assert all(f.running() for f in held)
        pool.shutdown(wait=False, cancel_futures=True)
        assert all(f.cancelled() for f in queued)
        first.cancel()
        assert [f.result(WAIT) for f in held] == ["ran"] * 3
        pool.shutdown(wait=True)
        assert _runs(tmp_path / "runs") == 3

    def test_a_shutdown_that_stops_everything_stops_it_before_it_starts(
        self, tmp_path: Path
    ) -> None:
        """Test that shutdown(cancel_futures=True, cancel_running=True) ends the waiting
        tasks as the queued ones: cancelled(), never started."""
        pool = ProcessPool(1)
        first = _busy_with_a_cooperative_task(pool)
        futures = [pool.submit(workloads.record_run, str(tmp_path / "runs")) for _ in range(5)]
        assert wait_until(lambda: sum(f.running() for f in futures) == 3)
        pool.shutdown(wait=True, cancel_futures=True, cancel_running=True)
        assert [f.fate for f in futures] == ["cancelled"] * 5
        assert all(f.cancelled() for f in futures)
        assert first.done()
        assert _runs(tmp_path / "runs") == 0

    def test_its_timeout_runs_from_its_start(self) -> None:
        """Test that a waiting task's timeout counts from when it starts, not while it
        waits behind the running task (as a queued task's does)."""
        with ProcessPool(1) as pool:
            first = pool.submit(time.sleep, 1.0)
            assert wait_until(first.running)
            waiting = pool.submit_task(workloads.add, (1, 2), timeout=0.5)
            assert wait_until(waiting.running)
            assert first.result(WAIT) is None
            assert waiting.result(WAIT) == 3

    def test_a_result_that_does_not_pickle_fails_it_alone(self) -> None:
        """Test that a waiting task whose result cannot be pickled fails with the
        pickling error, and its worker serves on."""
        with ProcessPool(1) as pool:
            first = _busy_with_a_cooperative_task(pool)
            waiting = pool.submit(contractloads.return_unpicklable)
            after = pool.submit(workloads.add, 2, 2)
            assert wait_until(waiting.running)
            first.cancel()
            with pytest.raises(TypeError, match="refuses to pickle"):
                waiting.result(WAIT)
            assert after.result(WAIT) == 4
            assert len(pool.statistics().worker_pids) == 1

    def test_cannot_be_cancelled_from_a_fork_of_the_owner(self, tmp_path: Path) -> None:
        """Test that in a child forked from the pool's owner, cancel() and kill() of a
        waiting task say False and leave it alone: it runs once in the parent."""
        runs = tmp_path / "runs"
        result = run_script(
            f"""
            import os, sys
            import workloads
            from cancelflow import ProcessPool
            from support import Announcements, wait_until

            with ProcessPool(1) as pool:
                seen = Announcements()
                first = pool.submit_task(
                    workloads.announce_and_wait_cooperatively, partial_sink=seen
                )
                seen.wait("pid")
                waiting = pool.submit(workloads.record_run, {str(runs)!r})
                assert wait_until(waiting.running)
                pid = os.fork()
                if pid == 0:
                    print("child:", waiting.cancel(), waiting.kill(), flush=True)
                    os._exit(0)
                os.waitpid(pid, 0)
                first.cancel()
                print("parent:", waiting.result(30))
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["child: False False", "parent: ran"]
        assert _runs(runs) == 1

    def test_a_signal_handler_stopping_another_task_inside_its_stop_does_not_deadlock(
        self,
    ) -> None:
        """Test that a signal handler cancelling the running task while the main
        thread, inside the waiting task's cancel(), holds its worker's slot lock neither
        hangs nor loses either stop."""
        result = run_script(
            """
            import concurrent.futures, signal, threading
            import workloads
            from cancelflow import ProcessPool
            from support import Announcements, wait_until

            with ProcessPool(1) as pool:
                seen = Announcements()
                first = pool.submit_task(
                    workloads.announce_and_wait_cooperatively, partial_sink=seen
                )
                seen.wait("pid")
                waiting = pool.submit(workloads.add, 1, 1)
                assert wait_until(waiting.running)
                signal.signal(signal.SIGUSR1, lambda *a: print("first:", first.cancel()))
                worker = first._task.worker

                class Interrupting(tuple):
                    armed = True

                    def __getitem__(self, index):
                        if Interrupting.armed and threading.current_thread() is main:
                            Interrupting.armed = False
                            signal.raise_signal(signal.SIGUSR1)  # the slot lock is held
                        return super().__getitem__(index)

                main = threading.main_thread()
                worker.slots = Interrupting(worker.slots)
                print("waiting:", waiting.cancel(), flush=True)
                assert not Interrupting.armed
                # (cancelled when cancel() returned, unless the worker started it in that
                # instant, after the handler's stop of the first one: then once it ends)
                concurrent.futures.wait([first, waiting], 30)
                print("after:", first.cancelled(), waiting.cancelled())
                print("next:", pool.submit(workloads.add, 2, 3).result(30))
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            "first: True",
            "waiting: True",
            "after: True True",
            "next: 5",
        ]

    def test_a_shutdown_that_stops_running_tasks_stops_it_before_it_starts(
        self, tmp_path: Path
    ) -> None:
        """Test that shutdown(cancel_running=True) ends a waiting task (its future says
        running) cancelled without starting it, while a task still in the queue runs,
        as queued tasks do without cancel_futures."""
        pool = ProcessPool(1)
        first = _busy_with_a_cooperative_task(pool)
        held = [pool.submit(workloads.record_run, str(tmp_path / "held")) for _ in range(3)]
        assert wait_until(lambda: all(f.running() for f in held))
        queued = pool.submit(workloads.record_run, str(tmp_path / "queued"))
        assert not queued.running()
        pool.shutdown(wait=True, cancel_running=True)
        assert all(isinstance(f.exception(0), CancelledException) for f in held)
        assert [f.fate for f in held] == ["cancelled"] * 3
        assert queued.result(0) == "ran"
        assert first.done()
        assert _runs(tmp_path / "held") == 0


class TestAWorkerThatGoesIdle:
    def test_takes_the_task_waiting_behind_a_long_one(self) -> None:
        """Test that short tasks all finish while a long task runs on the other worker:
        one handed to the long task's worker is taken back for the idle worker."""
        with ProcessPool(2) as pool:
            long = _busy_with_a_cooperative_task(pool)
            short = [pool.submit(workloads.add, i, 1) for i in range(8)]
            assert [future.result(WAIT) for future in short] == [i + 1 for i in range(8)]
            assert long.running()
            long.cancel()

    def test_taking_back_again_and_again_runs_every_task_once(self, tmp_path: Path) -> None:
        """Test that when idle workers take back several tasks from the same busy worker
        (one at a time, each before that worker answered for the one before), every
        task runs exactly once (regression: the second take-back let the first run on
        its old worker too)."""
        gates = [tmp_path / f"gate-{i}" for i in range(3)]
        with ProcessPool(3) as pool:
            assert pool.wait_ready(WAIT)
            blockers = []
            for gate in gates:
                blockers.append(pool.submit(workloads.wait_for_path, str(gate)))
                assert wait_until(blockers[-1].running)
            runs = [tmp_path / f"runs-{i}" for i in range(9)]
            futures = [pool.submit(workloads.record_run, str(path)) for path in runs]
            assert wait_until(lambda: all(f.running() for f in futures))
            gates[1].touch()  # its worker runs what it holds, then takes back the others'
            assert wait_until(lambda: sum(f.done() for f in futures) >= 5)
            gates[0].touch()
            gates[2].touch()
            assert [f.result(WAIT) for f in futures] == ["ran"] * 9
            assert [b.result(WAIT) for b in blockers] == ["went"] * 3
        assert [_runs(path) for path in runs] == [1] * 9


class TestAWorkerThatEnds:
    @pytest.mark.parametrize("end", ["killed", "crashed"])
    def test_during_its_task_hands_back_the_one_waiting(self, tmp_path: Path, end: str) -> None:
        """Test that a task waiting behind one whose worker dies (killed by the pool, or
        exiting by itself) runs once, on the next worker."""
        with ProcessPool(1, grace_period=0, term_grace_period=0) as pool:
            if end == "killed":
                first = _busy_with_a_cooperative_task(pool)
            else:
                first = pool.submit(workloads.wait_then_exit_hard, str(tmp_path / "go"))
            waiting = pool.submit(workloads.record_run, str(tmp_path / "runs"))
            assert wait_until(waiting.running)
            if end == "killed":
                first.kill()
            else:
                (tmp_path / "go").touch()
            expected = concurrent.futures.CancelledError if end == "killed" else WorkerCrashedError
            with pytest.raises(expected):
                first.result(WAIT)
            assert waiting.result(WAIT) == "ran"
        assert _runs(tmp_path / "runs") == 1

    def test_in_the_middle_of_a_claim_hands_back_the_task_it_claimed(self, tmp_path: Path) -> None:
        """Test that a worker dying after it wrote ``Control.running`` for the waiting
        task, before it learned whether it may start it, hands that task back: it never
        started, and runs once elsewhere (regression: it failed with the worker)."""
        with ProcessPool(1) as pool:
            mark = tmp_path / "started"
            first = pool.submit(workloads.mark_then_wait_for_path, str(mark), str(tmp_path / "no"))
            assert wait_until(mark.exists)
            waiting = pool.submit(workloads.record_run, str(tmp_path / "runs"))
            assert wait_until(waiting.running)
            (worker_pid,) = pool.statistics().worker_pids
            os.kill(worker_pid, signal.SIGSTOP)  # (its claim staged while it is frozen)
            pool._supervisor.workers[0].control.running = waiting._task.seq  # type: ignore[union-attr]
            os.kill(worker_pid, signal.SIGKILL)
            with pytest.raises(WorkerCrashedError):
                first.result(WAIT)
            assert waiting.result(WAIT) == "ran"
        assert _runs(tmp_path / "runs") == 1

    def test_a_task_handed_back_keeps_no_timeout_from_its_start_that_never_was(
        self, tmp_path: Path
    ) -> None:
        """Test that a task that became its worker's task, but was handed back because
        the worker died before claiming it, gets its whole timeout from its real start
        elsewhere (regression: the timeout armed when it became the dead worker's task
        stopped it early). Staged: the worker is made to hold the task (``stop_for``
        names the task it ran last) and is never released, then killed."""
        timeout = 1.0
        with ProcessPool(1) as pool:
            supervisor = pool._supervisor
            held = threading.Event()
            held_at: list[float] = []

            def never_release(worker: object, seq: int) -> None:
                held_at.append(time.monotonic())
                held.set()

            supervisor._release = never_release  # type: ignore[method-assign]
            mark, go = tmp_path / "started", tmp_path / "go"
            first = pool.submit(workloads.mark_then_wait_for_path, str(mark), str(go))
            assert wait_until(mark.exists)
            second = pool.submit_task(
                workloads.mark_then_wait_for_path,
                (str(tmp_path / "second"), str(tmp_path / "finish")),
                timeout=timeout,
            )
            assert wait_until(second.running)
            (worker_pid,) = pool.statistics().worker_pids
            supervisor.workers[0].control.stop_for = first._task.seq  # type: ignore[union-attr]
            go.touch()
            assert first.result(WAIT) == "went"
            assert held.wait(WAIT)  # it is now the worker's task, held before it started
            # Its real start comes well after: the stale deadline would end it early.
            assert wait_until(lambda: time.monotonic() > held_at[0] + 0.6 * timeout)
            os.kill(worker_pid, signal.SIGKILL)
            assert wait_until((tmp_path / "second").exists)
            assert wait_until(lambda: time.monotonic() > held_at[0] + timeout + 0.1)
            (tmp_path / "finish").touch()
            assert second.result(WAIT) == "went"

    def test_hands_back_what_waited_in_the_order_it_was_handed(self, tmp_path: Path) -> None:
        """Test that the tasks waiting behind a worker that is killed run elsewhere in the
        order they were submitted (regression: handed back in reverse)."""
        with ProcessPool(1) as pool:
            first = _busy_with_a_cooperative_task(pool)
            order = tmp_path / "order"
            waiting = [pool.submit(workloads.record_name, str(order), n) for n in "abc"]
            assert wait_until(lambda: all(f.running() for f in waiting))
            (worker_pid,) = pool.statistics().worker_pids
            os.kill(worker_pid, signal.SIGKILL)
            first.exception(WAIT)
            assert [f.result(WAIT) for f in waiting] == ["a", "b", "c"]
        assert order.read_text().split() == ["a", "b", "c"]

    def test_when_the_zygote_dies_hands_back_the_one_waiting(self, tmp_path: Path) -> None:
        """Test that a task waiting behind a running one when the zygote is killed
        runs exactly once, on a worker of the new zygote."""
        with ProcessPool(1) as pool:
            first = _busy_with_a_cooperative_task(pool)
            waiting = pool.submit(workloads.record_run, str(tmp_path / "runs"))
            assert wait_until(waiting.running)
            os.kill(zygote_pid(pool), signal.SIGKILL)
            first.exception(WAIT)  # however the pool ends it, it ends
            assert waiting.result(WAIT) == "ran"
            assert pool.submit(workloads.add, 1, 2).result(WAIT) == 3
        assert _runs(tmp_path / "runs") == 1

    def test_before_its_next_task_every_task_runs_once(self, tmp_path: Path) -> None:
        """Test that with a new worker for every task each of 60 tasks runs exactly once
        (a retiring worker never starts the task handed to it: it runs elsewhere)."""
        runs = tmp_path / "runs"
        with ProcessPool(2, max_tasks_per_child=1) as pool:
            futures = [pool.submit(workloads.record_run, str(runs)) for _ in range(60)]
            assert [future.result(WAIT) for future in futures] == ["ran"] * 60
        assert _runs(runs) == 60


class TestASignalForOneTask:
    def test_never_reaches_the_task_its_worker_runs_next(self, tmp_path: Path) -> None:
        """Test that a kill of a task that has just ended, asked before the pool read its
        result, leaves alone the next task, which its worker already runs: the worker
        claimed it, so the stop finds the first task over (the pool's reading of results
        is held back to stage it)."""
        with ProcessPool(1, grace_period=0, term_grace_period=0) as pool:
            supervisor = pool._supervisor
            gate = threading.Event()
            read = supervisor._on_socket

            def held_back(worker: object) -> None:
                gate.wait(WAIT)
                read(worker)  # type: ignore[arg-type]

            assert pool.wait_ready(WAIT)
            first = pool.submit(workloads.wait_for_path, str(tmp_path / "first"))
            assert wait_until(first.running)
            mark, go = tmp_path / "started", tmp_path / "second"
            following = pool.submit(workloads.mark_then_wait_for_path, str(mark), str(go))
            assert wait_until(following.running)
            (worker_pid,) = pool.statistics().worker_pids
            supervisor._on_socket = held_back  # type: ignore[method-assign]
            (tmp_path / "first").touch()
            assert wait_until(mark.exists), "the worker never started the next task"
            first.kill()
            gate.set()
            go.touch()
            assert following.result(WAIT) == "went"
            assert following.fate == "finished"
            assert pool.statistics().worker_pids == (worker_pid,)
            assert first.done()


class TestAWorkerClaimingATask:
    def test_holds_it_while_a_signal_for_a_task_before_may_be_on_its_way(self) -> None:
        """Test that a worker that ran task 1, then found task 2 stopped before it
        started, holds task 3 while the pool's decision to signal task 1 stands (it says
        Held and starts only on Release): a signal meant for task 1 never reaches task 3
        (regression: the task not started made the worker forget task 1)."""
        chunk = _cell.Chunk(1 + WORKER_SLOTS, pinned=True)
        ours, theirs = socket.socketpair()
        try:
            offsets = [(1 + j) * _cell.SLOT_SIZE for j in range(DEPTH)]
            control_offset = (1 + DEPTH) * _cell.SLOT_SIZE
            control = Control.from_buffer(chunk.mm, control_offset)
            worker = _Worker(theirs, chunk, offsets[0], control_offset, control, None)
            tokens = [token_on_slot(chunk, offset) for offset in offsets]
            assert worker.claim(1, 0, tokens[0]) == "run"
            control.stop_for = 1  # the pool decided to signal task 1 (not yet sent)
            tokens[1].cancel("stopped")  # and stopped task 2 before it started
            assert worker.claim(2, 1, tokens[1]) == "revoked"
            verdict: list[str | None] = []
            claiming = threading.Thread(
                target=lambda: verdict.append(worker.claim(3, 2, tokens[2]))
            )
            claiming.start()
            ours.settimeout(WAIT)
            assert read(FrameSource(ours).next()) == Held(3)
            assert verdict == []
            control.stop_for = 0  # as the pool's release does, once its signal went
            ours.sendall(encode(wire(Release())))
            claiming.join(WAIT)
            assert verdict == ["run"]
            assert control.started == 3
        finally:
            ours.close()
            theirs.close()
            chunk.close()

    def test_its_control_block_fits_in_the_slots_after_its_token_slots(self) -> None:
        """Test that a worker's Control block (with a steal_for per task it may hold)
        fits in the chunk slots the pool gives it after its DEPTH token slots."""
        import ctypes

        assert ctypes.sizeof(Control) <= (WORKER_SLOTS - DEPTH) * _cell.SLOT_SIZE


def _held_after_the_pool_looked(
    pool: ProcessPool, tmp_path: Path, calls: list[tuple[Any, ...]]
) -> int:
    """Occupy the pool's one worker, submit ``calls`` (each ``(fn, *args)``), and return
    how many of them its worker was handed to start after its running task, once the
    pool's dispatch has seen them all: the running task stores two partial results, the
    second after the test read the first, so the pool reads the second in a later turn
    than the first, whose end handed out what was queued; then it ends."""
    gates = [str(tmp_path / f"gate-{i}") for i in range(3)]
    seen = Announcements()
    first = pool.submit_task(workloads.store_at_gates, gates, partial_sink=seen)
    assert wait_until(first.running)
    futures = [pool.submit(*call) for call in calls]
    for i, gate in enumerate(gates[:2]):
        Path(gate).touch()
        seen.wait(f"gate-{i}")
    held = sum(f.running() for f in futures)
    Path(gates[2]).touch()  # it ends
    assert first.result(WAIT) == "went"
    concurrent.futures.wait(futures, WAIT)
    return held


class TestHowManyTasksAWorkerHolds:
    """A busy worker is handed tasks to start after its running one: SHALLOW of them,
    and up to DEPTH - 1 while its tasks are quick and their calls small."""

    def test_a_worker_of_quick_tasks_holds_up_to_depth(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a worker whose last task was quick is handed DEPTH - 1 small calls
        to start after its running task (the rest wait in the pool's queue)."""
        monkeypatch.setattr(_supervisor, "QUICK_TASK", WAIT)  # every task is quick
        with ProcessPool(1) as pool:
            assert pool.submit(workloads.add, 1, 1).result(WAIT) == 2
            calls = [(workloads.add, i, 1) for i in range(DEPTH + 2)]
            assert _held_after_the_pool_looked(pool, tmp_path, calls) == DEPTH - 1

    def test_a_worker_of_slow_tasks_holds_only_a_few(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a worker whose last task was not quick is handed only SHALLOW
        tasks to start after its running one: the others stay in the queue, where
        cancel() and shutdown(cancel_futures=True) drop them (as the stdlib's)."""
        monkeypatch.setattr(_supervisor, "QUICK_TASK", 0.0)  # no task is quick
        with ProcessPool(1) as pool:
            assert pool.submit(workloads.add, 1, 1).result(WAIT) == 2
            calls = [(workloads.add, i, 1) for i in range(DEPTH + 2)]
            assert _held_after_the_pool_looked(pool, tmp_path, calls) == SHALLOW

    def test_big_calls_do_not_pile_up_in_a_worker(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that quick tasks whose calls are big (200 KiB each) are handed to a busy
        worker only SHALLOW at a time: they do not pile up in its memory."""
        monkeypatch.setattr(_supervisor, "QUICK_TASK", WAIT)
        with ProcessPool(1) as pool:
            assert pool.submit(workloads.add, 1, 1).result(WAIT) == 2
            calls = [(workloads.add, bytes(200 * 1024), b"") for _ in range(DEPTH + 2)]
            assert _held_after_the_pool_looked(pool, tmp_path, calls) == SHALLOW
