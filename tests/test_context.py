"""Specification of ``cancelflow._context``: what a running task can ask about itself.

A pool sets a task scope around every task it runs; inside it ``current_token``,
``check_cancelled`` and ``store_partial`` answer for that task, and ``critical_section``
is a plain block everywhere but in a process worker (tests/test_worker.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import threading
from typing import Any

import pytest

from cancelflow import (
    CancellationToken,
    CancelledException,
    NodeContext,
    ThreadPool,
    check_cancelled,
    critical_section,
    current_token,
    store_partial,
)
from cancelflow._context import deliver_partial, task_scope
from support import WAIT, LogCapture, names, run, wait

INF = math.inf


class TestBadInput:
    @pytest.mark.parametrize(
        ("value", "error"), [("1", TypeError), (0, ValueError), (-1, ValueError), (INF, ValueError)]
    )
    def test_critical_section(self, value: Any, error: type[Exception]) -> None:
        """Test that a bad critical_section bound is refused, naming max_seconds."""
        with pytest.raises(error, match=names("max_seconds")):
            critical_section(value)
        with critical_section(1):
            pass

    def test_store_partial_bad_key(self, thread_pool: ThreadPool) -> None:
        """Test that store_partial and NodeContext.store_partial refuse a non-str key,
        naming it, and then store a good one."""
        stored: dict[str, Any] = {}

        def task() -> None:
            with pytest.raises(TypeError, match=names("key")):
                store_partial(3, "v")  # type: ignore[arg-type]
            store_partial("good", "v")

        thread_pool.submit_task(task, partial_sink=stored.__setitem__).result(WAIT)
        assert stored == {"good": "v"}
        ctx = NodeContext(CancellationToken(), {}, {}, "p", "n", stored.__setitem__)
        with pytest.raises(TypeError, match=names("key")):
            ctx.store_partial(3, "v")  # type: ignore[arg-type]
        ctx.store_partial("also", 1)
        assert stored["also"] == 1

    def test_outside_a_task(self) -> None:
        """Test that current_token and store_partial outside a task raise RuntimeError
        saying so."""
        with pytest.raises(RuntimeError, match="outside a cancelflow task"):
            current_token()
        with pytest.raises(RuntimeError, match="outside a cancelflow task"):
            store_partial("k", 1)


class TestCurrentToken:
    def test_is_the_token_of_the_scope(self) -> None:
        """Test that inside a task scope current_token returns that scope's token."""
        token = CancellationToken()
        with task_scope(token):
            assert current_token() is token

    def test_is_the_token_of_the_task_a_pool_runs(self, thread_pool: ThreadPool) -> None:
        """Test that a task run by a pool finds its own token, the one the pool cancels
        when the caller's token is cancelled."""
        started, finished = threading.Event(), threading.Event()
        seen: list[str | None] = []

        def task() -> None:
            started.set()
            current_token().wait_blocking(WAIT)
            seen.append(current_token().cancel_reason)
            finished.set()

        token = CancellationToken()
        thread_pool.submit_task(task, token=token)
        wait(started)
        token.cancel("stop")
        wait(finished)
        assert seen == ["stop"]

    def test_nested_scopes_restore_the_outer_one(self) -> None:
        """Test that leaving an inner scope makes the outer scope's token current again,
        and leaving the outer one leaves no token."""
        outer, inner = CancellationToken(), CancellationToken()
        with task_scope(outer):
            with task_scope(inner):
                assert current_token() is inner
            assert current_token() is outer
        with pytest.raises(RuntimeError, match="outside a cancelflow task"):
            current_token()

    def test_a_scope_is_left_even_when_its_body_raises(self) -> None:
        """Test that an exception leaving the scope's body also leaves the scope."""
        with pytest.raises(ValueError, match="boom"), task_scope(CancellationToken()):
            raise ValueError("boom")
        with pytest.raises(RuntimeError, match="outside a cancelflow task"):
            current_token()

    def test_a_thread_started_inside_a_scope_is_not_in_it(self) -> None:
        """Test that a plain thread started by a task is not part of the task (threads do
        not inherit the scope), while a copied context carries it along."""
        found: list[str] = []

        def probe() -> None:
            try:
                current_token()
            except RuntimeError:
                found.append("no task")
            else:
                found.append("task")

        token = CancellationToken()
        with task_scope(token):
            thread = threading.Thread(target=probe)
            thread.start()
            thread.join(WAIT)
            copied = contextvars.copy_context()
        copied.run(probe)
        assert found == ["no task", "task"]

    def test_asyncio_tasks_started_inside_a_scope_are_in_it(self) -> None:
        """Test that an asyncio task created inside a scope sees the scope's token (tasks
        copy the context they are created in)."""
        token = CancellationToken()

        async def main() -> CancellationToken:
            with task_scope(token):
                inner = asyncio.ensure_future(_current_token_async())
            return await inner

        assert run(main()) is token


async def _current_token_async() -> CancellationToken:
    return current_token()


