"""Specification of how a call travels to a process worker (``_process/_pickling``): by
reference when the worker can import it, by value (cloudpickle) when it cannot — lambdas,
closures, and functions of a program's ``__main__`` (REPL, ``python -``, ``python -c``,
code under the ``__main__`` guard)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cancelflow import CancellationToken, ProcessPool, current_token
from cancelflow._process import _sent_functions
from cancelflow._process._pickling import dump_by_value, dump_call
from cancelflow._process._sent_functions import SentFunction, load_sent_function
from support import WAIT, run_script
from workloads import add


def _closure(offset: int) -> Callable[[int], int]:
    def shifted(x: int) -> int:
        return x + offset

    return shifted


class TestWhichPath:
    def test_a_module_level_function_goes_by_reference(self) -> None:
        """Test that a function the worker can import is pickled by plain pickle (the
        fast path): the same bytes, no cloudpickle in them."""
        call: tuple[Any, ...] = (add, (1, 2), {})
        payload = dump_call(call, None)
        assert payload == pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL)
        assert b"cloudpickle" not in payload

    @pytest.mark.parametrize("fn", [lambda x: x * 2, _closure(5)], ids=["lambda", "closure"])
    def test_a_lambda_or_closure_goes_by_value(self, fn: Callable[[int], int]) -> None:
        """Test that what plain pickle refuses travels by value, and loads with plain
        pickle (what the worker does)."""
        payload = dump_call((fn, (3,), {}), None)
        assert b"cloudpickle" in payload
        loaded, args, _ = pickle.loads(payload)
        assert loaded(*args) == fn(3)

    def test_the_tasks_token_stays_out_of_a_by_value_call(self) -> None:
        """Test that the task's own token inside a by-value call becomes the task-token
        reference, and that another token is refused with what to use instead."""
        token = CancellationToken()
        payload = dump_call((lambda t: t, (token,), {}), token)
        assert b"cancelflow.task-token" in payload
        with pytest.raises(TypeError, match="current_token"):
            dump_call((lambda t: t, (CancellationToken(),), {}), token)

    def test_a_by_value_call_without_a_task_token_refuses_any_token(self) -> None:
        """Test that a token inside a by-value call of a task given no token is refused
        with what to use instead (a closure over it, or an argument)."""
        other = CancellationToken()
        with pytest.raises(TypeError, match="current_token"):
            dump_call((lambda t: t, (other,), {}), None)
        with pytest.raises(TypeError, match="current_token"):
            dump_call((lambda: other.is_cancelled, (), {}), None)

    def test_what_cannot_travel_at_all_raises(self) -> None:
        """Test that a part neither pickler can send (a lock) raises."""
        with pytest.raises(TypeError):
            dump_call((add, (threading.Lock(),), {}), None)


class TestRunsInAWorker:
    def test_a_lambda_and_a_closure(self) -> None:
        """Test that a lambda and a closure run in a process worker."""
        with ProcessPool(1) as pool:
            assert pool.submit(lambda x: x * 2, 21).result(WAIT) == 42
            assert pool.submit(_closure(10), 5).result(WAIT) == 15

    def test_a_by_value_task_sees_its_token(self) -> None:
        """Test that a lambda sent with token= reads the worker's view of that token."""
        token = CancellationToken()
        with ProcessPool(1) as pool:
            future = pool.submit_task(lambda: current_token().is_cancelled, token=token)
            assert future.result(WAIT) is False


_PROGRAM = """
import sys
from cancelflow import Node, PipelineExecutor, ProcessPool
import asyncio

def double(x):
    return 2 * x

def node(ctx):
    return sum(range(10))

if __name__ == "__main__":
    def guarded(x):
        return x + 1

    with ProcessPool(1) as pool:
        print(pool.submit(double, 21).result(30), pool.submit(guarded, 1).result(30))

    async def main():
        nodes = [Node("n", node, run_in="process"), Node("l", lambda ctx: 7, run_in="process")]
        async with PipelineExecutor() as executor:
            result = await executor.run_pipeline("p", nodes)
        print(sorted(result.results.items()))

    asyncio.run(main())
"""


class TestProgramsWithoutAnImportableMain:
    def _check(self, done: subprocess.CompletedProcess[str]) -> None:
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["42 2", "[('l', 7), ('n', 45)]"], done.stderr

    def test_a_program_read_from_stdin(self) -> None:
        """Test that functions of a program run as ``python -`` (no file for the worker
        to import, as in a REPL) run in a ProcessPool and in process nodes."""
        done = subprocess.run(
            [sys.executable, "-"],
            input=textwrap.dedent(_PROGRAM),
            capture_output=True,
            text=True,
            timeout=WAIT * 2,
        )
        self._check(done)

    def test_a_program_given_with_dash_c(self) -> None:
        """Test the same for ``python -c``."""
        self._check(run_script(_PROGRAM))

    def test_a_script_whose_functions_are_under_the_main_guard(self, tmp_path: Path) -> None:
        """Test the same for a script file, whose guarded function the worker's import of
        the main module never defines."""
        self._check(run_script(_PROGRAM, path=tmp_path / "prog.py"))


