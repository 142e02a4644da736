"""Tests for :mod:`cancelflow._exceptions`."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest
from hypothesis import given, strategies as st

from cancelflow import (
    CancelflowError,
    CancelledException,
    Fate,
    MemoryLimitError,
    PipelineDefinitionError,
    PipelineFailedException,
    PipelineTimeoutException,
    PoolClosedError,
    WorkerCrashedError,
)

ALL_ERRORS = (
    CancelflowError,
    CancelledException,
    PipelineTimeoutException,
    PipelineFailedException,
    PipelineDefinitionError,
    WorkerCrashedError,
    PoolClosedError,
    MemoryLimitError,
)

reasons = st.none() | st.text(max_size=50)
partials = st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=10), max_size=5)
waves = st.none() | st.integers(min_value=0, max_value=10_000)


def roundtrip(exc: BaseException) -> Any:
    return pickle.loads(pickle.dumps(exc))


class TestCancelflowError:
    @pytest.mark.parametrize("cls", ALL_ERRORS[1:])
    def test_every_error_derives_from_base(self, cls: type[Exception]) -> None:
        """Test that every cancelflow error is a CancelflowError."""
        assert issubclass(cls, CancelflowError)

    @pytest.mark.parametrize("cls", ALL_ERRORS)
    def test_no_error_is_asyncio_cancellation(self, cls: type[Exception]) -> None:
        """Test that no cancelflow error is an asyncio.CancelledError or a BaseException only."""
        assert not issubclass(cls, asyncio.CancelledError)
        assert issubclass(cls, Exception)

    def test_pickle_roundtrip(self) -> None:
        """Test that the base error pickles with its message."""
        copy = roundtrip(CancelflowError("boom"))
        assert type(copy) is CancelflowError
        assert str(copy) == "boom"


class TestCancelledException:
    def test_seed_message_format(self) -> None:
        """Test that str() reads "<message> (at wave N) - K partial results available"."""
        exc = CancelledException("Test cancel", partial_results={"tool_a": 1}, wave_num=2)
        assert str(exc) == "Test cancel (at wave 2) - 1 partial results available"

    def test_message_without_wave(self) -> None:
        """Test that str() leaves out the wave when there is none."""
        assert str(CancelledException("stopped")) == "stopped - 0 partial results available"

    def test_defaults(self) -> None:
        """Test that a bare CancelledException has a message, no results, wave or reason."""
        exc = CancelledException()
        assert exc.message == "operation cancelled"
        assert exc.partial_results == {}
        assert exc.wave_num is None
        assert exc.reason is None

    def test_attributes(self) -> None:
        """Test that message, partial_results, wave_num and reason are kept."""
        exc = CancelledException("m", {"a": 1}, 3, reason="new message")
        assert (exc.message, exc.partial_results, exc.wave_num, exc.reason) == (
            "m",
            {"a": 1},
            3,
            "new message",
        )

    def test_partial_results_are_copied(self) -> None:
        """Test that later changes to the caller's dict do not change the exception."""
        results = {"a": 1}
        exc = CancelledException("m", results)
        results["b"] = 2
        assert exc.partial_results == {"a": 1}

    def test_is_not_asyncio_cancelled_error(self) -> None:
        """Test that CancelledException is not asyncio.CancelledError."""
        assert not issubclass(CancelledException, asyncio.CancelledError)
        assert issubclass(CancelledException, CancelflowError)

    def test_raised_in_task_is_not_task_cancellation(self) -> None:
        """Test that a task raising CancelledException ends failed, not cancelled."""

        async def node() -> None:
            raise CancelledException("stop", wave_num=0)

        async def main() -> asyncio.Task[None]:
            task = asyncio.ensure_future(node())
            with pytest.raises(CancelledException):
                await task
            return task

        task = asyncio.run(main())
        assert not task.cancelled()
        assert isinstance(task.exception(), CancelledException)

    @given(message=st.text(max_size=50), partial=partials, wave=waves, reason=reasons)
    def test_pickle_roundtrip(
        self, message: str, partial: dict[str, Any], wave: int | None, reason: str | None
    ) -> None:
        """Test that every attribute survives a pickle round-trip."""
        exc = CancelledException(message, partial, wave, reason=reason)
        copy = roundtrip(exc)
        assert type(copy) is CancelledException
        assert (copy.message, copy.partial_results, copy.wave_num, copy.reason) == (
            message,
            partial,
            wave,
            reason,
        )
        assert str(copy) == str(exc)


class TestPipelineTimeoutException:
    def test_is_cancelled_exception_and_timeout_error(self) -> None:
        """Test that a timeout is both a cancellation and a TimeoutError."""
        exc = PipelineTimeoutException("late", {"a": 1}, 1, timeout=2.5)
        assert isinstance(exc, CancelledException)
        assert isinstance(exc, TimeoutError)
        with pytest.raises(TimeoutError):
            raise exc

    def test_message_format(self) -> None:
        """Test that str() has the same shape as for any cancellation."""
        exc = PipelineTimeoutException("pipeline timed out", {"a": 1, "b": 2}, 4)
        assert str(exc) == "pipeline timed out (at wave 4) - 2 partial results available"

    @given(partial=partials, wave=waves, reason=reasons, timeout=st.none() | st.floats(0, 1e6))
    def test_pickle_roundtrip(
        self, partial: dict[str, Any], wave: int | None, reason: str | None, timeout: float | None
    ) -> None:
        """Test that every attribute, the timeout included, survives a pickle round-trip."""
        exc = PipelineTimeoutException("t", partial, wave, reason=reason, timeout=timeout)
        copy = roundtrip(exc)
        assert type(copy) is PipelineTimeoutException
        assert (copy.partial_results, copy.wave_num, copy.reason, copy.timeout) == (
            partial,
            wave,
            reason,
            timeout,
        )
        assert str(copy) == str(exc)


