"""The demo's report pipeline: its nodes (see ``nodes``), its four waves and their roles."""

from __future__ import annotations

from dataclasses import dataclass

from cancelflow._node import Node

from . import nodes as demo_nodes

#: The wave of CPU work in processes (the default cancel lands in it).
CPU_WAVE = 2


@dataclass(frozen=True)
class _Wave:
    name: str
    where: str


WAVES = (
    _Wave("fetch", "event loop"),
    _Wave("parse", "threads"),
    _Wave("crunch", "processes"),
    _Wave("publish", "event loop"),
)

ROLES = {
    "score_orders": "checks its token",
    "simulate_risk": "never checks its token",
    "render_chart": "starts a helper process",
    "archive_orders": "ignores its token and SIGTERM",
}

#: The nodes whose ``finally`` block stores the partial result ``"finally"`` (see ``nodes``):
#: its presence proves that the block ran.
WITH_FINALLY = ("simulate_risk", "archive_orders")

CLEANUP_HANDLERS = ("close the API session", "remove the scratch directory")


def pipeline_nodes() -> list[Node]:
    """The demo's nodes; the executor derives the four waves from the dependencies."""
    m = demo_nodes
    return [
        Node("fetch_orders", m.fetch_orders),
        Node("fetch_prices", m.fetch_prices),
        Node("parse_orders", m.parse_orders, deps=["fetch_orders"], run_in="thread"),
        Node("parse_prices", m.parse_prices, deps=["fetch_prices"], run_in="thread"),
        Node("score_orders", m.score_orders, deps=["parse_orders"], run_in="process"),
        Node("simulate_risk", m.simulate_risk, deps=["parse_prices"], run_in="process"),
        Node(
            "render_chart",
            m.render_chart,
            deps=["parse_orders", "parse_prices"],
            run_in="process",
        ),
        Node("archive_orders", m.archive_orders, deps=["parse_orders"], run_in="process"),
        Node(
            "publish_report",
            m.publish_report,
            deps=["score_orders", "simulate_risk", "render_chart", "archive_orders"],
        ),
    ]


def _waves_of(nodes: list[Node]) -> dict[str, int]:
    """Each node's wave: 0 without dependencies, else one after its latest dependency."""
    wave: dict[str, int] = {}
    for node in nodes:  # listed after their dependencies
        wave[node.id] = 1 + max((wave[dep] for dep in node.deps), default=-1)
    return wave


NODE_WAVE = _waves_of(pipeline_nodes())
