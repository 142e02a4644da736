"""The one way cancelflow logs: loguru, with the ids of what is being talked about bound.

Every record carries ``extra["cancelflow"] = True`` plus whatever ids the caller binds
(``pipeline_id``, ``node_id``, ``token``, ``worker_pid``). The library never prints and
never adds a sink; applications configure loguru as usual, and can silence the library
with ``loguru.logger.disable("cancelflow")``.

Logging can be reached from a signal handler (a ``cancel()`` that runs callbacks and
reports their errors). loguru refuses re-entrant use of a sink from the same thread with
a ``RuntimeError`` instead of deadlocking; :func:`safe_log` swallows exactly that case so
that a cancellation is never turned into a crash by its own log line.
"""

from __future__ import annotations

from typing import Any

from loguru import logger as _root

logger = _root.bind(cancelflow=True)

__all__ = ("logger", "safe_log")


def safe_log(
    level: str, message: str, *, exception: BaseException | None = None, **ids: Any
) -> None:
    """Log ``message`` at ``level`` with ``ids`` bound; never raises."""
    try:
        bound = logger.bind(**ids)
        if exception is not None:
            bound = bound.opt(exception=exception)
        bound.log(level, message)
    except Exception:  # noqa: BLE001 - a log line must never break a cancellation
        pass
