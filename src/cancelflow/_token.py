"""`CancellationToken`: one flag that any thread, signal handler, event loop or process can
set, and all of them can read and wait on."""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import itertools
import multiprocessing.context
import multiprocessing.reduction
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, overload

from . import _cell, _timer
from ._exceptions import CancelledException
from ._log import safe_log
from ._platform import HAVE_FUTEX, TOKENS_CROSS_PROCESSES, at_fork, futex_wait, futex_wake
from ._validate import check_seconds as _check_timeout

if TYPE_CHECKING:
    from ._remote import RemoteToken

__all__ = ("CallbackHandle", "CancellationToken", "Reason", "TokenRef", "token_on_slot")

Reason = str | None
_ids = itertools.count(1)


def check_reason(reason: object, what: str = "reason") -> Reason:
    """Return ``reason`` if it is a ``str`` (any text) or ``None``.

    Raises:
        TypeError: anything else, naming ``what``.
    """
    if reason is not None and not isinstance(reason, str):
        raise TypeError(f"{what} must be a str or None, not {type(reason).__name__}")
    return reason


class CallbackHandle:
    """What :meth:`CancellationToken.on_cancel` returns: lets you take the callback back."""

    __slots__ = ("_id", "_token")

    def __init__(self, token: CancellationToken, ident: int) -> None:
        self._token = token
        self._id = ident

    def remove(self) -> bool:
        """Unregister the callback; return ``True`` if it had not run and now never will.

        Idempotent, lock-free, and safe from any thread or a signal handler.
        """
        token = self._token
        removed = token._callbacks.pop(self._id, None) is not None
        if removed and not token._callbacks:
            token._chunk.unwatch(token._id)
        return removed

    def __enter__(self) -> CallbackHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class _Cell(ctypes.Structure):
    # ``_flag`` is the shared flag, in memory every process that maps the slot sees (and
    # the futex word that waiters sleep on). A token that only this process can see also
    # keeps a copy in a slot, which is what its ``is_cancelled`` reads (a slot is cheaper
    # to read than a ctypes field); once the token can be seen by another process,
    # ``is_cancelled`` *is* this field (a C getter, no Python call). See ``_shared_twin``.
    _fields_ = (
        ("_flag", ctypes.c_bool),
        ("_pad", ctypes.c_uint8 * 3),
        ("_reason_len", ctypes.c_uint32),
        ("_reason_bytes", ctypes.c_char * _cell.REASON_MAX),
    )


