"""`Node` (one step of a pipeline) and `NodeContext` (what a node's callable receives)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._context import PartialSink, current_scope
from ._exceptions import PipelineDefinitionError
from ._token import CancellationToken
from ._validate import seconds_error

__all__ = ("Node", "NodeContext", "RunIn", "check_context_travels")

RunIn = Literal["loop", "thread", "process"]
_RUN_IN: tuple[str, ...] = ("loop", "thread", "process")


@dataclass(frozen=True)
class Node:
    """One step of a pipeline: an id, a callable, the ids it depends on, where it runs.

    ``fn`` is called with a single :class:`NodeContext`. ``run_in`` says where:
    ``"loop"`` (a coroutine function, awaited on the event loop), ``"thread"`` (a plain
    callable in a thread pool) or ``"process"`` (a plain, picklable, module-level callable
    in a process pool). By default it follows the callable: a coroutine function runs on
    the loop, anything else in a thread. ``timeout`` bounds this node alone.

    Raises:
        PipelineDefinitionError: at construction, for an empty or non-string id, a
            non-callable ``fn``, an unknown ``run_in``, a ``run_in`` that does not fit
            ``fn`` (a coroutine function off the loop, a plain function on it, a lambda
            or closure in a process), or a non-positive timeout.
    """

    id: str
    fn: Callable[[NodeContext], Any]
    deps: tuple[str, ...] = ()
    run_in: RunIn = "thread"
    timeout: float | None = None

    def __init__(
        self,
        id: str,
        fn: Callable[[NodeContext], Any],
        *,
        deps: tuple[str, ...] | list[str] = (),
        run_in: RunIn | None = None,
        timeout: float | None = None,
    ) -> None:
        if not isinstance(id, str) or not id:
            raise PipelineDefinitionError(f"node id must be a non-empty str, got {id!r}")
        if not callable(fn):
            raise PipelineDefinitionError(
                f"node {id!r}: fn must be callable, not {type(fn).__name__}", node_id=id
            )
        # Read once, so that a one-shot iterator is kept rather than consumed by the check.
        dep_ids = None if isinstance(deps, str) or not isinstance(deps, Iterable) else tuple(deps)
        if dep_ids is None or not all(isinstance(d, str) for d in dep_ids):
            raise PipelineDefinitionError(
                f"node {id!r}: deps must be a sequence of node ids (str), got {deps!r}",
                node_id=id,
            )
        is_coroutine = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
        )
        if run_in is None:
            run_in = "loop" if is_coroutine else "thread"
        if run_in not in _RUN_IN:
            raise PipelineDefinitionError(
                f"node {id!r}: run_in must be one of {_RUN_IN}, got {run_in!r}", node_id=id
            )
        if run_in == "loop" and not is_coroutine:
            raise PipelineDefinitionError(
                f"node {id!r}: run_in='loop' needs a coroutine function, got {fn!r}", node_id=id
            )
        if run_in != "loop" and is_coroutine:
            raise PipelineDefinitionError(
                f"node {id!r}: a coroutine function runs on the loop, not in a {run_in}",
                node_id=id,
            )
        if run_in == "process":
            _check_picklable_callable(id, fn)
        if timeout is not None:
            error = seconds_error(timeout, "timeout", positive=True)
            if isinstance(error, TypeError):
                raise PipelineDefinitionError(
                    f"node {id!r}: timeout must be a number of seconds, got {timeout!r}",
                    node_id=id,
                )
            if error is not None:
                raise PipelineDefinitionError(f"node {id!r}: {error}", node_id=id)
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "deps", dep_ids)
        object.__setattr__(self, "run_in", run_in)
        object.__setattr__(self, "timeout", None if timeout is None else float(timeout))


def check_context_travels(context: Mapping[str, Any], nodes: Iterable[Node]) -> None:
    """Refuse, before anything runs, a context a process node cannot receive.

    A process node gets a copy of the pipeline's context in its worker (pickled, by value
    where needed). If any node runs in a process, every context value must pickle; the
    first that does not raises :class:`PipelineDefinitionError` naming its key and that
    node. Costs one pickling of the context per run with process nodes.
    """
    process_node = next((node for node in nodes if node.run_in == "process"), None)
    if process_node is None:
        return
    from ._process import dump_by_value

    for key, value in context.items():
        try:
            dump_by_value(value)
        except Exception as exc:
            raise PipelineDefinitionError(
                f"context[{key!r}] ({type(value).__name__}) cannot be sent to the worker of "
                f"process node {process_node.id!r}: {exc}. Process nodes get a copy of the "
                "context: keep picklable values in it, or pass this one to loop and thread "
                "nodes only (another executor, or a closure)",
                node_id=process_node.id,
            ) from exc


def _check_picklable_callable(node_id: str, fn: Callable[..., Any]) -> None:
    """A process node's callable must travel to a worker: by reference (a module-level
    function) or by value (a lambda, a closure, a function of ``__main__``: cloudpickle)."""
    from ._process import dump_by_value

    try:
        dump_by_value(fn)
    except Exception as exc:
        raise PipelineDefinitionError(
            f"node {node_id!r}: the callable of a process node cannot be sent to a worker "
            f"process: {exc}",
            node_id=node_id,
        ) from exc


@dataclass
class NodeContext:
    """What a node's callable receives.

    Attributes:
        token: the node's cancellation token; check ``token.is_cancelled`` (or call
            ``token.raise_if_cancelled()``) in long loops to stop early and cleanly.
        inputs: the outputs of the node's dependencies, keyed by their ids.
        context: the dict passed to the pipeline (shared, read it; do not mutate it from
            threads or processes).
        pipeline_id: the id of the pipeline run.
        node_id: this node's id.

    In a process node the context is a copy made in the worker: ``token`` is the worker's
    view of the same cancellation, and :meth:`store_partial` sends the value to the parent
    before it returns, so it survives the worker being killed.
    """

    token: CancellationToken
    inputs: Mapping[str, Any]
    context: Mapping[str, Any]
    pipeline_id: str
    node_id: str
    _partial_sink: PartialSink | None = field(default=None, repr=False, compare=False)

    def store_partial(self, key: str, value: Any) -> None:
        """Record a partial result under ``key``; kept if the pipeline is cancelled.

        Stored results appear in ``partial_results`` as ``"{node_id}.{key}"``.

        Raises:
            TypeError: ``key`` is not a string.
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, not {type(key).__name__}")
        if self._partial_sink is None:
            raise RuntimeError("this NodeContext has no partial-result store")
        self._partial_sink(key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent to a process worker: the token and the sink are the worker's own.
        return (
            _rebuild_in_worker,
            (dict(self.inputs), dict(self.context), self.pipeline_id, self.node_id),
        )


def _rebuild_in_worker(
    inputs: dict[str, Any], context: dict[str, Any], pipeline_id: str, node_id: str
) -> NodeContext:
    scope = current_scope()
    if scope is None:
        raise RuntimeError("a NodeContext can only be unpickled inside a cancelflow worker task")
    return NodeContext(scope.token, inputs, context, pipeline_id, node_id, scope.partial_sink)
