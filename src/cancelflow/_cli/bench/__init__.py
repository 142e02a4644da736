"""``cancelflow bench``: cancellation latency and overhead, cancelflow and its peers side by side.

Everything runs in one measuring process, so that ratios between systems come from the
same run on the same machine, and interleaved: each cell's samples are split into rounds
(``--rounds``, 3 by default, 1 with ``--quick``), and in each round every system of the
cell is measured in turn, in an order rotated per round, so that a loaded moment of the
machine does not land on one system only. Scenarios 1, 2, 3 (process) and 6 run as one
block per system and round, on a 1-worker pool opened for the block. Around every fill the
CPU that *other* processes used is measured (``load``); a cell is flagged noisy when it was
high, or when its rounds disagree.

A caller is what a user's code would be: a thread blocked in the system's own wait
(``future.result()``, ``AsyncResult.get()``, ``Process.join()``), or for the event-loop
peers the awaiting task, started before the cancel; it stamps when that wait returns. The
cancelling thread only stamps the cancel.

A *sample* starts when the task itself has said that it runs (a line on a FIFO, or for
cancelflow a ``store_partial`` that the pool hands over), followed by a seeded random pause
(0-100 ms, 0-20 ms with ``--quick``) so that no system's polling loop lines up with ours.
Process deaths are timed event-driven by a small watcher *process* (real-time priority
where allowed) blocked in ``poll()`` on a pidfd of each worker and grandchild: a thread of
ours would stamp the time only once it got the GIL back from whichever pool thread holds it.

Fairness: process tasks are sent as ``exec(source, params)`` and the trivial tasks are
builtins, so no system's fresh worker imports a module of ours; and the measuring process
is started as ``python -c`` (see ``cli._CHILD``), so spawn-based peers do not re-import a main
script that imports cancelflow in every new worker.

Each system is stopped the way its documentation recommends; what it cannot do is a
result ("cannot", with the reason, verified where that is possible), and a system that
cannot be imported is reported as "skipped" with the import error. After every cell the
benchmark looks for what the system left behind (child processes, threads, ``/dev/shm``
entries), reports it per system, and kills leftover processes, so that the next cell
starts clean and nothing outlives the run (``/dev/shm`` entries are reported, never
removed: on a shared machine they may be another program's).

The measuring process makes itself a child subreaper for the run: orphans of a killed
worker (a task's grandchildren) are re-parented to it, so that it can see, report, kill
and reap them; where they go does not change whether a system kills them.

Modules:

* ``cli``: the command (``cancelflow bench``; the measuring ``python -c`` process);
* ``scenarios``: what is measured (the systems, scenarios, variants and metrics), and
  one module per scenario that measures it (``scenarios.stop``, ``.coop``, ``.coroutine``,
  ``.pipeline``, ``.crash``, ``.overhead``; ``.pool_group`` runs 1, 2, 3 and 6 on one pool);
* ``systems``: the adapters, one class per system (cancelflow and every peer);
* ``plan``: which rows each cell produces, and which systems can be imported;
* ``run``: the run, cell by cell and round by round, as one JSON-able dict;
* ``harness``: the run's settings and shared state (``Bench``), the bounds it waits for;
* ``beacon``: how a task says that it runs (a FIFO) and how a peer's task is told to stop;
* ``watch``: the pid watcher process that stamps process deaths;
* ``census``: what each system left behind (processes, threads, ``/dev/shm``);
* ``load``: the background CPU load around each fill, and when a cell is noisy;
* ``results``: a row of results and its statistics;
* ``report`` and ``plot``: the text report (the goals headline first), the PNG;
* ``tasks``: the work itself, imported by reference in worker processes.

This package's ``__init__`` imports nothing: a worker that imports ``tasks`` loads only it.
"""
