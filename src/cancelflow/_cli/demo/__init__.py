"""``cancelflow demo``: the whole project shown end to end in under a minute.

A report pipeline (see :mod:`cancelflow._cli.demo.nodes`) runs in four waves: simulated I/O
on the event loop, blocking work in threads, work in processes (one node checks its token;
one never does, so the pool's SIGTERM stops it and its ``finally`` runs; one starts a
helper process of its own; one ignores its token and SIGTERM, so only SIGKILL of its
process tree stops it), then a last step on the loop. While it runs the demo draws one progress bar per node (``rich`` when it is
installed and the output is a terminal, plain lines otherwise). Then it cancels the
pipeline: from a timer thread after ``--cancel-after`` seconds, on Ctrl-C, or, with
``--supersede``, by starting a newer request for the same key. Once everything has
stopped it shows the reason, the wave that was running, each node's fate, the partial
results kept, the cleanup handlers that ran, the latency it measured, and it checks that
no process or thread it started is left.

With ``--dask ADDRESS`` the same pipeline runs on a Dask ``distributed`` cluster through
:class:`~cancelflow._backends._dask.DaskRunner` (its thread and process pools); ``--dask
local`` starts a ``LocalCluster`` on 127.0.0.1 for the demo and closes it at the end, and
the final check then also covers the cluster's processes.

Exit codes: 0 the story ran to its end and nothing is left; 1 something was left
running or went wrong; 2 bad command line (or ``--dask`` without ``distributed``
installed); 130 the user interrupted the cancel with a second Ctrl-C (and nothing is left).

Modules:

* ``cli``: the command's options, and ``run``, which sets the stage and tells the story;
* ``story``: the story itself (``Demo``): the executor, its events, the cancel triggers;
* ``pipeline`` and ``nodes``: the report pipeline and its node functions (imported by
  reference in worker processes);
* ``settings``: how long the nodes work, the grace periods, the exit codes;
* ``records``: what happened, as it happened (per run, per node);
* ``pool``: the process pool that keeps each node's ``TaskFuture``;
* ``display``: live progress (rich bars or plain lines);
* ``check``: the final check that nothing the demo started is left;
* ``summary`` and ``render``: the JSON summary, and its text;
* ``cluster`` and ``census``: ``--dask``: a ``LocalCluster``, and what a run left on the
  workers.

This package's ``__init__`` imports nothing: a worker that imports ``nodes`` loads only it.
"""
