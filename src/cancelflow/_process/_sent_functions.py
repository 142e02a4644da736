"""Functions sent by value, pickled once: the owner's cache of their pickles, and the
worker's cache of what it unpickled.

A function of the program's ``__main__``, a lambda or a closure travels by value
(cloudpickle, see :mod:`._pickling`): its code, and the globals, defaults and closure
values it uses. Pickling that for every task costs far more than the task's trivial call
(~25 µs against ~2 µs by reference), and the worker's unpickling rebuilds the code object
each time. So :func:`dump_with_sent_function` keeps the pickle of such a function, keyed
by its code object, with its **state**: every object the pickle was made from, which the
next call compares by identity; the rest of the call goes by plain pickle.

Guarantees:

* A pickle is reused only when the function's state is the same objects: its code,
  name, qualified name, module, doc, defaults, keyword defaults, annotations,
  ``__dict__``, closure values, and the value (or absence) of every global name its code
  (or code nested in it) reads. Each of those is immutable (``None``, numbers, strings,
  bytes, tuples and frozensets of those), an imported module (with the set of imported
  modules unchanged: the pickle names the submodules the worker must import), a
  builtin, a class or function the worker imports by reference, or a function sent by
  value whose own state is checked the same way. A function that uses anything else (a
  list, a dict, an instance, a ``__main__`` class, a token) is never cached: it is
  pickled afresh every time, as before, so a change the owner made to a mutable global
  always travels.
* A function or class of a module registered with
  ``cloudpickle.register_pickle_by_value`` counts as sent by value: a function's state
  is checked the same way, a class or the module itself is never cached; an argument
  that plain pickle would name from such a module (or from ``__main__``) sends the whole
  call by value, as before.
* Each pickle made is new to the workers (:attr:`SentFunction.ident`), even when its
  bytes equal an earlier one's (a global set back to an earlier value): a worker
  unpickles it afresh.

Not guaranteed: a worker that receives the same kept pickle again reuses the function it
unpickled from it (:func:`load_sent_function`), so what a task wrote in that function's
globals or attributes is seen by the next task the same worker runs with it, as for a
function sent by reference in every pool (a model loaded once per worker into a global
stays loaded). An argument that is an object the function's pickle holds too (a tuple
default passed explicitly) arrives as a copy of its own, unless it is an argument
itself, not inside one (then the call goes whole by value).
"""

from __future__ import annotations

import itertools
import pickle
import sys
import types
from collections.abc import Callable
from typing import Any

__all__ = ("SentFunction", "dump_with_sent_function", "load_sent_function")

#: How many pickles each side keeps (the oldest is dropped first).
CACHE_SIZE = 128
#: A bigger pickle (a function whose globals hold a big constant) is not kept: it is
#: made afresh for every call, as before.
MAX_PICKLE = 64 * 1024

_FUNCTION = types.FunctionType
_MAIN = b"__main__"
_SHARED = (tuple, frozenset)
_IMMUTABLE = frozenset({type(None), bool, int, float, complex, str, bytes, range})
_ABSENT = object()  # a global name the function's module does not define
_EMPTY_CELL = object()
_BASE_GLOBALS = ("__package__", "__name__", "__path__", "__file__")

# code object -> its function's kept pickle (an empty one if too big): the owner's side
_pickles: dict[types.CodeType, SentFunction] = {}
# the owner's SentFunction.ident -> (pickle, function): the worker's side
_loaded: dict[int, tuple[bytes, Callable[..., Any]]] = {}
_idents = itertools.count(1)
# (len(sys.modules), its last key), and the object that stands for it in a state
_imports: list[Any] = [None, object()]
# code object -> the global names it (or code nested in it) reads
_names: dict[types.CodeType, tuple[str, ...]] = {}


class _Uncacheable(Exception):
    """The function's pickle depends on something mutable: it is made afresh."""


