"""How a call travels to a worker process: by reference when it can, by value when not.

:func:`dump_call` pickles ``(fn, args, kwargs)`` for a worker:

* **By reference** (plain :mod:`pickle`, the fast path, a few µs): a function, class or
  object that the worker finds by importing its module. Chosen whenever plain pickle
  succeeds and the pickle names nothing in ``__main__``.
* **By value** (:mod:`cloudpickle`): lambdas, closures, functions defined inside other
  functions, and anything defined in the program's ``__main__`` — which the worker
  cannot import when the program is a REPL, a notebook, ``python -c``/``python -`` or
  code under ``if __name__ == "__main__":``. The code and the globals it uses travel in
  the pickle; the worker unpickles it with plain :mod:`pickle` (cloudpickle's
  reconstructors are importable there: same interpreter, same environment). A function
  sent by value again, its state unchanged, reuses its pickle, and the worker the
  function it unpickled (:mod:`._sent_functions`): the rest of the call goes by
  reference.

Both paths keep the task's own token out of the pickle (a persistent id the worker
replaces by its view of the token); any other token is refused with a message that says
what to use instead.
"""

from __future__ import annotations

import functools
import io
import pickle
import types
from collections.abc import Callable
from typing import Any

from .._token import CancellationToken
from ._protocol import TASK_TOKEN_ID
from ._sent_functions import dump_with_sent_function

__all__ = (
    "dump_by_value",
    "dump_call",
    "dump_result",
    "main_attribute",
    "prepare_by_value",
    "unpicklable_part",
)

_MAIN = b"__main__"
_FUNCTION = types.FunctionType


def _token_id(obj: Any, tokens: tuple[CancellationToken, ...]) -> str | None:
    if isinstance(obj, CancellationToken):
        if any(obj is t for t in tokens):
            return TASK_TOKEN_ID
        raise TypeError(
            "only the task's own token (the token= argument) can be sent to a process "
            "worker; inside the task use cancelflow.current_token()"
        )
    return None


class _TaskPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, tokens: tuple[CancellationToken, ...]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._tokens = tokens

    def persistent_id(self, obj: Any) -> Any:
        return _token_id(obj, self._tokens)


_MakePickler = Callable[[io.BytesIO, tuple[CancellationToken, ...]], pickle.Pickler]


@functools.cache
def _by_value_picklers() -> tuple[_MakePickler, _MakePickler]:
    """cloudpickle's Pickler refusing every token, and the same keeping the task's own
    token out as a persistent id; made once (cloudpickle is imported the first time
    something travels by value).

    The first is for a call without a token: a persistent id hook is called for every
    object pickled (about 70 for a small call, a third of the pickling time), while
    ``reducer_override`` is not called for builtin values (ints, strings, tuples...).
    """
    import cloudpickle

    class _WithTokens(cloudpickle.Pickler):  # type: ignore[misc]
        def __init__(self, file: io.BytesIO, tokens: tuple[CancellationToken, ...]) -> None:
            super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
            self._tokens = tokens

        def persistent_id(self, obj: Any) -> Any:
            return _token_id(obj, self._tokens)

    class _WithoutTokens(cloudpickle.Pickler):  # type: ignore[misc]
        def __init__(self, file: io.BytesIO, tokens: tuple[CancellationToken, ...]) -> None:
            super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, CancellationToken):
                _token_id(obj, ())  # raises
            return super().reducer_override(obj)

    return _WithoutTokens, _WithTokens


def prepare_by_value() -> None:
    """Import what sending by value needs (cloudpickle) now, not on the first call sent
    by value: a submit from a signal handler landing in that import would find it half
    done."""
    _by_value_picklers()


def dump_by_value(obj: Any, tokens: tuple[CancellationToken, ...] = ()) -> bytes:
    """Pickle ``obj`` with cloudpickle (functions and classes of ``__main__``, lambdas
    and closures by value), keeping ``tokens`` out as the task-token persistent id."""
    buffer = io.BytesIO()
    _by_value_picklers()[1 if tokens else 0](buffer, tokens).dump(obj)
    return buffer.getvalue()


