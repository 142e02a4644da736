"""Specification of the library's wait for an asyncio future that never cancels it
(``_async.until_done`` and ``_async.shielded``, used where ``asyncio.shield`` and
``asyncio.wait`` were): safe when the awaiting task is cancelled from a signal handler,
as ``asyncio.run``'s Ctrl-C handler does, at any point of the wake-up."""

from __future__ import annotations

import asyncio
import sys
import types
from typing import Any

import pytest

from cancelflow._async import shielded, until_done


def _wake_code() -> types.CodeType:
    """The code of until_done's wake-up callback (a nested function)."""
    (code,) = (
        const
        for const in until_done.__code__.co_consts
        if isinstance(const, types.CodeType) and const.co_name == "wake"
    )
    return code


def _wake_lines() -> list[int]:
    """The lines of its body (the ``def`` line itself reports no line event)."""
    code = _wake_code()
    lines = {line for _, _, line in code.co_lines() if line is not None}
    return sorted(lines - {code.co_firstlineno})


class TestUntilDone:
    def test_returns_true_once_the_future_is_done_and_leaves_its_exception_unread(
        self,
    ) -> None:
        """Test that until_done returns True when the future ends, without reading it:
        an exception it holds is neither raised nor marked retrieved."""

        async def main() -> tuple[bool, asyncio.Future[None]]:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(future.set_exception, ValueError("kept"))
            return await until_done(future), future

        done, future = asyncio.run(main())
        assert done
        with pytest.raises(ValueError, match="kept"):
            future.result()

    def test_returns_false_after_the_timeout_with_the_future_pending(self) -> None:
        """Test that until_done gives up after its timeout and says so; the future is
        left pending and uncancelled."""

        async def main() -> tuple[bool, bool]:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done = await until_done(future, 0.01)
            return done, future.done()

        assert asyncio.run(main()) == (False, False)

    def test_a_cancel_of_the_waiting_task_never_reaches_the_future(self) -> None:
        """Test that cancelling the awaiting task ends the wait with CancelledError and
        leaves the awaited future pending."""

        async def main() -> bool:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiting = asyncio.ensure_future(until_done(future))
            await asyncio.sleep(0)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            return future.cancelled() or future.done()

        assert asyncio.run(main()) is False

    @pytest.mark.parametrize("line", _wake_lines())
    def test_a_cancel_landing_on_any_line_of_the_wake_up_is_silent(self, line: int) -> None:
        """Test that a cancel of the awaiting task made at any line of the wake-up
        callback (where a signal handler, such as asyncio.run's Ctrl-C handler, can run)
        ends the wait with CancelledError and makes the loop report nothing (asyncio's
        own shield and wait log an InvalidStateError when it lands between their check
        and their set)."""
        code = _wake_code()
        reported: list[dict[str, Any]] = []

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lambda _, context: reported.append(context))
            future: asyncio.Future[None] = loop.create_future()
            waiting = asyncio.ensure_future(until_done(future))
            await asyncio.sleep(0)

            def local(frame: types.FrameType, event: str, _: object) -> Any:
                if event == "line" and frame.f_lineno == line:
                    waiting.cancel()  # as a signal handler would, between two lines
                return local

            def calls(frame: types.FrameType, event: str, _: object) -> Any:
                return local if frame.f_code is code else None

            sys.settrace(calls)
            try:
                future.set_result(None)
                await asyncio.sleep(0)  # the callbacks run
            finally:
                sys.settrace(None)
            with pytest.raises(asyncio.CancelledError):
                await waiting

        asyncio.run(main())
        assert reported == []


class TestShielded:
    def test_returns_the_result_of_a_coroutine(self) -> None:
        """Test that shielded(coroutine) runs it and returns its result."""

        async def answer() -> int:
            await asyncio.sleep(0)
            return 42

        async def main() -> int:
            return await shielded(answer())

        assert asyncio.run(main()) == 42

    def test_raises_the_exception_of_the_awaited_future(self) -> None:
        """Test that shielded() raises what the future holds."""

        async def main() -> None:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_exception(LookupError("inner"))
            await shielded(future)

        with pytest.raises(LookupError, match="inner"):
            asyncio.run(main())

    def test_the_awaited_task_runs_on_when_the_waiting_task_is_cancelled(self) -> None:
        """Test that cancelling the task awaiting shielded(task) does not cancel the
        task, which finishes."""

        async def main() -> str:
            release = asyncio.Event()

            async def work() -> str:
                await release.wait()
                return "finished"

            inner = asyncio.ensure_future(work())
            waiting = asyncio.ensure_future(shielded(inner))
            await asyncio.sleep(0)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            release.set()
            return await inner

        assert asyncio.run(main()) == "finished"