class CancellationToken(_Cell):
    """A thread-, signal- and process-safe cancellation flag with a reason.

    A token starts not cancelled. :meth:`cancel` sets it, once: the first call wins, its
    reason is kept, and later calls (from any thread, any process, or a signal handler)
    return ``False`` and change nothing. Everything waiting on the token is then woken:
    ``await token.wait()`` on any asyncio loop, :meth:`wait_blocking` in any thread or
    process, and every :meth:`on_cancel` callback, exactly once.

    ``token.is_cancelled`` never blocks, takes no lock, calls nothing and makes no system
    call: while only this process can see the token it is a slot read (cheaper than
    ``threading.Event.is_set()``), and once another process may (the token was sent
    to a process start, or the process forked while it lived) it is one byte of shared
    memory read by a C getter (over ten times cheaper than
    ``multiprocessing.Event.is_set()``). Fine in a hot loop and in a signal handler.

    Linked tokens: :meth:`child` makes a token cancelled whenever this one is (not the
    reverse); :meth:`linked` one cancelled when any of several is; ``timeout=`` cancels a
    token by itself after that many seconds. Links and timers are dropped as soon as the
    token is cancelled, closed or garbage-collected, so a long-lived parent does not grow
    with the short-lived children it spawns. Links and timers live in the process that
    made them; the flag they set is shared. So a ``timeout=`` fires only while the process
    that made the token runs: a child process that outlives it waits on a token nobody
    will time out (give the child a token of its own with ``timeout=``).

    Across processes: pass the token to ``multiprocessing.Process(args=...)`` (any start
    method) or use cancelflow's pools. Either side may cancel and both see it at once;
    the other side's waiters wake through a ``futex`` on the shared word. A token cannot
    be pickled through a queue or pipe to an already-running process (there is no way to
    hand it the shared memory): that raises ``TypeError``. Reasons: see
    :attr:`cancel_reason` (any ``str`` is kept exactly; another process reads it cut to 120
    bytes). Callbacks, links and timers belong to the process that made
    them: a child process (forked ones included) starts with no callbacks on the tokens it
    receives, and a cancel made anywhere runs the callbacks where they were registered.

    Not promised: ``is_cancelled`` being ``True`` does not mean the work has stopped, only
    that it was asked to. ``is_cancelled`` is a read-only attribute by contract; writing it
    bypasses callbacks and waiters.

    Signal safety: :meth:`cancel`, :meth:`on_cancel` and :meth:`CallbackHandle.remove`
    take no lock within a process (each decision is one operation on a built-in list or
    dict: atomic under the GIL, and under that container's own lock on a free-threaded
    build; timers are unscheduled lock-free), so a signal handler that calls ``cancel()`` while
    the interrupted thread is inside any of the token's methods (``cancel()`` itself
    included, while it runs callbacks or logs) cannot deadlock. Every callback still runs
    exactly once; callbacks skipped because an exception (say ``KeyboardInterrupt``) cut
    a ``cancel()`` short run at the next ``cancel()``.

    The only locks these paths can reach are re-entrant, so a handler may take them again
    over the code it interrupted: making or collecting a token (also :meth:`child`,
    :meth:`linked`, ``timeout=``) takes the slot-accounting ``RLock``; starting the
    timer thread (a callback making a timeout token) or this process's hub thread
    (``on_cancel()`` on a token shared with another process) takes ``threading``'s module
    lock, an ``RLock`` too (the threads are daemons, so no other ``threading`` lock is
    taken); logging a failed callback meets loguru's handler lock, which refuses
    re-entry instead of deadlocking (the line is then dropped). What a callback itself
    locks is the callback's to make safe. Safe from a signal handler, then:
    ``is_cancelled``, :attr:`cancel_reason`, :meth:`raise_if_cancelled`, :meth:`cancel`,
    :meth:`on_cancel`, :meth:`CallbackHandle.remove`, :meth:`close`, :meth:`child`,
    :meth:`linked` and making tokens. Not :meth:`wait_blocking` (it would block the
    interrupted thread) and not :meth:`reset` (see there).

    Attributes:
        is_cancelled (bool): whether the token was cancelled, by anyone, anywhere. An
            attribute read (a plain one, or, for a token shared with other processes, a
            field of its shared memory): no call, no lock, never blocks, safe in a
            signal handler; in a hot loop prefer it (or :func:`~cancelflow.check_cancelled`
            in a task) to a method call. Read-only by contract (writing it bypasses
            callbacks, waiters and other processes).
        name (str): the token's name, for logs and ``repr`` (given, or ``token-<n>``).
    """

    # A slot while only this process can see the token (a slot read is specialised by the
    # interpreter: a few ns, where a ctypes field or a ctypes instance's __dict__ is not);
    # on the shared twin class, the ctypes field ``_Cell._flag`` (see ``_shared_twin``).
    __slots__ = ("is_cancelled",)
    is_cancelled: bool
    _flag: bool
    #: whether ``is_cancelled`` reads the shared flag (a shared twin, or a user's
    #: subclass once one of its tokens was shared: see ``_shared_twin``)
    _shared_view = False
    #: gets a shared twin (cancelflow's own token classes say so in their body)
    _has_twin = True

    def __new__(cls, *args: Any, **kwargs: Any) -> CancellationToken:
        chunk, offset = _cell.allocate_slot()
        self = cls.from_buffer(chunk.mm, offset)
        self._bind(chunk, offset)
        return self

    def _bind(self, chunk: _cell.Chunk, offset: int) -> None:
        # Everything __del__ needs, set before anything can fail (a bad argument to
        # __init__ must still give the slot, and maybe the descriptor, back).
        self._chunk = chunk
        self._offset = offset
        self._links: list[CallbackHandle] = []
        self._timer: _timer.TimerHandle | None = None
        #: handed to another process (pickled at a process start, or built on its slot)
        self._exported = False
        #: the fork count when the token was made: a fork since then shares it too
        self._born = _cell.fork_epoch

    def __init__(self, *, timeout: float | None = None, name: str | None = None) -> None:
        """Create a token, optionally cancelling itself after ``timeout`` seconds.

        Args:
            timeout: seconds after which the token cancels itself with the reason
                ``"timeout after {timeout}s"``; ``None`` for never.
            name: a label for log lines and ``repr``.

        Raises:
            TypeError: ``timeout`` is not a number or ``name`` not a string.
            ValueError: ``timeout`` is negative or not finite.
        """
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        self._init_local(name)
        self._clear_shared()
        with _registering:
            _local_tokens[self._id] = weakref.ref(self)
            if self._born != _cell.fork_epoch:  # a fork came since __new__
                self._share()
        if timeout is not None:
            self._arm_timer(_check_timeout(timeout, "timeout"))

    def _init_local(self, name: str | None) -> None:
        self._id = next(_ids)
        self.name = name or f"token-{self._id}"
        self._once: list[None] = [None]
        self._applied: list[None] = [None]
        #: a cancel() that set the flag was cut short before delivering (see cancel)
        self._undelivered = False
        self._reason: Reason = None
        self._callbacks: dict[int, Callable[[], object]] = {}
        #: one item per thread of this process inside wait_blocking()
        self._blocked: list[None] = []
        #: one item per _finish() running (callbacks being delivered) in this process
        self._finishing: list[None] = []
        #: the thread of each cancel() call in progress in this process
        self._callers: list[int] = []

    def _clear_shared(self) -> None:
        self._reason_len = _cell.REASON_NONE
        self._flag = False
        self.is_cancelled = False

    def _share(self) -> None:
        """From now on another process may see this token: ``is_cancelled`` reads the
        shared flag. Idempotent; safe against a concurrent ``cancel()`` (which always
        writes the shared flag first, so nothing written before the switch is lost)."""
        kind = type(self)
        if not kind._shared_view:
            self.__class__ = _shared_twin(kind)
        _local_tokens.pop(self._id, None)

    @classmethod
    def _on_slot(cls, chunk: _cell.Chunk, offset: int, name: str | None = None) -> Self:
        """A token over an existing slot (another process's token, or a pool's task slot)."""
        self = _shared_twin(cls).from_buffer(chunk.mm, offset)
        chunk.adopt()
        self._bind(chunk, offset)
        self._exported = True
        self._init_local(name)
        if self.is_cancelled:
            self._once.clear()
        return self

    def _is_shared(self) -> bool:
        """Whether another process may hold this token: it was handed over (or is
        another process's, or a pool's slot), or the process forked while it lived.

        Only such tokens pay for cross-process work (slot lock, futex wake, hub thread).
        """
        return self._exported or self._born != _cell.fork_epoch

    # -- reading ------------------------------------------------------------------------
    @property
    def cancel_reason(self) -> Reason:
        """The reason given to the winning :meth:`cancel`, or ``None``.

        ``None`` also while not cancelled. In the process that cancelled, it is the very
        ``str`` given (any text: empty, NULs, lone surrogates such as ``os.fsdecode`` makes,
        emoji, right-to-left scripts). A reason set in another process (or read through
        another token object on the same slot) comes from shared memory, exactly as given
        if its UTF-8 (lone surrogates 3 bytes each) fits in 120 bytes; a longer one reads as
        its longest prefix of whole code points that fits: ``reason[:k]`` for some ``k``,
        with no marker added, never cut inside a character's bytes. Reading never raises.
        """
        if not self.is_cancelled:
            return None
        if self._reason is not None:
            return self._reason
        return self._read_shared_reason()

    def _read_shared_reason(self) -> Reason:
        length = self._reason_len
        if length == _cell.REASON_NONE:
            return None
        # Read by length, never up to a NUL (a reason may hold NULs); a length field that
        # makes no sense (written by something else) cannot take us past the slot.
        raw = ctypes.string_at(
            ctypes.addressof(self) + _Cell._reason_bytes.offset, min(length, _cell.REASON_MAX)
        )
        return _cell.decode_reason(raw)

    def raise_if_cancelled(self) -> None:
        """Raise :class:`CancelledException` (with the reason) if the token is cancelled."""
        if self.is_cancelled:
            reason = self.cancel_reason
            raise CancelledException(reason or "operation cancelled", reason=reason)

    # -- cancelling ---------------------------------------------------------------------
    def cancel(self, reason: Reason = None) -> bool:
        """Cancel the token; return ``True`` if this call cancelled it.

        Idempotent: only the first call, from whatever thread or process, sets the reason
        and runs the callbacks; the others return ``False``. Safe from any thread, from a
        signal handler, and from another process sharing the token. Callbacks run in the
        calling thread before this returns (each exactly once, errors logged).

        Every ``str`` is a valid ``reason`` and reads back as given (see
        :attr:`cancel_reason` for what another process reads).

        Raises:
            TypeError: ``reason`` is neither a ``str`` nor ``None`` (raised before anything
                changes).
        """
        check_reason(reason)
        me = threading.get_ident()
        callers = self._callers
        callers.append(me)  # (see _lost and _await_claim)
        try:
            while True:
                try:
                    self._once.pop()
                except IndexError:
                    if self.is_cancelled or not self._await_claim(me):
                        return self._lost()
                    continue  # the claim was given back: claim again
                break
            return self._cancel_claimed(reason)
        finally:
            callers.remove(me)

    def _lost(self) -> bool:
        """The end of a :meth:`cancel` that did not claim the token: ``False``, after
        finishing what an earlier call cut short by an exception left undone."""
        if self._undelivered:
            # An earlier call set the flag, then an exception (a KeyboardInterrupt
            # landing inside cancel()) cut it short before it woke anyone: deliver.
            self._undelivered = False
            self._apply()
        if (
            self._callbacks
            and self.is_cancelled
            and not self._applied
            and not self._finishing
            and len(self._callers) == 1  # no other cancel() is still delivering
        ):
            # Leftovers of a delivery cut short by an exception: they still run, once.
            self._finish()
        return False

    def _await_claim(self, me: int) -> bool:
        """Another :meth:`cancel` claimed the token and has not set its flag yet (without
        a GIL, or across a thread switch): wait until it has, so that a ``cancel()`` that
        returns ``False`` leaves the token cancelled. ``True``: that call gave its claim
        back (an exception cut it short before it set the flag): claim again.

        Never waits for this very thread (a signal handler that interrupted its own
        thread's ``cancel()``, which sets the flag once it resumes): ``False`` at once.
        """
        if self._callers.count(me) > 1:
            return False
        delay = 1e-6
        while not self.is_cancelled:
            if self._once:
                return True
            time.sleep(delay)  # lets the claiming thread run, GIL or not
            delay = min(delay * 2, 1e-3)
        return False

    def _cancel_claimed(self, reason: Reason) -> bool:
        """The rest of :meth:`cancel`, for the call that claimed the token."""
        chunk = self._chunk
        won = True
        woken = False
        set_here = False
        try:
            if self._is_shared():
                with chunk.lock_slot(self._offset):
                    if self._flag:
                        won = False
                    else:
                        self._write_shared_reason(reason)
                        self._flag = True
                        set_here = True
                        # The class may switch to the shared twin only just after a fork:
                        # until then ``is_cancelled`` is the local copy.
                        self.is_cancelled = True
                        self._reason = reason
                        # Woken before the lock is given back: the unlock's system call
                        # is then not part of any waiter's wake-up.
                        self._wake_every_process()
                        woken = True
                self.is_cancelled = True
            else:
                self._reason = reason
                # The shared flag first: it is the futex word, and what a fork or an export
                # that makes the token shared in the meantime goes by (see _share).
                self._flag = True
                set_here = True
                self.is_cancelled = True
        except BaseException:
            # Interrupted (say, by a signal handler that raised while we waited for the
            # slot lock, or while we woke the other processes).
            if set_here:  # ours, maybe not yet woken anywhere: the next cancel() delivers
                self.is_cancelled = True
                self._undelivered = True
            else:  # not ours (or not set): whoever delivers here may take it, or retry
                if self._flag:
                    self.is_cancelled = True
                self._once.append(None)
            raise
        if won:
            self._reason = reason
        self._apply(woken=woken)
        return won

    def _write_shared_reason(self, reason: Reason) -> None:
        if reason is None:
            self._reason_len = _cell.REASON_NONE
            return
        raw = _cell.encode_reason(reason)
        ctypes.memmove(ctypes.addressof(self) + _Cell._reason_bytes.offset, raw, len(raw))
        self._reason_len = len(raw)

    def _wake_every_process(self) -> None:
        """Wake the threads blocked on this shared token, and the other processes' hubs
        (this process's other tokens on the slot get it from ``_apply``)."""
        if HAVE_FUTEX:
            futex_wake(ctypes.addressof(self))  # blocked waiters, in every process
            self._chunk.ring(own_hub=False)
        else:  # other processes first: the parking lot reaches this process's threads only
            self._chunk.ring(own_hub=False)
            futex_wake(ctypes.addressof(self))

    def _apply(self, *, remote: bool = False, woken: bool = False) -> None:
        """Deliver a cancellation to this process's waiters, exactly once.

        ``remote``: the cancel was made in another process, which has woken the waiters
        and rung the hubs of every process already; only what lives here is left to do
        (without futex, the threads parked in this process; then the callbacks).
        ``woken``: this process's :meth:`cancel` did :meth:`_wake_every_process` already.
        """
        try:
            self._applied.pop()
        except IndexError:
            return
        self._once.clear()
        aliases = False
        if remote:
            if not HAVE_FUTEX:
                futex_wake(ctypes.addressof(self))  # this process's parking lot
        elif self._is_shared():
            if not woken:
                self._wake_every_process()
            aliases = True
        elif self._blocked:
            # Only this process can see the token: skip the system call unless a thread
            # is blocked in wait_blocking(). (The GIL orders that thread's registration
            # against our flag store, so none is missed.)
            futex_wake(ctypes.addressof(self))
        self._finish()
        if aliases:  # this process's other token objects on the slot, if any
            self._chunk.deliver_slot(self._offset)

    def _finish(self) -> None:
        """Drop links and timer, then run every registered callback once."""
        finishing = self._finishing
        finishing.append(None)
        fatal: BaseException | None = None
        try:
            self._detach()
            callbacks = self._callbacks
            while callbacks:
                for ident in list(callbacks):
                    callback = callbacks.pop(ident, None)
                    if callback is not None:
                        try:
                            self._run_callback(callback)
                        except BaseException as exc:  # noqa: BLE001 - re-raised below
                            # KeyboardInterrupt or SystemExit: the others still run.
                            fatal = fatal or exc
            self._chunk.unwatch(self._id)
        finally:
            finishing.pop()
        if fatal is not None:
            raise fatal

    def _take_remote_cancel(self) -> None:
        """Deliver here a cancel that another process made, unless a ``cancel()`` of this
        process is already delivering it (then its caller runs the callbacks)."""
        try:
            self._once.pop()  # a local cancel() pops this before it sets the flag
        except IndexError:
            return
        self._apply(remote=True)

    def _run_callback(self, callback: Callable[[], object]) -> None:
        try:
            callback()
        except Exception as exc:  # noqa: BLE001 - one callback must not stop the others
            safe_log(
                "ERROR",
                f"cancel callback {callback!r} raised",
                exception=exc,
                token=self.name,
                cancel_reason=self.cancel_reason,
            )

    def _detach(self) -> None:
        """Drop links to parents and the timer: they can no longer matter."""
        links, self._links = self._links, []
        for handle in links:
            handle.remove()
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def reset(self) -> None:
        """Make the token not cancelled again. Discouraged: prefer a new token.

        Callbacks that ran are gone (register again if needed); callbacks still registered
        stay. Children and linked tokens that were already cancelled stay cancelled, and
        links to parents dropped by the cancellation are not restored; a timeout that has
        fired is not re-armed.

        Not atomic: it must not race with :meth:`cancel` on the same token. A ``cancel()``
        that lands in the middle of it (from another thread or a signal handler) may
        return ``False`` and leave the token not cancelled; it never deadlocks and never
        runs a callback twice.
        """
        if not (self._flag or self._undelivered) and self._once and self._applied:
            return  # never cancelled since it was made or last reset: nothing to undo
        self._clear_shared()
        self._reason = None
        self._undelivered = False
        self._applied = [None]
        self._once = [None]

    # -- callbacks and waiting ------------------------------------------------------------
    def on_cancel(self, callback: Callable[[], object]) -> CallbackHandle:
        """Run ``callback()`` once when the token is cancelled; at once if it already is.

        The callback runs in the thread that cancels (or, for a cancel made in another
        process, on this process's hub thread, or in a :meth:`wait_blocking` of this
        process that sees the cancel first). It should be short and must not block; a
        callback that raises is logged with the token's name and reason, and the others
        still run. Thread-safe, lock-free and signal-safe (for a shared token it may start
        the hub thread, which cannot deadlock a signal handler: see the class docstring).

        Raises:
            TypeError: ``callback`` is not callable.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        ident = next(_ids)
        callbacks = self._callbacks
        callbacks[ident] = callback
        handle = CallbackHandle(self, ident)
        if not self.is_cancelled:
            chunk = self._chunk
            if self._id not in chunk.listeners:
                chunk.watch(TokenRef(self))
            if not self.is_cancelled:  # re-read: a cancel the hub may not have seen us for
                return handle
        if callbacks.pop(ident, None) is not None:
            self._run_callback(callback)
        if self._applied and self._is_shared():  # cancelled by another process?
            self._take_remote_cancel()
        return handle

    async def wait(self) -> None:
        """Return once the token is cancelled. Works on any asyncio loop in any thread, and
        under trio (so under anyio on either).

        A cancel made in another thread, a signal handler or another process wakes this
        waiter through its own event loop's thread-safe wake-up
        (``loop.call_soon_threadsafe``, trio's ``run_sync_soon``): no polling.

        Not promised: a ``signal.signal`` handler that cancels, on the loop's own thread,
        runs only when Python gets to it, and a signal that lands just before the loop
        blocks is seen only when the loop wakes for another reason. Register such handlers
        with ``loop.add_signal_handler`` (or give ``signal.set_wakeup_fd`` a socket the loop
        reads), as for any signal handler that must wake an event loop.
        """
        if self.is_cancelled:
            return

        def when_cancelled(callback: Callable[[], object]) -> Callable[[], object]:
            return self.on_cancel(callback).remove

        from ._async import wait_for_callback  # asyncio: imported where it is used

        await wait_for_callback(when_cancelled)

    def wait_blocking(self, timeout: float | None = None) -> bool:
        """Block this thread until the token is cancelled or ``timeout`` seconds pass.

        Returns ``is_cancelled``. Works in any thread and in any process sharing the token;
        a cancel anywhere wakes it at once, event-driven: a ``futex`` on the shared flag on
        Linux; elsewhere a parked lock, and for a token shared with other processes a
        socket of its own in the token's doorbell (see the README's platform table). Do
        not call it on an event loop thread: use ``await token.wait()`` there.

        Raises:
            TypeError: ``timeout`` is not a number.
            ValueError: ``timeout`` is negative or not finite.
        """
        deadline = (
            None if timeout is None else time.monotonic() + _check_timeout(timeout, "timeout")
        )
        address = ctypes.addressof(self)
        blocked = self._blocked
        blocked.append(None)  # registered before the flag is read: see _apply
        doorbell = listening = None
        try:
            # Without futex, a cancel made in another process rings the chunk's doorbell:
            # listen to it ourselves (bound before the flag is read, so no ring is missed),
            # or, for a token not shared yet, be a listener that the hub serves if it
            # becomes so.
            if not HAVE_FUTEX:
                doorbell = self._chunk.listen() if self._is_shared() else None
                if doorbell is None:
                    listening = self.on_cancel(_nothing)
            while not self.is_cancelled:
                remaining = None
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                if doorbell is not None:
                    doorbell.wait(remaining)
                else:
                    futex_wait(address, 0, remaining)
        finally:
            blocked.pop()
            if listening is not None:
                listening.remove()
            if doorbell is not None:
                self._chunk.unlisten(doorbell)
        if self.is_cancelled and self._applied and self._is_shared():
            self._take_remote_cancel()
        return self.is_cancelled

    # -- linking ------------------------------------------------------------------------
    def child(self, *, timeout: float | None = None, name: str | None = None) -> CancellationToken:
        """A new token cancelled (with this token's reason) whenever this one is."""
        return CancellationToken.linked(self, timeout=timeout, name=name)

    @classmethod
    def linked(
        cls, *tokens: CancellationToken, timeout: float | None = None, name: str | None = None
    ) -> CancellationToken:
        """A new token cancelled as soon as any of ``tokens`` is (with that one's reason).

        The new token holds its sources weakly in the other direction: the sources keep
        one small callback each, removed when the new token is cancelled, closed or
        collected.

        Raises:
            TypeError: an argument is not a :class:`CancellationToken`.
        """
        for index, source in enumerate(tokens):
            if not isinstance(source, CancellationToken):
                raise TypeError(
                    f"tokens[{index}] must be a CancellationToken, not {type(source).__name__}"
                )
        new = cls(timeout=timeout, name=name)
        ref = weakref.ref(new)
        for source in tokens:
            new._links.append(source.on_cancel(_Propagate(ref, source)))
            if new.is_cancelled:
                break
        return new

    def _arm_timer(self, seconds: float) -> None:
        ref = weakref.ref(self)
        reason = f"timeout after {seconds:g}s"

        def fire() -> None:
            token = ref()
            if token is not None:
                token.cancel(reason)

        self._timer = _timer.call_at(time.monotonic() + seconds, fire)

    def close(self) -> None:
        """Drop this token's links to its parents and its timer; it is then never
        cancelled by them. Idempotent. The token itself stays usable."""
        self._detach()

    def remote(self, partial_sink: Callable[[str, Any], None] | None = None) -> RemoteToken:
        """A picklable handle on this token for processes cancelflow did not start.

        Send it to a worker of your own ``ProcessPoolExecutor``, ``multiprocessing.Pool``
        or loky (as an argument, or through any queue): there ``handle.is_cancelled`` is
        a local read that turns true the moment this token is cancelled (pushed by a small
        server in this process, no polling), ``handle.cancel()`` cancels this token and
        ``handle.store_partial(key, value)`` calls ``partial_sink(key, value)`` here (on
        the server's thread: make it quick and thread-safe). ``handle.close()`` here ends
        the sharing, and so does dropping both this token and the handle (the handles
        elsewhere then report the owner gone). The library's own pools do not need it
        (they share the token itself, faster). See :class:`cancelflow.RemoteToken` for
        the guarantees.

        Raises:
            TypeError: ``partial_sink`` is not callable.
        """
        from ._remote import make_remote

        return make_remote(self, partial_sink)

    def __enter__(self) -> CancellationToken:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Tokens freed while another token's __del__ runs on this thread are finalized by
        # that outer __del__, one after the other, not inside each other: a free-threaded
        # build frees objects other threads dropped at any call (merging their reference
        # counts), so thousands of dropped tokens nested their finalizers until the
        # recursion limit (and the C stack) ran out. Keeping the token for the loop
        # resurrects it once; its __del__ is not called again.
        try:
            pending: list[CancellationToken] | None = getattr(_finalizing, "pending", None)
            if pending is not None:
                pending.append(self)
                return
            _finalizing.pending = pending = []
        except Exception:  # noqa: BLE001 - interpreter shutdown
            self._finalize()
            return
        try:
            self._finalize()
            while pending:
                pending.pop()._finalize()
        finally:
            _finalizing.pending = None

    def _finalize(self) -> None:
        """Give back what the token holds (its registry entry, links, slot)."""
        try:
            _local_tokens.pop(getattr(self, "_id", 0), None)
        except Exception:  # noqa: BLE001 - interpreter shutdown: the registry is gone
            pass
        try:
            self._detach()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
        try:
            self._chunk.release(
                self._offset, reusable=not self._is_shared(), key=getattr(self, "_id", None)
            )
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- pickling -------------------------------------------------------------------------
    def __reduce__(self) -> tuple[Any, ...]:
        if not TOKENS_CROSS_PROCESSES:
            raise TypeError(
                "a CancellationToken cannot be sent to another process on this platform "
                "(no fork, no descriptor passing): send token.remote() instead"
            )
        if multiprocessing.context.get_spawning_popen() is None:
            raise TypeError(
                "a CancellationToken can be sent to a process only when that process starts "
                "(multiprocessing.Process args, any start method) or through cancelflow's "
                "pools; it cannot travel through a queue or pipe to a running process"
            )
        self._export()
        return (
            _rebuild_token,
            (_SharedChunk.for_current_start(self._chunk), self._offset, self.name),
        )

    def _export(self) -> None:
        """Another process gets this token (it is being pickled for a process start):
        from now on it is shared, for good."""
        chunk = self._chunk
        self._exported = True
        self._share()
        if self.is_cancelled and self._reason is not None:
            # Cancelled while only this process could see it (the reason was kept locally).
            self._write_shared_reason(self._reason)
        chunk.mark_shared()
        if self._id in chunk.listeners:
            chunk.ensure_hub()  # its callbacks now hear of cancels made over there

    def __repr__(self) -> str:
        state = f"cancelled, reason={self.cancel_reason!r}" if self.is_cancelled else "active"
        return f"<CancellationToken {self.name} {state}>"


#: Tokens of this process that no other process can see yet, by ``_id``: their
#: ``is_cancelled`` is a slot until :meth:`CancellationToken._share` (a fork
#: shares them all).
_local_tokens: dict[int, weakref.ref[CancellationToken]] = {}
#: held while a token registers in ``_local_tokens``, and from just before a fork until
#: it is over (see _before_fork)
_registering = threading.RLock()
#: per thread: the tokens whose finalization waits for the __del__ running there
_finalizing = threading.local()
#: token class -> its shared twin (``_shared_twin``)
_twins: dict[type[CancellationToken], type[CancellationToken]] = {}


def _shared_twin(kind: type[_T]) -> type[_T]:
    """The class a token of class ``kind`` takes once another process may see it: one
    whose ``is_cancelled`` is the shared flag (the ctypes field) instead of the local copy.

    For cancelflow's own token classes (``_has_twin`` in their body) that is a twin: a
    subclass with the same name and layout, so ``__class__`` can switch in place and
    ``isinstance(token, kind)`` holds for both. A user's subclass gets no twin (making a
    subclass of it would run its ``__init_subclass__``, which may want keywords or record
    every subclass, and would keep a class made at run time alive for good): ``kind``
    itself reads the shared flag from then on, for all its instances. That is a little
    slower for its tokens that no other process sees, and still true for them, since
    every cancel writes the shared flag first.
    """
    if kind._shared_view:
        return kind
    twin = _twins.get(kind)
    if twin is not None:
        return twin  # type: ignore[return-value]
    if not kind.__dict__.get("_has_twin", False):
        kind.is_cancelled = _Cell._flag  # type: ignore[assignment]
        kind._shared_view = True
        return kind
    body = {
        "is_cancelled": _Cell._flag,
        "_shared_view": True,
        "__module__": kind.__module__,
        "__qualname__": kind.__qualname__,
        "__doc__": kind.__doc__,
    }
    metaclass: Any = type(kind)  # ctypes' structure metaclass
    return _twins.setdefault(kind, metaclass(kind.__name__, (kind,), body))  # type: ignore[return-value]


def _share_every_token() -> None:
    """Around a fork: every token alive may be seen by the child (and the child's by the
    parent); their ``is_cancelled`` reads the shared flag from now on."""
    interrupted: BaseException | None = None
    pending = list(_local_tokens.values())
    while pending:
        try:
            while pending:
                token = pending[-1]()
                if token is not None:
                    with contextlib.suppress(Exception):  # one must not stop the others
                        token._share()  # idempotent: retried if interrupted
                pending.pop()
        except BaseException as exc:  # noqa: BLE001 - a KeyboardInterrupt: finish first
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def _before_fork() -> None:
    # No token is registered from here until the fork is over: every token the child
    # finds is shared already, and the child assigns no ``__class__`` (on a free-threaded
    # build that stops the world, whose lock another thread of the parent may have held
    # at the fork: the child would hang). A token made meanwhile shares itself once
    # registered (see __init__).
    _registering.acquire()
    _share_every_token()


def _after_fork_in_parent() -> None:
    try:
        _share_every_token()
    finally:
        _registering.release()


def _after_fork_in_child() -> None:
    global _registering
    _registering = threading.RLock()
    _share_every_token()  # (finds nothing to switch but what another hook made meanwhile)


at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


# ``__new__`` takes ``*args, **kwargs`` (it only places the token in shared memory), which is
# what inspect, and so help() and IDEs, would show: show ``__init__``'s real signature.
_init = inspect.signature(CancellationToken.__init__)
CancellationToken.__signature__ = _init.replace(  # type: ignore[attr-defined]
    parameters=list(_init.parameters.values())[1:], return_annotation=inspect.Signature.empty
)
del _init


class TokenRef(weakref.ref["CancellationToken"]):
    """A weak reference to a token that has listeners, as its chunk keeps it.

    Package-internal: for ``_cell``, whose hub delivers cancels made by other processes
    and must not reach into the token to do it (nor import this module, which builds on
    ``_cell``). Every method is a no-op (or ``False``) once the token is gone.
    """

    __slots__ = ("key", "offset")

    key: int  #: the token's ``_id``: its key in ``Chunk.listeners``
    offset: int  #: the token's slot in its chunk

    def __new__(cls, token: CancellationToken) -> TokenRef:
        self = super().__new__(cls, token)
        self.key = token._id
        self.offset = token._offset
        return self

    def shared(self) -> bool:
        """Whether the token lives and another process may cancel it (see ``_is_shared``)."""
        token = self()
        return token is not None and token._is_shared()

    def take_remote_cancel(self) -> None:
        """Deliver a cancel that another process made to this process's callbacks."""
        token = self()
        if token is not None:
            token._take_remote_cancel()

    def drop_callbacks(self) -> None:
        """In a forked child: forget the callbacks inherited from the parent (they are the
        parent's, and run there)."""
        token = self()
        if token is not None:
            token._callbacks.clear()


class _Propagate:
    """Callback on a source token that cancels a linked token, held weakly."""

    __slots__ = ("_source", "_target")

    def __init__(self, target: weakref.ref[CancellationToken], source: CancellationToken) -> None:
        self._target = target
        self._source = weakref.ref(source)

    def __call__(self) -> None:
        target = self._target()
        source = self._source()
        if target is not None:
            target.cancel(source.cancel_reason if source is not None else None)

    def __repr__(self) -> str:
        return "<linked-token propagation>"


class _SharedChunk:
    """A chunk as it travels to a starting process: its descriptor, sent once.

    All tokens of one chunk given to one process start share one instance, which pickle
    memoizes, so the descriptor is handed over (``DupFd``) once however many tokens go
    along: spawn refuses the same descriptor twice in its list of inherited ones.
    """

    __slots__ = ("__weakref__", "_dupfd")

    def __init__(self, dupfd: Any) -> None:
        self._dupfd = dupfd

    @classmethod
    def for_current_start(cls, chunk: _cell.Chunk) -> _SharedChunk:
        popen = multiprocessing.context.get_spawning_popen()
        cached = chunk.exported_to
        if cached is not None and cached[0]() is popen:
            alive = cached[1]()
            if isinstance(alive, _SharedChunk):
                return alive
        shared = cls(multiprocessing.reduction.DupFd(chunk.fd))
        try:
            chunk.exported_to = (weakref.ref(popen), weakref.ref(shared))
        except TypeError:  # a Popen without weakref support: no sharing, still correct
            chunk.exported_to = None
        return shared

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach_chunk, (self._dupfd,))


def _attach_chunk(dupfd: Any) -> _cell.Chunk:
    return _cell.attach_chunk(dupfd.detach())


def _nothing() -> None:
    pass


_T = TypeVar("_T", bound=CancellationToken)


@overload
def token_on_slot(
    chunk: _cell.Chunk, offset: int, name: str | None = None
) -> CancellationToken: ...
@overload
def token_on_slot(
    chunk: _cell.Chunk, offset: int, name: str | None = None, *, kind: type[_T]
) -> _T: ...
def token_on_slot(
    chunk: _cell.Chunk,
    offset: int,
    name: str | None = None,
    *,
    kind: type[CancellationToken] = CancellationToken,
) -> CancellationToken:
    """Package-internal: a token (of class ``kind``) over the existing slot at ``offset``
    of ``chunk``: another process's token, or a pool's task slot. Cancelling either
    view is seen by both, in every process that maps the chunk."""
    return kind._on_slot(chunk, offset, name)


def _rebuild_token(chunk: _cell.Chunk, offset: int, name: str) -> CancellationToken:
    return token_on_slot(chunk, offset, name)
