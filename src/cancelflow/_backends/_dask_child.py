"""What runs in the child process (or the Dask worker thread) for a Dask task.

A node sent to Dask travels as one *payload*: ``(fn, args, kwargs)`` pickled by
cloudpickle in the client, so that functions defined in ``__main__`` or in a notebook
work, while the node's token is replaced by a marker (a token cannot cross machines: the
node gets the worker's token for the same task instead). The payload is opened only where
the node runs, inside the task's scope, so a :class:`~cancelflow.NodeContext` in the
arguments is rebuilt there with that task's token and partial-result sink.

This module must stay light: the children of the per-worker pool import it, and it
imports neither ``distributed`` nor ``cloudpickle`` unless a payload needs it.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from .._context import current_token

__all__ = (
    "TOKEN_MARKER",
    "dump_payload",
    "dump_value",
    "load_payload",
    "load_value",
    "run_payload",
)

#: The persistent id that stands for "this task's token" inside a payload.
TOKEN_MARKER = "cancelflow.dask.task-token"


def dump_payload(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], token: object) -> bytes:
    """Pickle ``(fn, args, kwargs)`` with cloudpickle; ``token`` becomes a marker.

    Raises:
        TypeError: something cannot be pickled, or another CancellationToken is in the
            arguments (only the task's own token can be sent).
    """
    import cloudpickle  # type: ignore[import-untyped,import-not-found,unused-ignore]

    from .._token import CancellationToken

    class _Pickler(cloudpickle.Pickler):  # type: ignore[misc,unused-ignore]
        def persistent_id(self, obj: Any) -> Any:
            if isinstance(obj, CancellationToken):
                if token is not None and obj is token:
                    return TOKEN_MARKER
                raise TypeError(
                    "only the task's own token (the token= argument) can be sent to Dask; "
                    "inside the node use ctx.token or cancelflow.current_token()"
                )
            return None

    buffer = io.BytesIO()
    try:
        _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump((fn, tuple(args), dict(kwargs)))
    except TypeError:
        raise
    except Exception as exc:
        raise TypeError(f"the task cannot be sent to Dask: {exc}") from exc
    return buffer.getvalue()


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        if pid == TOKEN_MARKER:
            return current_token()
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def load_payload(payload: bytes) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Open a payload; must run inside the task's scope (``task_scope``)."""
    fn, args, kwargs = _Unpickler(io.BytesIO(payload)).load()
    return fn, args, kwargs


def dump_value(value: Any) -> bytes:
    """Pickle a result or partial value; cloudpickle only where plain pickle cannot
    (instances of classes from ``__main__``), so a fresh child does not import it."""
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - retried by value below
        import cloudpickle  # type: ignore[import-untyped,import-not-found,unused-ignore]

        data: bytes = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return data


def load_value(data: bytes) -> Any:
    """The inverse of :func:`dump_value`."""
    return pickle.loads(data)


def run_payload(payload: bytes) -> bytes:
    """Entry point in a pool child: open the payload, call it, return the pickled result.

    Runs inside the pool's task scope, so ``ctx.token`` and ``ctx.store_partial`` are the
    child's own. The result goes back as bytes (see :func:`dump_value`) so that values of
    classes defined in ``__main__`` survive the trip to the client.
    """
    fn, args, kwargs = load_payload(payload)
    return dump_value(fn(*args, **kwargs))
