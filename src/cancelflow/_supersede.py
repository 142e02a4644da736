"""`Superseder`: per key, a new run cancels the running one, waits for it, then starts.

The message-queue pattern ("a new message cancels the reply being prepared for the
previous one") as a primitive, safe under concurrent callers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ._async import shielded
from ._exceptions import CancelledException
from ._log import safe_log
from ._token import CancellationToken

__all__ = ("DEFAULT_SUPERSEDE_REASON", "Superseder")

T = TypeVar("T")

DEFAULT_SUPERSEDE_REASON = "superseded by a newer run"


class _Slot:
    __slots__ = ("done", "key", "token")

    def __init__(self, key: str, loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self.token = CancellationToken(name=f"supersede:{key}")
        self.done: asyncio.Future[None] = loop.create_future()


class Superseder:
    """Runs at most one job per key at a time; a newer job supersedes the running one.

    :meth:`run` for a key cancels the token of the key's current job (with a reason),
    waits until that job has ended, then runs the new one with a fresh token. The
    invariant, whatever the interleaving of concurrent callers: **two jobs of the same
    key never run at the same time**, and jobs start in the order :meth:`run` was called.
    A job superseded before it could start is not started at all (its caller gets
    :class:`CancelledException`). Keys are independent of each other.

    How fast the superseded job ends is up to the job: it is told through its token (a
    :class:`PipelineExecutor` run then ends in its own mode: graceful by default, after
    the running wave).

    Not promised: that a superseded job produced nothing (a job that ignores its token
    runs to its end, and the newer one waits for it).
    """

    def __init__(self) -> None:
        self._latest: dict[str, _Slot] = {}

    def running_keys(self) -> tuple[str, ...]:
        """Keys with a job running or waiting to run."""
        return tuple(self._latest)

    def cancel(self, key: str, reason: str | None = DEFAULT_SUPERSEDE_REASON) -> bool:
        """Cancel the key's newest job without starting another; ``True`` if one was told."""
        slot = self._latest.get(key)
        return slot is not None and slot.token.cancel(reason)

    async def run(
        self,
        key: str,
        job: Callable[[CancellationToken], Awaitable[T]],
        *,
        reason: str | None = DEFAULT_SUPERSEDE_REASON,
    ) -> T:
        """Supersede the key's current job (if any) and run ``job(token)``; return its result.

        Args:
            key: what the job is for (a conversation, a user, a document...).
            job: called with the job's token once every older job of ``key`` has ended.
            reason: the cancel reason given to the job this call supersedes.

        Cancellation while it blocks: if this call is itself superseded while waiting for
        the older job, it raises :class:`CancelledException` with the newer call's reason
        and ``job`` is never called. If the awaiting task is cancelled, the job (or the
        wait) is cancelled too; the next job of the key still waits until the older ones
        have really ended.

        Raises:
            CancelledException: superseded before ``job`` could start.
            TypeError: ``key`` is not a string, ``job`` not callable, or ``reason``
                neither a string nor ``None`` (raised before anything is superseded).
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, not {type(key).__name__}")
        if not callable(job):
            raise TypeError(f"job must be callable, not {type(job).__name__}")
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"reason must be a str or None, not {type(reason).__name__}")
        slot = _Slot(key, asyncio.get_running_loop())
        previous = self._latest.get(key)
        self._latest[key] = slot
        if previous is not None:
            if previous.token.cancel(reason):
                safe_log("DEBUG", f"superseding the running job of key {key!r}: {reason}")
        ran = False
        try:
            if previous is not None:
                await shielded(previous.done)
            if slot.token.is_cancelled:
                why = slot.token.cancel_reason
                raise CancelledException(why or "superseded before it started", reason=why)
            ran = True
            return await job(slot.token)
        finally:
            self._finish(slot, previous, ran)

    def _finish(self, slot: _Slot, previous: _Slot | None, ran: bool) -> None:
        slot.token.close()
        if not ran and previous is not None and not previous.done.done():
            # We gave up waiting (our task was cancelled) while the older job still runs:
            # whoever comes next must wait for that job, through us.
            previous.done.add_done_callback(lambda _: self._forget(slot))
        else:
            self._forget(slot)

    def _forget(self, slot: _Slot) -> None:
        if self._latest.get(slot.key) is slot:
            del self._latest[slot.key]
        if not slot.done.done():
            slot.done.set_result(None)
