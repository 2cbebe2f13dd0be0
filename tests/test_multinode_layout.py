"""The mesh on a multi-node launch: torchrun numbers ranks node by node, so with Ulysses innermost a
Ulysses group sits inside one node and the ring (or dp) runs across nodes.

Simulated here as 2 "nodes" x 2 ranks (LOCAL_WORLD_SIZE=2, node = rank // 2) on real gloo groups:
the groups build() makes equal ParallelDims.rank_groups, which is what the README's multi-node
section states.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch.distributed as dist

import cp
from tests.dist import run_distributed

RANKS_PER_NODE = 2
LAYOUTS = [  # (cp, style, cp_ulysses) on 2 nodes x 2 ranks
    (4, "hybrid", 2),  # Ulysses inside each node, ring across the two
    (2, "ulysses", None),  # a cp group per node, dp across nodes
    (4, "ring", None),  # the ring spans both nodes
]
AXES = ("dp", "cp_ring", "cp_ulysses", "cp", "dp_cp")


def _layout_worker(rank, world, layouts):
    os.environ["LOCAL_WORLD_SIZE"] = str(RANKS_PER_NODE)
    found = []
    for degree, style, cp_ulysses in layouts:
        dims = cp.ParallelDims(world_size=world, cp=degree, cp_style=style, cp_ulysses=cp_ulysses)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dims.build()
        group_of = {"dp": dims.dp_group, "cp_ring": dims.ring_group, "cp_ulysses": dims.ulysses_group,
                    "cp": dims.cp_group, "dp_cp": dims.dp_cp_group}
        mine = {axis: dist.get_process_group_ranks(group_of[axis]) for axis in AXES}
        found.append((mine, [str(w.message) for w in caught if "Ulysses degree" in str(w.message)]))
    return found


def test_groups_built_on_two_nodes_match_rank_groups_and_keep_ulysses_inside_a_node():
    results = run_distributed(_layout_worker, 4, LAYOUTS)
    for i, (degree, style, cp_ulysses) in enumerate(LAYOUTS):
        dims = cp.ParallelDims(world_size=4, cp=degree, cp_style=style, cp_ulysses=cp_ulysses)
        for rank, per_layout in enumerate(results):
            mine, ulysses_warnings = per_layout[i]
            for axis in AXES:
                expected = next(g for g in dims.rank_groups(axis) if rank in g)
                assert sorted(mine[axis]) == expected, f"{style} cp={degree} rank {rank} axis {axis}"
            assert not ulysses_warnings, f"{style} cp={degree}: Ulysses fits a node, no warning: {ulysses_warnings}"
        for group in dims.rank_groups("cp_ulysses"):
            assert len({r // RANKS_PER_NODE for r in group}) == 1, f"{style}: Ulysses group {group} spans nodes"
    hybrid = cp.ParallelDims(world_size=4, cp=4, cp_style="hybrid", cp_ulysses=2)
    assert hybrid.rank_groups("cp_ulysses") == [[0, 1], [2, 3]] and hybrid.rank_groups("cp_ring") == [[0, 2], [1, 3]]
    dp_cp = cp.ParallelDims(world_size=4, cp=2, cp_style="ulysses")
    assert dp_cp.rank_groups("cp") == [[0, 1], [2, 3]] and dp_cp.rank_groups("dp") == [[0, 2], [1, 3]]


def _crossing_worker(rank, world):
    os.environ["LOCAL_WORLD_SIZE"] = str(RANKS_PER_NODE)
    with pytest.warns(UserWarning, match="Ulysses degree 4 does not fit the 2 ranks per node"):
        cp.ParallelDims(world_size=world, cp=4, cp_style="ulysses").build()
    return "warned"


def test_a_ulysses_group_spanning_nodes_is_warned_about():
    assert run_distributed(_crossing_worker, 4) == ["warned"] * 4


def test_rank_groups_rejects_an_unknown_axis():
    with pytest.raises(ValueError, match="unknown mesh axis"):
        cp.ParallelDims(world_size=2, cp=2).rank_groups("tp")
