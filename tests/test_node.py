"""Specification of ``cancelflow._node``: ``Node`` (one step of a pipeline) and
``NodeContext`` (what a node's callable receives)."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import threading
from collections.abc import Callable
from typing import Any

import pytest

from cancelflow import (
    CancellationToken,
    Node,
    NodeContext,
    PipelineDefinitionError,
    PipelineExecutor,
    current_token,
)
from cancelflow._context import task_scope
from support import names, run, value_of

NAN, INF = math.nan, math.inf


async def _coroutine_fn(ctx: NodeContext) -> None:
    return None


def _plain_fn(ctx: NodeContext) -> None:
    return None


def _closure() -> Callable[[NodeContext], int]:
    def inner(ctx: NodeContext) -> int:
        return 1

    return inner


class _AsyncCallable:
    """A callable object whose ``__call__`` is a coroutine function."""

    async def __call__(self, ctx: NodeContext) -> str:
        return ctx.node_id


class _PlainCallable:
    def __call__(self, ctx: NodeContext) -> str:
        return ctx.node_id


class _HoldsALock:
    """A module-level callable that does not pickle (it holds a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self, ctx: NodeContext) -> None:
        return None


def describe_context(ctx: NodeContext) -> dict[str, Any]:
    """A process node that reports what it received (module level: workers import it)."""
    return {
        "pid": os.getpid(),
        "inputs": dict(ctx.inputs),
        "context": dict(ctx.context),
        "ids": (ctx.pipeline_id, ctx.node_id),
        "token_is_the_task_token": ctx.token is current_token(),
    }


class TestValidation:
    """A node that cannot run where it says is refused when it is made, naming itself."""

    @pytest.mark.parametrize(
        ("make", "argument"),
        [
            (lambda: Node(3, _plain_fn), "id"),  # type: ignore[arg-type]
            (lambda: Node("", _plain_fn), "id"),
            (lambda: Node("a", 3), "fn"),  # type: ignore[arg-type]
            (lambda: Node("a", _plain_fn, deps="b"), "deps"),  # type: ignore[arg-type]
            (lambda: Node("a", _plain_fn, deps=3), "deps"),  # type: ignore[arg-type]
            (lambda: Node("a", _plain_fn, deps=[3]), "deps"),  # type: ignore[list-item]
            (lambda: Node("a", _plain_fn, run_in="gpu"), "run_in"),  # type: ignore[arg-type]
            (lambda: Node("a", _plain_fn, run_in="loop"), "run_in"),
            (lambda: Node("a", _coroutine_fn, run_in="thread"), "thread"),
            (lambda: Node("a", _HoldsALock(), run_in="process"), "process node"),
            (lambda: Node("a", _plain_fn, timeout=0), "timeout"),
            (lambda: Node("a", _plain_fn, timeout=-1), "timeout"),
            (lambda: Node("a", _plain_fn, timeout="1"), "timeout"),  # type: ignore[arg-type]
            (lambda: Node("a", _plain_fn, timeout=NAN), "timeout"),
            (lambda: Node("a", _plain_fn, timeout=INF), "timeout"),
        ],
    )
    def test_node(self, make: Callable[[], Node], argument: str) -> None:
        """Test that a bad node is refused with PipelineDefinitionError naming the
        argument (and the node); building a good one still works."""
        with pytest.raises(PipelineDefinitionError, match=names(argument)):
            make()
        assert Node("a", _plain_fn, deps=["b"], timeout=1).deps == ("b",)

    @pytest.mark.parametrize(
        ("make", "match"),
        [
            (lambda: Node("n", value_of, timeout=0), "timeout"),
            (lambda: Node("n", value_of, timeout=-1.0), "timeout"),
            (lambda: Node("n", value_of, run_in="thread"), "coroutine function runs on the loop"),
            (lambda: Node("n", _plain_fn, run_in="loop"), "needs a coroutine function"),
        ],
        ids=[
            "zero-timeout",
            "negative-timeout",
            "coroutine-in-thread",
            "plain-on-loop",
        ],
    )
    def test_bad_node_is_refused_with_its_id(self, make: Callable[[], Node], match: str) -> None:
        """Test that a node that cannot run where it says is refused, naming the node."""
        with pytest.raises(PipelineDefinitionError, match=match) as info:
            make()
        assert info.value.node_id == "n"

    @pytest.mark.parametrize("fn", [lambda ctx: 1, _closure()], ids=["lambda", "closure"])
    def test_a_lambda_or_a_closure_makes_a_process_node(self, fn: Callable[..., Any]) -> None:
        """Test that a process node takes a lambda or a closure (they travel by value)."""
        assert Node("n", fn, run_in="process").fn is fn

    def test_a_process_node_whose_callable_does_not_pickle_is_refused(self) -> None:
        """Test that a process node whose module-level callable cannot be pickled is
        refused when it is made, naming the node, with the pickling error as cause."""
        with pytest.raises(PipelineDefinitionError, match="cannot be sent to a worker") as info:
            Node("n", _HoldsALock(), run_in="process")
        assert info.value.node_id == "n"
        assert isinstance(info.value.__cause__, TypeError)

    def test_a_process_node_takes_a_module_level_function(self) -> None:
        """Test that a plain module-level function is accepted as a process node."""
        assert Node("n", describe_context, run_in="process").run_in == "process"