class TestPipelineFailedException:
    def test_is_not_a_cancellation(self) -> None:
        """Test that a failed pipeline is distinct from a cancelled one."""
        assert not issubclass(PipelineFailedException, CancelledException)

    def test_pickle_roundtrip(self) -> None:
        """Test that node_id, partial_results and wave_num survive a pickle round-trip."""
        exc = PipelineFailedException(
            "node b failed", node_id="b", partial_results={"a": 1}, wave_num=1
        )
        copy = roundtrip(exc)
        assert type(copy) is PipelineFailedException
        assert (copy.message, copy.node_id, copy.partial_results, copy.wave_num) == (
            "node b failed",
            "b",
            {"a": 1},
            1,
        )

    def test_cause_is_kept_by_raise_from(self) -> None:
        """Test that raising it from the node's error keeps that error as __cause__."""
        cause = ValueError("bad input")
        with pytest.raises(PipelineFailedException) as info:
            raise PipelineFailedException("failed", node_id="n") from cause
        assert info.value.__cause__ is cause


class TestPipelineDefinitionError:
    def test_is_value_error(self) -> None:
        """Test that a definition error is also a ValueError."""
        with pytest.raises(ValueError, match="cycle"):
            raise PipelineDefinitionError("cycle between a and b", node_id="a")

    def test_pickle_roundtrip(self) -> None:
        """Test that message and node_id survive a pickle round-trip."""
        copy = roundtrip(PipelineDefinitionError("duplicate id", node_id="x"))
        assert type(copy) is PipelineDefinitionError
        assert (str(copy), copy.node_id) == ("duplicate id", "x")


class TestWorkerCrashedError:
    def test_is_runtime_error_not_cancellation(self) -> None:
        """Test that a crashed worker is a RuntimeError and not a cancellation."""
        assert issubclass(WorkerCrashedError, RuntimeError)
        assert not issubclass(WorkerCrashedError, CancelledException)

    def test_pickle_roundtrip(self) -> None:
        """Test that exitcode, signal and pid survive a pickle round-trip."""
        copy = roundtrip(WorkerCrashedError("worker died", exitcode=None, signal=9, pid=1234))
        assert type(copy) is WorkerCrashedError
        assert (str(copy), copy.exitcode, copy.signal, copy.pid) == ("worker died", None, 9, 1234)


class TestPoolClosedError:
    def test_is_runtime_error_distinct_from_crash(self) -> None:
        """Test that "closed by us" is a RuntimeError distinct from a worker crash."""
        assert issubclass(PoolClosedError, RuntimeError)
        assert not issubclass(PoolClosedError, WorkerCrashedError)

    def test_pickle_roundtrip(self) -> None:
        """Test that the message survives a pickle round-trip."""
        copy = roundtrip(PoolClosedError("pool is shut down"))
        assert type(copy) is PoolClosedError
        assert str(copy) == "pool is shut down"


class TestFatesSurvivePickling:
    def test_cancelled_exception_keeps_fate_and_node_fates(self) -> None:
        """Test that fate and node_fates survive a pickle round trip (they cross processes)."""
        import pickle

        from cancelflow import CancelledException, Fate, PipelineFailedException

        error = CancelledException("stopped", {"a": 1}, 2, reason="r")
        error.fate = Fate.KILLED
        error.node_fates = {"a": Fate.FINISHED, "b": Fate.KILLED}
        copy = pickle.loads(pickle.dumps(error))
        assert (copy.fate, copy.node_fates, copy.reason) == ("killed", error.node_fates, "r")
        failed = PipelineFailedException("boom", node_id="b")
        failed.node_fates = {"b": Fate.FAILED}
        assert pickle.loads(pickle.dumps(failed)).node_fates == {"b": "failed"}

    def test_node_attempts_survive_pickling(self) -> None:
        """Test that node_attempts survives a pickle round trip on both pipeline errors."""
        cancelled = CancelledException("stopped")
        cancelled.node_attempts = {"a": 2}
        assert roundtrip(cancelled).node_attempts == {"a": 2}
        failed = PipelineFailedException("boom", node_id="a")
        failed.node_attempts = {"a": 3}
        assert roundtrip(failed).node_attempts == {"a": 3}


class TestMemoryLimitError:
    def test_is_a_memory_error_not_a_cancellation(self) -> None:
        """Test that a memory kill is a CancelflowError and a MemoryError, never a
        cancellation, with fate killed."""
        error = MemoryLimitError("node tree killed: memory")
        assert isinstance(error, CancelflowError)
        assert isinstance(error, MemoryError)
        assert not isinstance(error, CancelledException)
        assert error.fate == Fate.KILLED

    def test_pickle_roundtrip(self) -> None:
        """Test that partial results, reason, used and limit survive a pickle round trip
        (the error travels from the Dask worker)."""
        error = MemoryLimitError("killed", {"k": 1}, reason="memory: x", used=5, limit=7)
        copy = roundtrip(error)
        assert (str(copy), copy.partial_results, copy.reason) == ("killed", {"k": 1}, "memory: x")
        assert (copy.used, copy.limit, copy.fate) == (5, 7, Fate.KILLED)
