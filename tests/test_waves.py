"""Tests for ``cancelflow._waves``: whole-pipeline validation and topological waves."""

from __future__ import annotations

from typing import Any

import pytest

from cancelflow import PipelineDefinitionError
from cancelflow._node import Node, NodeContext
from cancelflow._waves import compute_waves, validate_pipeline


async def noop(ctx: NodeContext) -> None:
    return None


def node(node_id: str, *deps: str) -> Node:
    return Node(node_id, noop, deps=deps)


def wave_ids(nodes: list[Node]) -> list[list[str]]:
    return [[n.id for n in wave] for wave in compute_waves(validate_pipeline(nodes))]


class TestValidatePipeline:
    def test_returns_nodes_by_id_in_order(self) -> None:
        """Test that a valid pipeline comes back keyed by id, in the order given."""
        nodes = [node("b"), node("a", "b")]
        assert list(validate_pipeline(nodes)) == ["b", "a"]

    def test_duplicate_id(self) -> None:
        """Test that two nodes with one id are refused, naming the id."""
        with pytest.raises(PipelineDefinitionError, match="duplicate node id 'a'") as info:
            validate_pipeline([node("a"), node("b"), node("a")])
        assert info.value.node_id == "a"

    def test_unknown_dependency(self) -> None:
        """Test that a dependency on an id outside the pipeline is refused, naming both."""
        with pytest.raises(
            PipelineDefinitionError, match="'b' depends on unknown node 'x'"
        ) as info:
            validate_pipeline([node("a"), node("b", "a", "x")])
        assert info.value.node_id == "b"

    def test_self_dependency_is_a_cycle(self) -> None:
        """Test that a node depending on itself is refused as a cycle."""
        with pytest.raises(PipelineDefinitionError, match="cycle: a -> a") as info:
            validate_pipeline([node("a", "a")])
        assert info.value.node_id == "a"

    def test_cycle_is_named(self) -> None:
        """Test that a cycle is refused with the cycle spelled out and a member named."""
        with pytest.raises(PipelineDefinitionError) as info:
            validate_pipeline(
                [node("root"), node("a", "root", "c"), node("b", "a"), node("c", "b")]
            )
        message = str(info.value)
        assert "dependency cycle: " in message
        cycle = message.split("dependency cycle: ")[1].split(" -> ")
        assert cycle[0] == cycle[-1]
        assert sorted(cycle[:-1]) == ["a", "b", "c"]
        assert info.value.node_id in {"a", "b", "c"}

    def test_cycle_away_from_first_node(self) -> None:
        """Test that a cycle is found even when the first nodes are not part of it."""
        with pytest.raises(PipelineDefinitionError, match="cycle"):
            validate_pipeline([node("ok"), node("x", "y"), node("y", "x")])

    @pytest.mark.parametrize("entry", ["a", 3, None])
    def test_entry_that_is_not_a_node(self, entry: Any) -> None:
        """Test that an entry that is not a Node is refused with its index."""
        with pytest.raises(PipelineDefinitionError, match=r"nodes\[1\] must be a Node"):
            validate_pipeline([node("a"), entry])

    @pytest.mark.parametrize("nodes", ["abc", 42, None])
    def test_not_an_iterable_of_nodes(self, nodes: Any) -> None:
        """Test that something other than an iterable of nodes is refused."""
        with pytest.raises(PipelineDefinitionError, match="iterable of Node"):
            validate_pipeline(nodes)

    def test_is_a_value_error(self) -> None:
        """Test that definition errors can be caught as ValueError."""
        with pytest.raises(ValueError, match="duplicate"):
            validate_pipeline([node("a"), node("a")])


class TestComputeWaves:
    def test_empty_pipeline_has_no_waves(self) -> None:
        """Test that an empty pipeline has no waves."""
        assert wave_ids([]) == []

    def test_independent_nodes_share_wave_zero_in_order(self) -> None:
        """Test that nodes without dependencies form one wave, in the order given."""
        assert wave_ids([node("c"), node("a"), node("b")]) == [["c", "a", "b"]]

    def test_chain_is_one_node_per_wave(self) -> None:
        """Test that a chain a <- b <- c gives three waves."""
        assert wave_ids([node("c", "b"), node("b", "a"), node("a")]) == [["a"], ["b"], ["c"]]

    def test_diamond(self) -> None:
        """Test that a diamond puts both middle nodes in one wave."""
        nodes = [
            node("top"),
            node("left", "top"),
            node("right", "top"),
            node("end", "left", "right"),
        ]
        assert wave_ids(nodes) == [["top"], ["left", "right"], ["end"]]

    def test_wave_is_one_after_deepest_dependency(self) -> None:
        """Test that a node waits for its deepest dependency, not its shallowest."""
        nodes = [node("a"), node("b", "a"), node("c", "b"), node("d", "a", "c")]
        assert wave_ids(nodes) == [["a"], ["b"], ["c"], ["d"]]

    def test_repeated_dependency_counts_once(self) -> None:
        """Test that naming a dependency twice does not stall the node."""
        assert wave_ids([node("a"), node("b", "a", "a")]) == [["a"], ["b"]]

    def test_long_chain_does_not_recurse(self) -> None:
        """Test that a 5,000-node chain is validated and layered without recursion errors."""
        nodes = [node("n0")] + [node(f"n{i}", f"n{i - 1}") for i in range(1, 5000)]
        waves = wave_ids(nodes)
        assert len(waves) == 5000
        assert waves[-1] == ["n4999"]