class SentFunction:
    """A function's kept by-value pickle, and what it was made from; pickled as a call of
    :func:`load_sent_function`, so that the call around it goes by plain pickle."""

    __slots__ = ("blob", "ident", "shared", "state")

    def __init__(self, state: tuple[Any, ...], blob: bytes) -> None:
        self.state = state
        self.blob = blob
        #: new for every pickle made (made again after a change, even back to bytes made
        #: before): the worker's key, so that it never reuses a function it unpickled
        #: before that change
        self.ident = next(_idents)
        #: the tuples and frozensets the pickle holds: an argument that is one of them
        #: would arrive as a copy of its own (one pickle keeps identities, two do not)
        self.shared = frozenset(id(item) for item in state if type(item) in _SHARED)

    def __reduce__(self) -> tuple[Any, ...]:
        return (load_sent_function, (self.ident, self.blob))


def load_sent_function(ident: int, blob: bytes) -> Callable[..., Any]:
    """The function pickled in ``blob`` (kept by the owner as ``ident``): unpickled once
    per process and kept."""
    kept = _loaded.get(ident)
    if kept is not None and kept[0] == blob:
        return kept[1]
    fn = pickle.loads(blob)
    _evict(_loaded)
    _loaded[ident] = (blob, fn)
    return fn  # type: ignore[no-any-return]


def dump_with_sent_function(
    call: tuple[Any, ...],
    dump_plain: Callable[[Any], bytes],
    pickle_by_value: Callable[[Any], bytes],
) -> bytes | None:
    """The pickle of ``call`` (``(fn, args[, kwargs])``, ``fn`` a plain function) with
    ``fn``'s kept by-value pickle and the rest by ``dump_plain``; ``None`` where that
    is not the same as pickling the whole call by value (do that): ``fn``'s state holds
    something mutable, its pickle is too big, or an argument is (or names) something
    that would travel by value: a ``__main__`` object, a module registered with
    ``cloudpickle.register_pickle_by_value`` or its contents, or an object ``fn``'s
    pickle holds too."""
    registered = _registered_by_value()
    sent = _sent_function(call[0], registered, pickle_by_value)
    if sent is None:
        return None
    if sent.shared:
        for part in call[1:]:
            for value in part.values() if type(part) is dict else part:
                if id(value) in sent.shared:
                    return None
    try:
        payload = dump_plain((sent, *call[1:]))
    except (pickle.PicklingError, AttributeError, TypeError):
        return None
    # A name in the arguments' part: one that plain pickle named, and the worker would
    # look up (or import) instead of receiving it by value.
    blob = sent.blob
    for name in (_MAIN, *(name.encode() for name in registered)):
        if payload.count(name) != blob.count(name):
            return None
    return payload


def _sent_function(
    fn: types.FunctionType, registered: frozenset[str], pickle_by_value: Callable[[Any], bytes]
) -> SentFunction | None:
    """``fn``'s kept pickle, made with ``pickle_by_value`` or reused (see the module);
    ``None`` if its state includes something mutable or its pickle is bigger than
    :data:`MAX_PICKLE`."""
    try:
        state = _State(registered).of(fn)
    except Exception:  # noqa: BLE001 - _Uncacheable, or an annotation that fails
        return None
    code = fn.__code__
    sent = _pickles.get(code)
    if sent is not None and _same(sent.state, state):
        return sent if sent.blob else None
    blob = pickle_by_value(fn)
    # (a big constant among its globals: not kept, in the owner or in a worker)
    sent = SentFunction(state, blob if len(blob) <= MAX_PICKLE else b"")
    _evict(_pickles)
    _pickles[code] = sent
    return sent if sent.blob else None


def _evict(cache: dict[Any, Any]) -> None:
    """Make room for one more entry in ``cache``: drop the oldest if it is full."""
    while len(cache) >= CACHE_SIZE:
        try:
            cache.pop(next(iter(cache)), None)
        except (RuntimeError, StopIteration):  # (changed by another thread meanwhile)
            return


