"""How a task or a node ended: the one vocabulary every layer uses."""

from __future__ import annotations

import enum

__all__ = ("Fate",)


class Fate(enum.StrEnum):
    """How a task (a pool's ``future.fate``) or a pipeline node (``node_fates``) ended.

    A :class:`str` enum: every member equals its value (``Fate.KILLED == "killed"``),
    formats, prints (also inside a ``dict``: its ``repr`` is the value's) and serialises to
    JSON as that value, so code written when fates were plain strings keeps working.

    Which members a source can report:

    - thread pool tasks: ``pending``, ``running``, ``finished``, ``failed``,
      ``cancelled``, ``abandoned``;
    - process pool tasks: ``pending``, ``running``, ``finished``, ``failed``,
      ``cancelled``, ``terminated``, ``killed``, ``crashed``;
    - pipeline nodes: the ended ones of both, plus ``timed_out``.
    """

    #: queued, not started
    PENDING = "pending"
    #: a worker is running it
    RUNNING = "running"
    #: returned a value
    FINISHED = "finished"
    #: raised (its own exception, or the pool could not run or read it)
    FAILED = "failed"
    #: stopped by its token (it returned or raised after the cancel, or never started)
    CANCELLED = "cancelled"
    #: stopped by SIGTERM (its ``finally`` blocks ran)
    TERMINATED = "terminated"
    #: its process and every process it started were killed
    KILLED = "killed"
    #: its worker died without being asked to
    CRASHED = "crashed"
    #: a thread that ignored its token past the grace period, left running
    ABANDONED = "abandoned"
    #: a pipeline node stopped by its own ``timeout``
    TIMED_OUT = "timed_out"

    def __repr__(self) -> str:
        return repr(self.value)

    @property
    def ended(self) -> bool:
        """Whether this fate is final (anything but ``pending`` and ``running``)."""
        return self not in (Fate.PENDING, Fate.RUNNING)