class TestCheckCancelled:
    def test_does_nothing_while_the_token_is_not_cancelled(self) -> None:
        """Test that check_cancelled returns quietly inside a task whose token is active."""
        reached: list[str] = []
        with task_scope(CancellationToken()):
            check_cancelled()
            reached.append("after the check")
        assert reached == ["after the check"]

    def test_raises_with_the_reason_once_the_token_is_cancelled(self) -> None:
        """Test that check_cancelled raises CancelledException with the token's reason
        once the task's token is cancelled."""
        token = CancellationToken()
        with task_scope(token):
            token.cancel("enough")
            with pytest.raises(CancelledException) as info:
                check_cancelled()
        assert info.value.reason == "enough"

    def test_does_nothing_outside_a_task(self) -> None:
        """Test that check_cancelled outside any task returns quietly, even while a token
        (not the caller's) is cancelled."""
        cancelled = CancellationToken()
        cancelled.cancel("someone else's")
        reached: list[str] = []
        check_cancelled()
        reached.append("after the check")
        assert reached == ["after the check"]

    def test_stops_a_polling_task_in_a_pool(self, thread_pool: ThreadPool) -> None:
        """Test that a CPU-bound task polling check_cancelled ends with CancelledException
        once its token is cancelled."""
        started = threading.Event()

        def poll() -> None:
            started.set()
            while True:
                check_cancelled()

        token = CancellationToken()
        future = thread_pool.submit_task(poll, token=token)
        assert started.wait(WAIT)
        token.cancel("stop polling")
        with pytest.raises(CancelledException) as info:
            future.result(WAIT)
        assert info.value.reason == "stop polling"


class TestStorePartial:
    def test_hands_key_and_value_to_the_scope_store(self) -> None:
        """Test that store_partial passes each key and value to the task's store, in order."""
        stored: list[tuple[str, Any]] = []
        with task_scope(CancellationToken(), lambda k, v: stored.append((k, v))):
            store_partial("rows", 10)
            store_partial("rows", 20)
        assert stored == [("rows", 10), ("rows", 20)]

    def test_a_task_without_a_store_cannot_store(self) -> None:
        """Test that store_partial in a task that has no partial store raises RuntimeError."""
        with task_scope(CancellationToken()), pytest.raises(RuntimeError, match="result store"):
            store_partial("rows", 10)

    def test_stored_values_survive_the_task_being_cancelled(self, thread_pool: ThreadPool) -> None:
        """Test that what a pool task stored before it was cancelled is in the
        CancelledException's partial_results."""
        started = threading.Event()

        def store_then_wait() -> None:
            store_partial("rows", 41)
            started.set()
            current_token().wait_blocking(WAIT)
            check_cancelled()

        token = CancellationToken()
        future = thread_pool.submit_task(store_then_wait, token=token)
        assert started.wait(WAIT)
        token.cancel("stop")
        with pytest.raises(CancelledException) as info:
            future.result(WAIT)
        assert info.value.partial_results == {"rows": 41}


class TestDeliverPartial:
    """How a pool hands a task's partial results to the caller's sink, away from the task."""

    def test_keeps_the_latest_value_and_calls_the_sink_in_order(self) -> None:
        """Test that each value is kept under its key (the latest wins) and passed on."""
        store: dict[str, Any] = {}
        seen: list[tuple[str, Any]] = []
        for key, value in [("a", 1), ("b", 2), ("a", 3)]:
            deliver_partial(store, lambda k, v: seen.append((k, v)), key, value)
        assert store == {"a": 3, "b": 2}
        assert seen == [("a", 1), ("b", 2), ("a", 3)]

    def test_a_raising_sink_is_logged_and_the_value_kept(self, logs: LogCapture) -> None:
        """Test that a sink that raises does not break the stream: the value is kept and
        the error logged with the ids given."""
        store: dict[str, Any] = {}

        def bad(key: str, value: Any) -> None:
            raise RuntimeError("sink broke")

        deliver_partial(store, bad, "k", 1, pool="p1")
        deliver_partial(store, bad, "k", 2, pool="p1")
        assert store == {"k": 2}
        errors = [
            r for r in logs.cancelflow("ERROR") if r["message"].startswith("partial_sink raised\n")
        ]
        assert len(errors) == 2
        assert errors[0]["extra"]["pool"] == "p1"
        assert errors[0]["message"].endswith("RuntimeError: sink broke")  # its traceback


class TestCriticalSection:
    def test_is_a_plain_block_outside_a_process_worker(self) -> None:
        """Test that outside a process worker critical_section runs its body and lets its
        exceptions through, deferring nothing."""
        ran: list[str] = []
        with critical_section(1):
            ran.append("body")
        with pytest.raises(ValueError, match="through"), critical_section(1.5):
            raise ValueError("through")
        assert ran == ["body"]

    def test_does_not_delay_a_cooperative_cancel_in_a_thread(self, thread_pool: ThreadPool) -> None:
        """Test that a token is cancelled at once even while its thread task is inside a
        critical section (only forced stops are deferred, and threads have none)."""
        inside, left = threading.Event(), threading.Event()
        seen: list[bool] = []

        def task() -> None:
            with critical_section(WAIT):
                inside.set()
                seen.append(current_token().wait_blocking(WAIT))
            left.set()

        token = CancellationToken()
        thread_pool.submit_task(task, token=token)
        wait(inside)
        token.cancel("now")
        wait(left)
        assert seen == [True]