def dump_call(call: Any, token: CancellationToken | None) -> bytes:
    """Pickle ``call`` for a worker: by reference when plain pickle works and names
    nothing in ``__main__``, else by value (see the module).

    Raises whatever both picklers raise for a part that cannot travel at all (a lock, an
    open file, a token other than ``token``).
    """
    tokens = (token,) if token is not None else ()
    fn = call[0]
    if type(fn) is _FUNCTION and (fn.__module__ == "__main__" or "<" in fn.__qualname__):
        # The function's kept pickle, the rest by reference (see _sent_functions).
        payload = dump_with_sent_function(call, lambda obj: _dump_plain(obj, tokens), dump_by_value)
        if payload is not None:
            return payload
    try:
        payload = _dump_plain(call, tokens)
    except (pickle.PicklingError, AttributeError, TypeError):
        return dump_by_value(call, tokens)  # a lambda, a closure, a local class...
    if _MAIN in payload:
        return dump_by_value(call, tokens)  # the worker may not find it in its __main__
    return payload


def _dump_plain(obj: Any, tokens: tuple[CancellationToken, ...]) -> bytes:
    """Plain pickle (the fast path), with the task's token as the task-token reference."""
    try:  # nothing in the call needs translating
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except TypeError:
        if not tokens:
            raise
    buffer = io.BytesIO()
    _TaskPickler(buffer, tokens).dump(obj)
    return buffer.getvalue()


def main_attribute(qualname: str) -> Any:
    """``__main__``'s object named ``qualname`` (``"Point"``, ``"Outer.Inner"``), in the
    process that unpickles: how a worker sends an object of a ``__main__`` class back."""
    import sys

    obj: Any = sys.modules["__main__"]
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _MainByName(pickle.Pickler):
    """Pickles every class and function of ``__main__`` by its name there, unchecked.

    A task sent by value brings copies of the ``__main__`` classes it uses (see the
    module): in the worker they are not the objects its own ``__main__`` holds under
    those names, so plain pickle refuses a value or exception of such a class ("not the
    same object"). Named, they resolve to the caller's own classes in the parent (as
    with ``ProcessPoolExecutor``, where they travel by reference both ways), so
    ``except MyError`` and ``isinstance`` work there. Not for local classes
    (``<locals>`` in the name), nor for classes nested in a class (cloudpickle rebuilds
    them without their qualified name): the parent cannot find those, and the task fails
    with :class:`~cancelflow.UnreadableResultError`.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type | _FUNCTION) and getattr(obj, "__module__", None) == "__main__":
            qualname = getattr(obj, "__qualname__", "")
            if qualname and "<locals>" not in qualname:
                return main_attribute, (qualname,)
        return NotImplemented


def dump_result(value: Any) -> bytes:
    """Pickle a task's value, exception or partial result in the worker: plain pickle,
    or, when that refuses a ``__main__`` class that travelled by value, naming
    ``__main__``'s classes (:class:`_MainByName`)."""
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except pickle.PicklingError as exc:
        if "__main__" not in str(exc):
            raise
    buffer = io.BytesIO()
    _MainByName(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def unpicklable_part(call: tuple[Any, tuple[Any, ...], dict[str, Any]], token: Any) -> str:
    """Name the part of a task that does not pickle: ``fn``, ``args[i]`` or ``kwargs[k]``."""
    fn, args, kwargs = call
    parts = [("fn", fn)]
    parts += [(f"args[{index}]", value) for index, value in enumerate(args)]
    parts += [(f"kwargs[{key!r}]", value) for key, value in kwargs.items()]
    tokens = (token,) if token is not None else ()
    for name, value in parts:
        try:
            dump_by_value(value, tokens)
        except Exception:  # noqa: BLE001 - this is the part that does not pickle
            return name
    return "the task"