def _same(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    if len(old) != len(new):
        return False
    for a, b in zip(old, new, strict=True):
        if a is not b:
            return False
    return True


def _registered_by_value() -> frozenset[str]:
    """The modules registered with ``cloudpickle.register_pickle_by_value``: what they
    define travels by value."""
    cloudpickle = sys.modules.get("cloudpickle")
    if cloudpickle is None:
        return frozenset()
    return frozenset(cloudpickle.list_registry_pickle_by_value())


class _State:
    """The walk that lists every object a function's by-value pickle is made from."""

    __slots__ = ("items", "registered", "seen")

    def __init__(self, registered: frozenset[str]) -> None:
        self.items: list[Any] = []
        self.registered = registered
        self.seen: set[int] = set()

    def of(self, fn: types.FunctionType) -> tuple[Any, ...]:
        """``fn``'s state, in a fixed order; raises :class:`_Uncacheable` for anything
        mutable."""
        self._add_function(fn)
        return tuple(self.items)

    def _add_function(self, fn: types.FunctionType) -> None:
        self.seen.add(id(fn))
        items = self.items
        code = fn.__code__
        g = fn.__globals__
        items += (code, g, fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__)
        items.extend(g.get(name, _ABSENT) for name in _BASE_GLOBALS)
        defaults = fn.__defaults__
        items.append(defaults)
        if defaults:
            for value in defaults:
                self._add(value)
        for mapping in (fn.__kwdefaults__, fn.__dict__, fn.__annotations__):
            items.append(len(mapping) if mapping else 0)
            if mapping:
                for key, value in mapping.items():
                    items.append(key)
                    self._add(value)
        if fn.__closure__:
            for cell in fn.__closure__:
                try:
                    value = cell.cell_contents
                except ValueError:
                    value = _EMPTY_CELL
                self._add(value)
        for name in _global_names(code):
            self._add(g.get(name, _ABSENT))

    def _add(self, value: Any) -> None:
        """Add ``value`` (and, for a function sent by value, its state), or raise
        :class:`_Uncacheable`."""
        self.items.append(value)
        kind = type(value)
        if kind in _IMMUTABLE or value is _ABSENT or value is _EMPTY_CELL:
            return
        if kind is tuple or kind is frozenset:
            for element in value:
                if type(element) not in _IMMUTABLE:
                    raise _Uncacheable
            return
        if kind is types.ModuleType:
            # (cloudpickle sends a module it cannot import, or one registered, by value)
            if sys.modules.get(value.__name__) is not value or self._registered(value):
                raise _Uncacheable
            # (the pickle imports in the worker the submodules imported here by now)
            self.items.append(_imports_seen())
            return
        if kind is types.BuiltinFunctionType:
            if value.__self__ is None or type(value.__self__) is types.ModuleType:
                return
            raise _Uncacheable
        if kind is _FUNCTION:
            if self._by_reference(value):
                return
            if id(value) not in self.seen:
                self._add_function(value)
            return
        if isinstance(value, type) and self._by_reference(value):
            return
        raise _Uncacheable

    def _registered(self, module: Any) -> bool:
        """Whether ``module`` (a module or a module's name) or a package it is in is
        registered to travel by value."""
        if not self.registered:
            return False
        name = module if isinstance(module, str) else module.__name__
        while name:
            if name in self.registered:
                return True
            name = name.rpartition(".")[0]
        return False

    def _by_reference(self, obj: Any) -> bool:
        """Whether cloudpickle names ``obj`` (the worker imports it): its module is
        imported, not ``__main__`` and not registered by value, and its qualified name
        there leads to it."""
        module_name = getattr(obj, "__module__", None)
        if module_name == "__main__" or module_name is None or self._registered(module_name):
            return False
        found: Any = sys.modules.get(module_name)
        for part in getattr(obj, "__qualname__", "<").split("."):
            found = getattr(found, part, None)
        return found is obj


def _imports_seen() -> object:
    """An object that stays the same while no module is imported (compared by identity,
    as the rest of the state): it changes with the number of modules and the last one
    imported."""
    modules = sys.modules
    seen = (len(modules), next(reversed(modules), None))
    if _imports[0] != seen:
        _imports[:] = [seen, object()]
    return _imports[1]


def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """Every name ``code`` and the code nested in it read (a superset of the globals
    cloudpickle sends: attribute names too)."""
    names = _names.get(code)
    if names is None:
        found = dict.fromkeys(code.co_names)
        for const in code.co_consts:
            if type(const) is types.CodeType:
                found.update(dict.fromkeys(_global_names(const)))
        if len(_names) >= 4 * CACHE_SIZE:
            _names.clear()
        names = _names[code] = tuple(found)
    return names
