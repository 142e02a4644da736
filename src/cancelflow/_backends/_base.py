"""The pool protocol: what every backend that runs a task for cancelflow promises.

:class:`PoolBackend` is the one contract between the layers that *schedule* work (the
pipeline executor) and the backends that *run* it: cancelflow's :class:`~cancelflow.ThreadPool`
and :class:`~cancelflow.ProcessPool`, and :class:`~cancelflow.DaskRunner`. The executor
depends on this protocol only; ``tests/test_backend_contract.py`` runs one suite over every
backend against it.

Near a leaf: it imports only :mod:`typing`, :mod:`collections.abc`, ``cancelflow._token``
and ``cancelflow._context`` (for :data:`PartialSink`), so the executor's layer imports it
without importing any backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from .._context import PartialSink
from .._token import CancellationToken

__all__ = ("PartialSink", "PoolBackend")


@runtime_checkable
class PoolBackend(Protocol):
    """A place that runs ``fn(*args)`` away from the event loop and stops it on request.

    Implemented by :class:`~cancelflow.ThreadPool`, :class:`~cancelflow.ProcessPool` and
    :class:`~cancelflow.DaskRunner`. Backends may take more (keyword) arguments than these
    (``term_grace_period``, ``run_in``...), and must give these the meaning below.

    **run_sync(fn, *args, token=None, timeout=None, grace_period=None, partial_sink=None)**

    *Result.* Awaiting it runs ``fn(*args)`` (a plain callable; coroutine functions only
    where a backend says so) and returns what it returned. If ``fn`` raises, the call
    raises that exception: the same type with the same ``args`` (a copy, for a backend
    that runs the task in another process; the remote traceback may be its
    ``__cause__``).

    *Before the task runs.* If ``token`` is already cancelled when ``run_sync`` is called,
    it raises :class:`~cancelflow.CancelledException` whose ``reason`` is
    ``token.cancel_reason``, before anything is queued or sent: ``fn`` never runs and no
    worker is taken. If ``token`` is cancelled while the task is queued, the task is
    dropped and never runs, and the call raises the same way.

    *The task's token.* While ``fn`` runs, :func:`cancelflow.current_token` (and so
    :func:`cancelflow.check_cancelled`) is the task's *own* token, a child of ``token``
    (of a fresh token when ``token`` is ``None``), wherever the task runs:

    - cancelling ``token`` (from any thread, a signal handler, an event loop) cancels the
      task's token with the same reason, promptly;
    - cancelling the task's token from inside the task (``current_token().cancel(r)``)
      stops the task like any cancel (the call raises ``CancelledException`` with reason
      ``r``) but does **not** cancel ``token``, nor anything else of the caller.
      Cancellation flows from the caller to the task, never back.

    *Cancel while it runs.* The task is asked to stop through its token; it is expected to
    notice (``check_cancelled()`` in its loops) and return or raise. The call raises
    :class:`~cancelflow.CancelledException` with:

    - ``reason``: the reason given to the cancel that stopped it;
    - ``partial_results``: every value the task stored with ``store_partial`` before it
      ended (``{key: last value}``);
    - ``fate``: how the task ended (a :class:`~cancelflow.Fate`): ``"cancelled"`` when it
      returned or raised within ``grace_period`` seconds of the cancel (a cooperative
      stop). A value the task returns after its token was cancelled is discarded.

    A task that is still running ``grace_period`` seconds after the cancel (``None``: the
    backend's default) is stopped by force where the backend can: a process is sent
    SIGTERM (fate ``"terminated"``) and, after ``term_grace_period``, SIGKILLed with its
    whole process tree (fate ``"killed"``). A thread cannot be stopped: it is *abandoned*
    (fate ``"abandoned"``), left to run and no longer counted against the pool's size.

    *Timeout.* ``timeout`` bounds the seconds the task may *run* (time queued does not
    count). When it passes, the task's token is cancelled and the call raises
    :class:`~cancelflow.PipelineTimeoutException` (a ``CancelledException`` and a
    :class:`TimeoutError`) whose ``timeout`` is ``timeout``, with ``partial_results`` and
    ``fate`` as for a cancel.

    *Release.* The call returns or raises only once the task is over: it returned or
    raised, or its process and process tree are confirmed gone; for a thread, or it was
    abandoned after ``grace_period``. Hence ``partial_results`` is final, and nothing of
    the task runs on (except an abandoned thread) once the caller has the outcome.

    *Partial results.* Each ``store_partial(key, value)`` the task makes calls
    ``partial_sink(key, value)`` in the caller's process, in the order the task stored
    them, and every one of them before the call returns or raises (also when the task is
    stopped or killed). Which thread calls the sink is the backend's (the task's thread,
    a supervisor thread, the client's event loop): it must be quick, thread-safe, and
    must not raise. Without a ``partial_sink`` the values still reach
    ``partial_results`` of a cancel's exception.

    *The awaiting coroutine cancelled.* If the asyncio task awaiting ``run_sync`` is
    cancelled, the task is stopped as for a cancel of ``token`` and, once it is over (see
    *Release*), :class:`asyncio.CancelledError` propagates.

    *Errors.* ``CancelledException`` / ``PipelineTimeoutException`` as above;
    :class:`~cancelflow.WorkerCrashedError`: the process running the task died by itself;
    :class:`~cancelflow.PoolClosedError`: the backend was shut down;
    ``TypeError`` / ``ValueError``: a bad argument, or (other processes) ``fn`` or an
    argument cannot be sent, raised before anything runs.

    **shutdown(wait=True, *, cancel_futures=False)**

    From the first call on, ``run_sync`` raises :class:`~cancelflow.PoolClosedError`.
    Idempotent. Calls already running are not stopped (cancel their tokens for that).
    With ``cancel_futures``, calls queued and not started never start. With ``wait``,
    it returns once every call already submitted is over and every thread and process
    the backend started to run tasks has ended (and been reaped); without ``wait`` it
    returns at once and the same happens in the background. It may block: call it off
    the event loop. A backend that also holds asynchronous resources (a client
    connection) releases those in an ``aclose()`` coroutine.
    """

    async def run_sync(
        self,
        fn: Callable[..., Any],
        *args: Any,
        token: CancellationToken | None = None,
        timeout: float | None = None,
        grace_period: float | None = None,
        partial_sink: PartialSink | None = None,
    ) -> Any:
        """Run ``fn(*args)`` in the backend and return its result (see the class)."""
        ...

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; with ``wait``, return once everything submitted is over and
        every thread and process started for it is gone (see the class)."""
        ...
