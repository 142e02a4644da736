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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cancelflow import CancellationToken, ProcessPool, current_token
from cancelflow._process._pickling import dump_call
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