class TestDefaults:
    """What a node is when the caller leaves things out."""

    @pytest.mark.parametrize(
        ("fn", "where"),
        [
            (_coroutine_fn, "loop"),
            (_AsyncCallable(), "loop"),
            (_plain_fn, "thread"),
            (_PlainCallable(), "thread"),
        ],
        ids=["coroutine-function", "async-callable-object", "function", "callable-object"],
    )
    def test_run_in_follows_the_callable(self, fn: Any, where: str) -> None:
        """Test that without run_in a coroutine function (or an object with an async
        __call__) runs on the loop, and anything else in a thread."""
        assert Node("n", fn).run_in == where

    def test_deps_and_timeout_are_normalised(self) -> None:
        """Test that deps given as a list become a tuple, and a timeout given as an int
        becomes a float."""
        node = Node("n", _plain_fn, deps=["a", "b"], timeout=2)
        assert node.deps == ("a", "b")
        assert node.timeout == 2.0
        assert isinstance(node.timeout, float)
        assert Node("m", _plain_fn).deps == ()
        assert Node("m", _plain_fn).timeout is None

    def test_deps_given_as_an_iterator_are_kept(self) -> None:
        """Regression: deps given as a one-shot iterator are kept, not consumed by the
        check and stored as () (the node would then run before its dependencies)."""
        node = Node("n", _plain_fn, deps=iter(["a", "b"]))  # type: ignore[arg-type]
        assert node.deps == ("a", "b")

    def test_a_node_cannot_be_changed(self) -> None:
        """Test that a node is immutable once made."""
        node = Node("n", _plain_fn)
        with pytest.raises(dataclasses.FrozenInstanceError):
            node.id = "other"  # type: ignore[misc]

    def test_nodes_made_alike_are_equal(self) -> None:
        """Test that two nodes with the same id, callable, deps, place and timeout are equal."""
        assert Node("n", _plain_fn, deps=["a"], timeout=1) == Node(
            "n", _plain_fn, deps=("a",), timeout=1.0
        )
        assert Node("n", _plain_fn) != Node("n", _plain_fn, deps=["a"])


class TestNodeContext:
    """What a node's callable receives, and how it travels to a process worker."""

    def test_store_partial_hands_the_value_to_the_run(self) -> None:
        """Test that store_partial passes the key and value to the run's partial store."""
        stored: list[tuple[str, Any]] = []
        ctx = NodeContext(CancellationToken(), {}, {}, "p", "n", lambda k, v: stored.append((k, v)))
        ctx.store_partial("rows", 10)
        assert stored == [("rows", 10)]

    def test_store_partial_without_a_store_raises(self) -> None:
        """Test that store_partial on a context made without a partial store raises
        RuntimeError saying so."""
        ctx = NodeContext(CancellationToken(), {}, {}, "p", "n")
        with pytest.raises(RuntimeError, match="no partial-result store"):
            ctx.store_partial("rows", 10)

    def test_a_context_is_rebuilt_with_the_task_of_the_process_it_lands_in(self) -> None:
        """Test that an unpickled context keeps its inputs, context and ids, and takes the
        token and partial store of the task it is unpickled in (a worker's own)."""
        sent = NodeContext(CancellationToken(), {"a": 1}, {"user": "x"}, "p", "n", print)
        data = pickle.dumps(sent)
        worker_token = CancellationToken()
        stored: list[tuple[str, Any]] = []
        with task_scope(worker_token, lambda k, v: stored.append((k, v))):
            received = pickle.loads(data)
        assert (received.inputs, received.context) == ({"a": 1}, {"user": "x"})
        assert (received.pipeline_id, received.node_id) == ("p", "n")
        assert received.token is worker_token
        received.store_partial("k", "v")
        assert stored == [("k", "v")]

    def test_a_context_cannot_be_unpickled_outside_a_task(self) -> None:
        """Test that unpickling a context outside a cancelflow task raises RuntimeError
        (it would have no token)."""
        data = pickle.dumps(NodeContext(CancellationToken(), {}, {}, "p", "n"))
        with pytest.raises(RuntimeError, match="inside a cancelflow worker task"):
            pickle.loads(data)

    def test_a_process_node_gets_its_inputs_ids_and_the_worker_task_token(self) -> None:
        """Test that a process node runs in another process with its dependencies'
        outputs, the pipeline's context, its ids, and the token of its worker task."""

        async def main() -> dict[str, Any]:
            async with PipelineExecutor() as executor:
                nodes = [
                    Node("a", value_of),
                    Node("report", describe_context, deps=["a"], run_in="process"),
                ]
                outputs = await executor.execute_pipeline("p", nodes, {"user": "x"})
                return dict(outputs["report"])

        report = run(main())
        assert report["pid"] != os.getpid()
        assert report["inputs"] == {"a": "a"}
        assert report["context"] == {"user": "x"}
        assert report["ids"] == ("p", "report")
        assert report["token_is_the_task_token"] is True
