"""Pipeline definitions checked as a whole, and grouped into waves (topological levels).

A node is checked on its own when it is built (:class:`~cancelflow._node.Node`); this
module checks what only the whole pipeline can tell: ids are unique, every dependency
names a node of the pipeline, and the dependencies form no cycle. Every problem is a
:class:`PipelineDefinitionError` naming the offending node, raised before anything runs.

Waves: wave 0 holds the nodes without dependencies; wave *k* holds the nodes whose
deepest dependency is in wave *k - 1*. All the nodes of one wave can run at once, and a
wave starts only after the previous one has finished. Within a wave, nodes keep the
order in which they were given.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._exceptions import PipelineDefinitionError
from ._node import Node

__all__ = ("compute_waves", "validate_pipeline")


def validate_pipeline(nodes: Iterable[Node]) -> dict[str, Node]:
    """Check a pipeline and return its nodes keyed by id, in the order given.

    Raises:
        PipelineDefinitionError: an entry is not a :class:`Node`, two nodes share an id,
            a node depends on an id that is not in the pipeline (or on itself), or the
            dependencies form a cycle (the message spells the cycle out, e.g.
            ``a -> b -> a``, and ``node_id`` is its first node).
    """
    if isinstance(nodes, (str, bytes)) or not isinstance(nodes, Iterable):
        raise PipelineDefinitionError(
            f"nodes must be an iterable of Node objects, not {type(nodes).__name__}"
        )
    by_id: dict[str, Node] = {}
    for index, node in enumerate(nodes):
        if not isinstance(node, Node):
            raise PipelineDefinitionError(
                f"nodes[{index}] must be a Node, not {type(node).__name__}"
            )
        if node.id in by_id:
            raise PipelineDefinitionError(f"duplicate node id {node.id!r}", node_id=node.id)
        by_id[node.id] = node
    # Declaration order is usually already topological; only if it is not can there be a
    # cycle, and only then is the (slower) search for one needed.
    in_order = True
    seen: set[str] = set()
    for node in by_id.values():
        for dep in node.deps:
            if dep not in seen:
                if dep == node.id:
                    raise PipelineDefinitionError(
                        f"node {node.id!r} depends on itself (cycle: {node.id} -> {node.id})",
                        node_id=node.id,
                    )
                if dep not in by_id:
                    raise PipelineDefinitionError(
                        f"node {node.id!r} depends on unknown node {dep!r}", node_id=node.id
                    )
                in_order = False
        seen.add(node.id)
    if not in_order:
        cycle = _find_cycle(by_id)
        if cycle is not None:
            raise PipelineDefinitionError(
                "dependency cycle: " + " -> ".join(cycle), node_id=cycle[0]
            )
    return by_id


def compute_waves(nodes: dict[str, Node]) -> list[list[Node]]:
    """Group validated nodes (see :func:`validate_pipeline`) into topological waves."""
    level: dict[str, int] = {}
    for node_id, node in nodes.items():
        deps = node.deps
        if not deps:
            level[node_id] = 0
            continue
        try:
            level[node_id] = 1 + max([level[dep] for dep in deps])
        except KeyError:  # a dependency declared later: layer in the general way
            return _layer_any_order(nodes)
    return _group(nodes, level)


def _layer_any_order(nodes: dict[str, Node]) -> list[list[Node]]:
    level: dict[str, int] = {}
    missing = {node_id: len(set(node.deps)) for node_id, node in nodes.items()}
    dependents: dict[str, list[str]] = {node_id: [] for node_id in nodes}
    for node_id, node in nodes.items():
        for dep in set(node.deps):
            dependents[dep].append(node_id)
    current = [node_id for node_id, count in missing.items() if count == 0]
    depth = 0
    while current:
        ready: list[str] = []
        for node_id in current:
            level[node_id] = depth
            for dependent in dependents[node_id]:
                missing[dependent] -= 1
                if missing[dependent] == 0:
                    ready.append(dependent)
        current = ready
        depth += 1
    return _group(nodes, level)


def _group(nodes: dict[str, Node], level: dict[str, int]) -> list[list[Node]]:
    """Waves from levels; within a wave, nodes keep the order they were given in."""
    waves: list[list[Node]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for node_id, node in nodes.items():
        waves[level[node_id]].append(node)
    return waves


def _find_cycle(nodes: dict[str, Node]) -> list[str] | None:
    """Return one dependency cycle as ``[a, b, ..., a]``, or ``None`` if there is none."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(nodes, white)
    for root in nodes:
        if color[root] != white:
            continue
        # Each frame: (node id, iterator position into its deps).
        path: list[str] = [root]
        positions: list[int] = [0]
        color[root] = grey
        while path:
            current = path[-1]
            deps = nodes[current].deps
            position = positions[-1]
            if position == len(deps):
                color[current] = black
                path.pop()
                positions.pop()
                continue
            positions[-1] = position + 1
            dep = deps[position]
            if color[dep] == grey:
                start = path.index(dep)
                return [*path[start:], dep]
            if color[dep] == white:
                color[dep] = grey
                path.append(dep)
                positions.append(0)
    return None
