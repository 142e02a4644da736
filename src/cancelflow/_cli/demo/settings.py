"""The demo's fixed settings: how long the nodes work, the cancel's timing and grace
periods, the Dask cluster's size and patience, the exit codes.
"""

from __future__ import annotations

from collections.abc import Mapping

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: How long the nodes of the full request and of the quick (superseding) one work.
FULL_WORK: Mapping[str, float] = {
    "io_seconds": 0.5,
    "cpu_seconds": 8.0,
    "render_seconds": 1.8,
    "archive_seconds": 8.0,
}
QUICK_WORK: Mapping[str, float] = {
    "io_seconds": 0.1,
    "cpu_seconds": 0.3,
    "render_seconds": 0.2,
    "archive_seconds": 0.3,
}
#: Without --cancel-after the cancel comes this long after the CPU wave started.
DEFAULT_CANCEL_INTO_CPU_WAVE = 1.0
DEFAULT_GRACE = 2.0
#: The process pool's stop ladder in the demo: the token; SIGTERM PROCESS_GRACE seconds
#: later (the worker turns it into an exception in the node, so its finally blocks run);
#: SIGKILL of the worker and its process tree TERM_GRACE seconds after that. The order of
#: the three fates in the story (cancelled, terminated, killed) follows from the ladder:
#: a node that checks its token stops within milliseconds, far inside PROCESS_GRACE; a
#: node whose SIGTERM became an exception is done (its finally ran, its result is in)
#: within milliseconds too, far inside TERM_GRACE, and the node that ignores SIGTERM
#: cannot end before TERM_GRACE has passed.
PROCESS_GRACE = 0.3
TERM_GRACE = 0.5
#: One worker per node of the process wave, so that all of them run at once.
PROCESS_WORKERS = 4
THREAD_GRACE = 0.5
SUPERSEDE_KEY = "report:alice"
#: ``--dask local``: one worker process (of one thread) per node of the process wave, so
#: that all four run at once, as with the demo's own process pool.
DASK_LOCAL_WORKERS = 4
#: Seconds to wait for a Dask cluster's workers (and for ``--dask local`` to close).
DASK_PATIENCE = 60.0
#: Threads that ``distributed`` starts once per interpreter and never ends (its offload
#: executor): not the demo's to stop, so the final check does not count them.
DASK_PROCESS_WIDE_THREADS = ("Dask-Offload",)
NO_PROCESS_POOLS = (
    "cancelflow demo: the story runs process nodes, and cancelflow's process pool does "
    "not run on this platform ({platform}); tokens, ThreadPool, to_thread and pipelines of "
    "loop and thread nodes do (see the README's platform table), and --dask ADDRESS runs "
    "the demo on a cluster whose workers run a process pool"
)
DASK_MISSING = (
    "cancelflow demo --dask needs Dask distributed, which is not installed: "
    "pip install 'cancelflow[dask]'"
)