def _main_functions(source: str) -> dict[str, Any]:
    """The namespace ``source`` defines as a program's ``__main__`` would (its functions
    travel by value)."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(textwrap.dedent(source), namespace)
    return namespace


def _sent(fn: Callable[..., Any]) -> SentFunction | None:
    """The kept pickle of ``fn`` (made now, or reused), ``None`` if it is not kept."""
    registered = _sent_functions._registered_by_value()
    return _sent_functions._sent_function(fn, registered, dump_by_value)  # type: ignore[arg-type]


def _run_loaded(payload: bytes) -> Any:
    """Call what ``payload`` (a call's pickle) holds, as a worker would."""
    fn, args, kwargs = pickle.loads(payload)
    return fn(*args, **kwargs)


class TestAFunctionSentAgain:
    """A function sent by value is pickled once while nothing it uses changes
    (``_process/_sent_functions``); whatever the owner changes travels."""

    def test_its_pickle_is_reused_while_nothing_it_uses_changed(self) -> None:
        """Test that the second call of a ``__main__`` function reuses the pickle (the
        same bytes object) and that the call loads with plain pickle."""
        ns = _main_functions("import math\ndef f(x, k=2):\n    return math.floor(x) * k\n")
        first = dump_call((ns["f"], (3.5,), {}), None)
        assert _sent(ns["f"]) is _sent(ns["f"])
        assert dump_call((ns["f"], (3.5,), {}), None) == first
        fn, args, kwargs = pickle.loads(first)
        assert fn(*args, **kwargs) == 6

    def test_a_global_it_reads_rebound_by_the_owner_travels(self) -> None:
        """Test that rebinding a global the function reads, here and in a helper it
        calls, changes what the worker runs."""
        ns = _main_functions(
            "FACTOR = 2\nOFFSET = 0\n"
            "def helper(x):\n    return x + OFFSET\n"
            "def f(x):\n    return helper(x) * FACTOR\n"
        )
        with ProcessPool(1) as pool:
            assert pool.submit(ns["f"], 3).result(WAIT) == 6
            ns["FACTOR"] = 3
            assert pool.submit(ns["f"], 3).result(WAIT) == 9
            ns["OFFSET"] = 1
            assert pool.submit(ns["f"], 3).result(WAIT) == 12

    def test_a_mutable_global_is_pickled_afresh_every_time(self) -> None:
        """Test that a function reading a list is never cached: the worker sees what
        the owner appended."""
        ns = _main_functions("ITEMS = [1]\ndef total():\n    return sum(ITEMS)\n")
        assert _sent(ns["total"]) is None
        with ProcessPool(1) as pool:
            assert pool.submit(ns["total"]).result(WAIT) == 1
            ns["ITEMS"].append(2)
            assert pool.submit(ns["total"]).result(WAIT) == 3

    @pytest.mark.parametrize(
        "change",
        [
            "f.__defaults__ = (5,)",
            "f.__kwdefaults__ = {'scale': 7}",
            "f.label = 'new'",
            "set_offset(9)",
            "f.__code__ = negated.__code__",
        ],
        ids=["defaults", "kwdefaults", "attribute", "closure", "code"],
    )
    def test_what_else_it_is_made_of_is_its_state(self, change: str) -> None:
        """Test that changing a default, a keyword default, an attribute, a closure's
        value or the code gives a new pickle that loads as the changed function."""
        ns = _main_functions(
            """
            def make():
                offset = 0
                def f(x=1, *, scale=1):
                    return (x + offset) * scale
                def negated(x=1, *, scale=1):
                    return -(x + offset) * scale
                def set_offset(value):
                    nonlocal offset
                    offset = value
                return f, negated, set_offset
            f, negated, set_offset = make()
            f.label = 'old'
            """
        )
        before = _sent(ns["f"])
        exec(change, ns)
        after = _sent(ns["f"])
        assert before is not None
        assert after is not None
        assert after.blob != before.blob
        fn, _, _ = pickle.loads(dump_call((ns["f"], (), {}), None))
        assert (fn(), getattr(fn, "label", None)) == (ns["f"](), getattr(ns["f"], "label", None))

    def test_a_function_redefined_under_its_name_sends_its_new_code(self) -> None:
        """Test that a REPL's redefinition of a function is what the worker runs."""
        ns = _main_functions("def f():\n    return 1\n")
        with ProcessPool(1) as pool:
            assert pool.submit(ns["f"]).result(WAIT) == 1
            exec("def f():\n    return 2\n", ns)
            assert pool.submit(ns["f"]).result(WAIT) == 2

    def test_a_worker_unpickles_a_function_it_was_sent_before_once(self) -> None:
        """Test that the same worker runs the same function object for the same pickle."""
        ns = _main_functions("import os\ndef me():\n    return os.getpid(), id(me)\n")
        with ProcessPool(1) as pool:
            first = pool.submit(ns["me"]).result(WAIT)
            assert pool.submit(ns["me"]).result(WAIT) == first

    def test_each_cache_keeps_a_bounded_number_of_pickles(self) -> None:
        """Test that many distinct functions do not grow the caches past their size."""
        for index in range(_sent_functions.CACHE_SIZE + 20):
            fn = _main_functions(f"def f():\n    return {index}\n")["f"]
            sent = _sent(fn)
            assert sent is not None
            assert load_sent_function(sent.ident, sent.blob)() == index
        assert len(_sent_functions._pickles) <= _sent_functions.CACHE_SIZE
        assert len(_sent_functions._loaded) <= _sent_functions.CACHE_SIZE

    def test_a_function_with_a_big_constant_is_not_kept(self) -> None:
        """Test that a pickle past the size limit is not cached on either side (a big
        global constant would stay in memory twice)."""
        ns = _main_functions(
            f"BIG = b'x' * {_sent_functions.MAX_PICKLE}\ndef f():\n    return len(BIG)\n"
        )
        assert _sent(ns["f"]) is None
        fn, _, _ = pickle.loads(dump_call((ns["f"], (), {}), None))
        assert fn() == _sent_functions.MAX_PICKLE

    def test_a_module_registered_to_travel_by_value_is_not_taken_by_reference(self) -> None:
        """Test that a function using a module registered with cloudpickle's
        ``register_pickle_by_value`` is not cached (the module travels by value), while
        the registration does not stop the caching of functions that do not use it."""
        import cloudpickle

        import workloads

        ns = _main_functions("def f():\n    return workloads.add(1, 2)\n")
        ns["workloads"] = workloads
        plain = _main_functions("def g():\n    return 3\n")
        cloudpickle.register_pickle_by_value(workloads)
        try:
            assert _sent(ns["f"]) is None
            assert _sent(plain["g"]) is _sent(plain["g"])
        finally:
            cloudpickle.unregister_pickle_by_value(workloads)
        assert _sent(ns["f"]) is _sent(ns["f"])

    def test_a_global_set_back_to_an_earlier_value_gets_a_fresh_function(self) -> None:
        """Test that a pickle made again after a change, with the bytes of an earlier
        one, is unpickled afresh by a worker that ran the earlier one: what those tasks
        wrote in its globals is not seen."""
        ns = _main_functions("N = 0\ndef bump():\n    global N\n    N += 1\n    return N\n")
        with ProcessPool(1) as pool:
            assert [pool.submit(ns["bump"]).result(WAIT) for _ in range(2)] == [1, 2]
            ns["N"] = 100
            assert pool.submit(ns["bump"]).result(WAIT) == 101
            ns["N"] = 0
            assert pool.submit(ns["bump"]).result(WAIT) == 1

    def test_an_argument_from_a_module_registered_by_value_travels_by_value(self) -> None:
        """Test that an argument of a class of a module registered with cloudpickle's
        ``register_pickle_by_value`` still travels by value (the worker may not import
        that module), as when the whole call went through cloudpickle."""
        import cloudpickle

        module = types.ModuleType("cancelflow_test_unimportable")
        exec("class Box:\n    def __init__(self, v):\n        self.v = v\n", vars(module))
        ns = _main_functions("def unbox(box):\n    return box.v\n")
        sys.modules[module.__name__] = module
        cloudpickle.register_pickle_by_value(module)
        try:
            payload = dump_call((ns["unbox"], (module.Box(5),), {}), None)
        finally:
            cloudpickle.unregister_pickle_by_value(module)
            del sys.modules[module.__name__]
        assert _run_loaded(payload) == 5

    def test_an_argument_that_its_pickle_holds_too_stays_the_same_object(self) -> None:
        """Test that a tuple default passed explicitly is the default in the worker too
        (one pickle keeps identities; the function's kept pickle and its arguments'
        would not)."""
        ns = _main_functions("MISSING = ('missing',)\ndef f(x=MISSING):\n    return x is MISSING\n")
        assert _run_loaded(dump_call((ns["f"], (ns["MISSING"],), {}), None)) is True
        assert _run_loaded(dump_call((ns["f"], (), {"x": ns["MISSING"]}), None)) is True
        assert _run_loaded(dump_call((ns["f"], (), {}), None)) is True
