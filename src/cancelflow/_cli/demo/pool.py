"""The demo's process pool, which keeps the ``TaskFuture`` of each pipeline node."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cancelflow._node import NodeContext
from cancelflow._process import ProcessPool, TaskFuture
from cancelflow._token import CancellationToken

from .settings import PROCESS_GRACE, PROCESS_WORKERS, TERM_GRACE


class DemoProcessPool(ProcessPool):
    """A :class:`ProcessPool` that remembers the :class:`TaskFuture` of each pipeline node.

    The executor reports a stopped node as ``node_cancelled``; the future's ``fate`` tells
    a node that stopped at its token (``cancelled``) from one whose SIGTERM became an
    exception (``terminated``) and from one whose worker was killed (``killed``).
    """

    def __init__(self) -> None:
        super().__init__(
            PROCESS_WORKERS,
            grace_period=PROCESS_GRACE,
            term_grace_period=TERM_GRACE,
            name="demo-processes",
        )
        self.futures: dict[tuple[str, str], TaskFuture] = {}

    def submit_task(
        self,
        fn: Any,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        token: CancellationToken | None = None,
        timeout: float | None = None,
        grace_period: float | None = None,
        term_grace_period: float | None = None,
        partial_sink: Any = None,
    ) -> TaskFuture:
        args = tuple(args)
        future = super().submit_task(
            fn,
            args,
            kwargs,
            token=token,
            timeout=timeout,
            grace_period=grace_period,
            term_grace_period=term_grace_period,
            partial_sink=partial_sink,
        )
        if args and isinstance(args[0], NodeContext):
            self.futures[(args[0].pipeline_id, args[0].node_id)] = future
        return future
