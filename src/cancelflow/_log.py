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

**loguru is imported only when something else imports it.** A record logged in a
process where loguru was never imported could reach no sink, so :func:`safe_log` drops
it without importing loguru (a pool's workers, and a program that never configures
logging, do not carry loguru and asyncio, which it imports: a worker forked from a
zygote that does is slower to start and to kill). The rule above still holds as if
loguru had been imported with cancelflow: when loguru is imported later, by anyone,
``cancelflow`` is disabled right after loguru's own module runs, before the importer
can call ``enable`` (a hook first on ``sys.meta_path`` until then; a ``find_spec`` that
imports nothing leaves it in place). A ``loguru.logger`` that cancelflow has not seen
yet (loguru imported past the hook: a finder before it, ``sys.meta_path`` put back as
it was; or a new one made by ``importlib.reload(loguru)``) is adopted at cancelflow's
next record: ``cancelflow`` disabled there, unless loguru's activation list already
says something about it or about every library (``enable("")`` leaves nothing there:
not seen), keeping what it says about cancelflow's modules.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
import threading
import traceback
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from importlib.abc import Loader

    from loguru import Logger, Message

__all__ = ("log_to_logging", "safe_log")

_LOGURU = "loguru"
_root: Logger | None = None  # the loguru logger cancelflow logs through ...
_bound: Logger | None = None  # ... with cancelflow=True bound
_searching = threading.local()  # the finder below is looking for loguru's spec


def _adopt(loguru: types.ModuleType, *, first: bool) -> None:
    """Log through ``loguru.logger`` from now on, with ``cancelflow`` disabled there as
    loguru's rule for libraries asks, as if that had happened when cancelflow was
    imported: ``first`` (loguru's module just ran, or cancelflow is being imported), or
    else (loguru imported past the hook, or reloaded) unless its activation list already
    says something about cancelflow or every library; what it says about cancelflow's
    modules (``enable("cancelflow._registry")``) is kept."""
    global _root, _bound
    logger = loguru.logger
    try:
        entries = list(logger._core.activation_list)
    except Exception:  # noqa: BLE001 - another loguru: nothing known
        entries = []
    if first or not any("cancelflow.".startswith(name) for name, _ in entries):
        logger.disable("cancelflow")  # (drops the entries of cancelflow's modules)
        for name, enabled in sorted(entries, key=lambda entry: entry[0].count(".")):
            if name.startswith("cancelflow.") and name != "cancelflow.":
                (logger.enable if enabled else logger.disable)(name[:-1])
    _root = logger
    _bound = logger.bind(cancelflow=True)


class _SilenceOnImport:
    """First on ``sys.meta_path`` until loguru's module has run: it gives loguru's spec
    (as the finders after it find it) a loader that runs :func:`_adopt` right after
    loguru's module, whoever imports it. A search that imports nothing (``find_spec``)
    changes nothing."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _LOGURU or getattr(_searching, "active", False):
            return None
        _searching.active = True
        try:
            spec = importlib.util.find_spec(fullname)  # what the other finders find
        finally:
            _searching.active = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = cast("Loader", _Silencing(spec.loader))
        return spec


class _Silencing:
    """loguru's own loader, then :func:`_adopt`; anything else a loader answers (its
    data, its source) is loguru's own loader's."""

    running = False  # loguru's module is running: the adoption comes right after

    def __init__(self, loader: Loader) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        # What loguru's module sees of its loader is its own one.
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        _Silencing.running = True
        try:
            self.loader.exec_module(module)
            _adopt(module, first=True)
        finally:
            _Silencing.running = False
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(_finder)


_finder = _SilenceOnImport()
if sys.modules.get(_LOGURU) is not None:
    _adopt(sys.modules[_LOGURU], first=True)
else:
    sys.meta_path.insert(0, _finder)


def _logger() -> Logger | None:
    """cancelflow's bound logger, or None while loguru is not imported (no sink can
    exist) or its module is running. Follows ``loguru.logger``: one imported past the
    hook, or made anew by a reload, is adopted at the first record."""
    loguru = sys.modules.get(_LOGURU)
    if loguru is None:
        return None
    logger = getattr(loguru, "logger", None)
    if logger is None or _Silencing.running:
        return None
    if logger is not _root:
        _adopt(loguru, first=False)
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(_finder)
    return _bound


def safe_log(
    level: str, message: str, *, exception: BaseException | None = None, **ids: Any
) -> None:
    """Log ``message`` at ``level`` with ``ids`` bound, as its caller's line; never raises.

    With ``exception``, the record carries the exception without its frames, and the
    message ends with its formatted traceback (no local variables).
    """
    logger = _logger()
    if logger is None:
        return
    try:
        if exception is None:
            logger.bind(**ids).opt(depth=1).log(level, message)
            return
        text = "".join(traceback.format_exception(exception)).rstrip()
        bound = logger.bind(**ids).opt(depth=1, exception=(type(exception), exception, None))
        bound.log(level, f"{message}\n{text}")
    except Exception:  # noqa: BLE001 - a log line must never break a cancellation
        pass


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

    import logging

    import loguru  # noqa: F401 - cancelflow adopts it here if nothing imported it yet

    _logger()  # (a loguru reloaded since the last record: the one to send from)
    root = _root
    assert root is not None

    # attribute names of a LogRecord, which bound ids may not overwrite
    reserved = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

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
        extra = {k: v for k, v in record["extra"].items() if k not in reserved}
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

    sink_id = root.add(
        forward,
        level=level,
        format="{message}",
        filter=lambda record: bool(record["extra"].get("cancelflow")),
        catch=True,
    )
    root.enable("cancelflow")
    return sink_id
