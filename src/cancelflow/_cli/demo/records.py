"""What happened, as it happened: one record per run (request) and per node."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cancelflow._executor import PipelineResult

from .pipeline import CLEANUP_HANDLERS


@dataclass
class NodeRecord:
    id: str
    wave: int
    run_in: str
    started: float | None = None
    ended: float | None = None
    event: str | None = None  # node_finished / node_cancelled / node_failed
    error: str | None = None
    fate: str = "not started"
    detail: str = ""
    worker_pid: int | None = None
    worker_alive: bool | None = None
    helper_pid: int | None = None
    helper_alive: bool | None = None


@dataclass
class DaskTarget:
    """Where ``--dask`` runs the pipeline."""

    address: str
    local: bool  # a LocalCluster the demo started: its processes are the demo's children
    workers: int | None = None  # how many workers to wait for (None: at least one)


@dataclass
class RunRecord:
    request: int
    pipeline_id: str
    work: Mapping[str, float]
    scratch: str
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    launched: float = 0.0
    started: float | None = None
    ended: float | None = None
    waves_seen: set[int] = field(default_factory=set)
    result: PipelineResult | None = None
    interrupted_by_user: bool = False
    never_started: bool = False
    partials: dict[str, Any] | None = None
    finished: dict[str, Any] | None = None
    cleanup_runs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLEANUP_HANDLERS, 0))
    error: str | None = None
    extra_context: dict[str, Any] = field(default_factory=dict)

    @property
    def context(self) -> dict[str, Any]:
        return {**self.work, "scratch": self.scratch, **self.extra_context}

    def label(self, node_id: str) -> str:
        record = self.nodes[node_id]
        prefix = f"#{self.request} " if self.request > 1 else ""
        return f"{prefix}w{record.wave + 1} {node_id:<14} {record.run_in:<7}"
