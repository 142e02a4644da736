"""cancelflow's process pool, one module per piece, read top to bottom:

* ``_pool``: :class:`ProcessPool`, the public API (argument checks, pickling a task,
  ``submit``/``map``/``run_sync``/``shutdown``); it owns one supervisor;
* ``_pickling``: how a call travels to a worker: by reference (plain pickle) when it
  can, by value (cloudpickle) for lambdas, closures and anything of ``__main__``;
* ``_task``: :class:`TaskFuture` and the supervisor's record of a task;
* ``_supervisor``: the pool's one thread — typed commands in, a ``selectors`` loop over
  worker sockets, pidfds and the zygote's channel, dispatch, the stop ladder, endings;
* ``_protocol``: every message between the processes (typed, builtins on the wire) and
  the shared-memory control block;
* ``_channel``: length-prefixed frames on a worker's socket;
* ``_zygote``: starting the zygote (in the parent) and the zygote itself;
* ``_worker``: a worker process: runs one task at a time and cleans up after it.

The one kill sequence is :func:`cancelflow._platform.kill_tree`.
"""

from __future__ import annotations

from ._pickling import dump_by_value
from ._pool import ProcessPool, ProcessPoolStatistics
from ._task import TaskFuture

__all__ = ("ProcessPool", "ProcessPoolStatistics", "TaskFuture", "dump_by_value")
