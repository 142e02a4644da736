"""``--dask local``: a ``LocalCluster`` on 127.0.0.1 for the demo, and Dask's loggers kept quiet."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

from .settings import DASK_LOCAL_WORKERS, DASK_PATIENCE


def start_local_cluster() -> Any:
    """A ``LocalCluster`` of worker processes bound to 127.0.0.1 only (dashboard included)."""
    import dask
    import distributed

    # Ctrl-C in a terminal signals the whole foreground process group. The cluster's
    # processes must not die of it (the demo cancels instead): started while SIGINT is
    # ignored, they inherit that (Python keeps an ignored SIGINT ignored at start-up).
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    # cancelflow's INFO records from the workers would interleave with the demo's lines:
    # the processes started now inherit this (loguru reads it when first imported).
    level = os.environ.get("LOGURU_LEVEL")
    os.environ["LOGURU_LEVEL"] = "WARNING"
    try:
        with dask.config.set({"distributed.worker.profile.enabled": False}):
            return _local_cluster(distributed)
    finally:
        if level is None:
            os.environ.pop("LOGURU_LEVEL", None)
        else:
            os.environ["LOGURU_LEVEL"] = level
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _local_cluster(distributed: Any) -> Any:
    return distributed.LocalCluster(  # type: ignore[no-untyped-call,unused-ignore]
        processes=True,
        n_workers=DASK_LOCAL_WORKERS,
        threads_per_worker=1,
        host="127.0.0.1",
        # None would still serve HTTP, on 0.0.0.0:8787: a free port on 127.0.0.1.
        dashboard_address="127.0.0.1:0",
        worker_dashboard_address="127.0.0.1:0",
    )


def close_cluster(cluster: Any) -> None:
    with contextlib.suppress(Exception):
        cluster.close(timeout=DASK_PATIENCE)


def quiet_dask(level: str | None) -> list[tuple[logging.Logger, int]]:
    """Dask's own INFO records (cluster start and stop) would drown the demo's lines."""
    import distributed  # noqa: F401 - it sets its loggers' levels when first imported

    if level == "DEBUG":
        return []
    saved = []
    for name in ("distributed", "bokeh", "tornado"):
        log = logging.getLogger(name)
        saved.append((log, log.level))
        log.setLevel(logging.ERROR)
    return saved


def restore_loggers(saved: list[tuple[logging.Logger, int]]) -> None:
    for log, level in saved:
        log.setLevel(level)
