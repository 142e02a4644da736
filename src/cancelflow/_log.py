"""The one way cancelflow logs: loguru, quiet until the application asks, ids bound.

Guaranteed:

* **Silent by default.** Importing cancelflow disables its records
  (``logger.disable("cancelflow")``, loguru's rule for libraries); the application turns
  them on with ``loguru.logger.enable("cancelflow")`` (or one module of it, e.g.
  ``enable("cancelflow._registry")``), or sends them to the standard library's
  :mod:`logging` with :func:`cancelflow.log_to_logging`. The library never prints and
  never adds a sink itself.
* **The real place.** Every record names the module, function and line that logged it
  (not this wrapper), so loguru's per-module ``enable``/``disable`` work.
* **Ids bound.** Every record carries ``extra["cancelflow"] = True`` plus the ids of what
  it is about (``pipeline_id``, ``node_id``, ``token``, ``worker_pid``, ``key``...).
* **No local variables.** A record about an exception carries the exception (type and
  value) and its traceback as text in the message, never the traceback's frames, so no
  sink, however configured (loguru's ``diagnose=True`` is the default of ``logger.add``),
  can render the local variables of the code that failed.

Logging can be reached from a signal handler (a ``cancel()`` that runs callbacks and
reports their errors). loguru refuses re-entrant use of a sink from the same thread with
a ``RuntimeError`` instead of deadlocking; :func:`safe_log` swallows exactly that case so
that a cancellation is never turned into a crash by its own log line.
"""

from __future__ import annotations

import logging
import traceback
from typing import TYPE_CHECKING, Any

from loguru import logger as _root

if TYPE_CHECKING:
    from loguru import Message

logger = _root.bind(cancelflow=True)
_root.disable("cancelflow")

__all__ = ("log_to_logging", "logger", "safe_log")


def safe_log(
    level: str, message: str, *, exception: BaseException | None = None, **ids: Any
) -> None:
    """Log ``message`` at ``level`` with ``ids`` bound, as its caller's line; never raises.

    With ``exception``, the record carries the exception without its frames, and the
    message ends with its formatted traceback (no local variables).
    """
    try:
        if exception is None:
            logger.bind(**ids).opt(depth=1).log(level, message)
            return
        text = "".join(traceback.format_exception(exception)).rstrip()
        bound = logger.bind(**ids).opt(depth=1, exception=(type(exception), exception, None))
        bound.log(level, f"{message}\n{text}")
    except Exception:  # noqa: BLE001 - a log line must never break a cancellation
        pass


#: attribute names of a LogRecord, which bound ids may not overwrite
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def log_to_logging(level: str | int = "DEBUG") -> int:
    """Send cancelflow's records to the standard library's :mod:`logging`, and enable them.

    Each record goes to the :class:`logging.Logger` named after the module that logged it
    (``cancelflow._registry``...), so ``logging.getLogger("cancelflow")`` configures all
    of them, with the same level, message, file, function and line, the exception (type
    and value) as ``exc_info``, and the bound ids as attributes of the
    :class:`logging.LogRecord` (``record.pipeline_id``...). Records below ``level`` are
    not sent. Other loguru sinks (loguru's default stderr one included) still receive
    cancelflow's records: remove them (``loguru.logger.remove()``) if only
    :mod:`logging` should.

    Returns the loguru sink id: ``loguru.logger.remove(sink_id)`` stops it (then
    ``loguru.logger.disable("cancelflow")`` to be silent again).
    """

    def forward(message: Message) -> None:
        record = message.record
        target = logging.getLogger(record["name"] or "cancelflow")
        number = logging.getLevelName(record["level"].name)
        if not isinstance(number, int):  # loguru's own levels (TRACE, SUCCESS)
            number = record["level"].no
        if not target.isEnabledFor(number):
            return
        error = record["exception"]
        exc_info = (error.type, error.value, None) if error is not None else None
        extra = {k: v for k, v in record["extra"].items() if k not in _RESERVED}
        log_record = target.makeRecord(
            target.name,
            number,
            record["file"].path,
            record["line"],
            record["message"],
            (),
            exc_info,  # type: ignore[arg-type]
            record["function"],
            extra,
        )
        target.handle(log_record)

    sink_id = _root.add(
        forward,
        level=level,
        format="{message}",
        filter=lambda record: bool(record["extra"].get("cancelflow")),
        catch=True,
    )
    _root.enable("cancelflow")
    return sink_id
