"""``Executor.map`` for the pools: results in input order, a bounded window of calls in
flight (``buffersize``, the stdlib's since Python 3.14, here on every version), and what
happens to the calls not collected when the iteration stops.

Package-internal: :meth:`cancelflow.ThreadPool.map` and :meth:`cancelflow.ProcessPool.map`
check their own ``chunksize`` and call :func:`ordered_map`, which checks ``buffersize``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, TypeVar

__all__ = ("ordered_map",)

T = TypeVar("T")

_END = object()


def _check_buffersize(buffersize: object) -> int | None:
    """``buffersize`` as given if it is ``None`` or an int >= 1.

    Raises:
        TypeError: not an int (a ``bool`` is refused too).
        ValueError: < 1 (``"buffersize must be None or > 0"``, Python 3.14's words).
    """
    if buffersize is None:
        return None
    if isinstance(buffersize, bool) or not isinstance(buffersize, int):
        raise TypeError(f"buffersize must be an integer or None, not {type(buffersize).__name__}")
    if buffersize < 1:
        raise ValueError("buffersize must be None or > 0")
    return buffersize


def ordered_map(
    submit: Callable[..., concurrent.futures.Future[T]],
    fn: Callable[..., T],
    iterables: tuple[Iterable[Any], ...],
    *,
    timeout: float | None,
    buffersize: object,
    chunked: bool = False,
) -> Iterator[Any]:
    """Submit ``fn(*args)`` for each ``args`` of ``zip(*iterables)`` and return an iterator
    over the results, in input order.

    Without ``buffersize`` every call is submitted before this returns (the iterables are
    consumed here). With it, the first ``buffersize`` calls are submitted here and one
    more each time a result is asked for, before waiting for it (so while it waits,
    ``buffersize`` + 1 calls may be in flight, as in the stdlib), and the iterables are
    read as the results are consumed (an error raised by an iterable, or by ``submit``,
    comes out of ``next()``).

    ``timeout`` counts from this call: a result not ready by then makes ``next()`` raise
    :class:`TimeoutError`. When that happens, or a call raises, or the iterator is closed
    (also before its first result), or collected after its first result, every call not
    collected yet is cancelled, the last submitted first: a queued one never starts, so
    a worker freed by the stop of a running one finds none of them. What ``cancel()``
    does to a running call is the pool's (both pools stop it). Collected before its
    first result, it cancels nothing (see :class:`_Results`).

    ``chunked``: each call returns a list of results (a chunk of a ``chunksize`` > 1),
    whose items the iterator yields one by one; everything above holds for the chunks.

    With ``buffersize`` the iterator holds the pool's ``submit``, so the pool stays alive
    while the iterator does (the stdlib's ``map`` stops submitting, and so ends early,
    once the executor is collected); without, it holds only the futures.

    Raises:
        TypeError, ValueError: ``buffersize`` is not ``None`` or an int >= 1 (before any
            argument is read).
    """
    window = _check_buffersize(buffersize)  # (raises before anything is read)
    end_time = None if timeout is None else timeout + time.monotonic()
    calls = zip(*iterables, strict=False)
    if window is None:
        pending = collections.deque(submit(fn, *args) for args in calls)
    else:
        pending = collections.deque(
            submit(fn, *args) for _, args in zip(range(window), calls, strict=False)
        )

    # Without a window everything is submitted: the iterator then holds no reference to
    # the pool (a pool dropped while its results are read is collected, its threads end).
    more = submit if window is not None else None

    def results() -> Generator[Any, None, None]:
        try:
            while pending:
                if more is not None:
                    args = next(calls, _END)
                    if args is not _END:
                        pending.append(more(fn, *args))  # type: ignore[misc]
                left = None if end_time is None else end_time - time.monotonic()
                if chunked:
                    yield from _pop_result(pending, left)  # type: ignore[misc]  # a list here
                else:
                    yield _pop_result(pending, left)
        finally:
            _cancel_all(pending)

    return _Results(results(), pending)


def _cancel_all(pending: collections.deque[concurrent.futures.Future[T]]) -> None:
    """Cancel every future left, the last submitted first."""
    for future in reversed(pending):
        future.cancel()


class _Results(Iterator[T]):
    """The iterator :func:`ordered_map` returns: a generator's, plus a :meth:`close` that
    cancels the calls left even before the first ``next()`` (a generator that never
    started runs no ``finally``). Collected before its first ``next()``, it cancels
    nothing: ``pool.map(fn, items)`` whose result is dropped runs every call, as in the
    stdlib (fire and forget)."""

    __slots__ = ("_generator", "_pending")

    def __init__(
        self, generator: Generator[T, None, None], pending: collections.deque[Any]
    ) -> None:
        self._generator = generator
        self._pending = pending

    def __next__(self) -> T:
        return next(self._generator)

    def close(self) -> None:
        """Stop: every call not collected yet is cancelled (see :func:`ordered_map`)."""
        self._generator.close()
        _cancel_all(self._pending)


def _pop_result(
    pending: collections.deque[concurrent.futures.Future[T]], timeout: float | None
) -> T:
    """The result of the first future, which is then removed from ``pending``.

    If it raises (the call's error, or :class:`TimeoutError`), the future stays, to be
    cancelled with the rest. Returned, not held: no frame keeps the result.
    """
    result = pending[0].result(timeout)
    pending.popleft()
    return result
