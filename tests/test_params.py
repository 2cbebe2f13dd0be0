"""setup_cp_params, shard/unshard, layouts and ParallelDims: single-process and on real gloo groups."""

import pytest
import torch
import torch.distributed as dist

import cp
from cp.layouts import shard_indices
from tests.dist import run_distributed

# ---------------------------------------------------------------- layouts (pure functions)


def test_zigzag_layout_gives_rank_r_chunks_r_and_2cp_minus_1_minus_r():
    index = shard_indices(16, [("zigzag", 4)])
    assert index.tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]


def test_hybrid_levels_split_each_ring_shard_among_ulysses_ranks():
    index = shard_indices(16, [("zigzag", 2), ("contiguous", 2)])
    # ring rank 0 holds chunks 0 and 3 = [0..3, 12..15]; its two Ulysses ranks split that in order
    assert index.tolist() == [[0, 1, 2, 3], [12, 13, 14, 15], [4, 5, 6, 7], [8, 9, 10, 11]]


@pytest.mark.parametrize("levels", [[("contiguous", 4)], [("zigzag", 4)], [("zigzag", 2), ("contiguous", 3)]])
def test_every_layout_is_a_permutation(levels):
    index = shard_indices(48, levels)
    assert sorted(index.reshape(-1).tolist()) == list(range(48))


# ---------------------------------------------------------------- setup_cp_params at cp=1


def test_global_positions_restart_at_each_document_and_cu_seqlens_cover_the_sequence():
    batch = cp.setup_cp_params(torch.arange(10)[None], seq_lens=[[3, 1, 6]])
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3, 4, 5]]
    assert batch.params.cu_seqlens.tolist() == [0, 3, 4, 10]
    assert batch.params.max_seqlen == 6


def test_documents_read_from_position_ids_when_seq_lens_are_missing():
    pos = torch.tensor([[0, 1, 2, 0, 1, 5, 6]])
    batch = cp.setup_cp_params(torch.zeros(1, 7, dtype=torch.long), position_ids=pos)
    assert batch.params.seq_lens == ((3, 2, 2),)
    assert torch.equal(batch.position_ids, pos)


def test_batch_of_two_packed_rows_keeps_documents_inside_rows():
    batch = cp.setup_cp_params(torch.zeros(2, 6, dtype=torch.long), seq_lens=[[2, 4], [6]])
    p = batch.params
    assert p.cu_seqlens.tolist() == [0, 2, 6, 12]  # rows flattened: row 1 starts at S_pad = 6
    assert p.doc_ids.tolist() == [[0, 0, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2]]


@pytest.mark.parametrize("kwargs,match", [
    ({"seq_lens": [[3, 3]]}, "sums to 6, but the sequence length is 7"),
    ({"seq_lens": [[7], [7]]}, "2 rows but the batch has 1"),
    ({"seq_lens": [[7, 0]]}, "length <= 0"),
    ({"cu_seqlens": [0, 3, 6]}, "end at the sequence length 7"),
    ({"cu_seqlens": [1, 7]}, "start at 0"),
    ({"labels": torch.zeros(1, 6, dtype=torch.long)}, "labels has shape"),
    ({"position_ids": torch.zeros(2, 7, dtype=torch.long)}, "position_ids has shape"),
    ({"seq_lens": [[7]], "cu_seqlens": [0, 7]}, "not both"),
])
def test_bad_packing_info_is_rejected_with_the_reason(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cp.setup_cp_params(torch.zeros(1, 7, dtype=torch.long), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"world_size": 4, "cp": 3}, "does not divide the world size 4"),
    ({"world_size": 4, "cp": 2, "cp_style": "stripes"}, "unknown cp_style='stripes'"),
    ({"world_size": 4, "cp": 4, "cp_style": "hybrid"}, "needs cp_ulysses"),
    ({"world_size": 4, "cp": 4, "cp_style": "hybrid", "cp_ulysses": 3}, "must divide cp=4"),
    ({"world_size": 4, "cp": 2, "cp_style": "ring", "cp_ulysses": 2}, "only used with cp_style=hybrid"),
])
def test_parallel_dims_validation(kwargs, match):
    """cp speaks in its own argument names (the trainer re-raises in config keys: tests/test_styles.py)."""
    with pytest.raises(cp.CPConfigError, match=match):
        cp.ParallelDims(**kwargs)


def test_parallel_dims_degrees():
    dims = cp.ParallelDims(world_size=8, cp=4, cp_style="hybrid", cp_ulysses=2)
    assert (dims.dp, dims.ring, dims.ulysses) == (2, 2, 2)
    assert cp.ParallelDims(world_size=4, cp=4, cp_style="ring").ulysses == 1


# ---------------------------------------------------------------- multi-rank


def _mesh_worker(rank, world):
    dims = cp.ParallelDims(world_size=world, cp=2, cp_style="hybrid", cp_ulysses=2) if world == 4 else \
        cp.ParallelDims(world_size=world, cp=2)
    dims.build()
    sizes = {name: dist.get_world_size(getattr(dims, f"{name}_group")) for name in ("cp", "ring", "ulysses", "dp", "dp_cp")}
    return sizes, dims.cp_rank, dims.dp_rank


def test_mesh_has_named_groups_of_the_right_sizes():
    sizes, cp_ranks, _ = zip(*run_distributed(_mesh_worker, 2))
    assert sizes[0] == {"cp": 2, "ring": 1, "ulysses": 2, "dp": 1, "dp_cp": 2}
    assert cp_ranks == (0, 1)
    # world 4, hybrid cp=2 (ring 1 x ulysses 2), dp 2
    results = run_distributed(_mesh_worker, 4)
    assert results[0][0] == {"cp": 2, "ring": 1, "ulysses": 2, "dp": 2, "dp_cp": 4}
    assert [r[1] for r in results] == [0, 1, 0, 1] and [r[2] for r in results] == [0, 0, 1, 1]


def _roundtrip_worker(rank, world, style, cp_ulysses):
    dims = cp.ParallelDims(world_size=world, cp=world, cp_style=style, cp_ulysses=cp_ulysses)
    dims.build()
    S = 8 * world + 3  # not divisible by cp: padded internally
    ids = torch.arange(100, 100 + 2 * S).view(2, S)
    labels = ids + 1000
    lens = [[5, 1, S - 6], [S]]
    batch = cp.setup_cp_params(ids, dims, labels=labels, seq_lens=lens)
    p = batch.params
    assert p.padded_len % world == 0 and p.padded_len >= S
    # this rank's tokens are the layout's positions of the padded batch
    for name, local, full, pad in (("input_ids", batch.input_ids, ids, 0), ("labels", batch.labels, labels, -100)):
        padded = torch.cat([full, torch.full((2, p.pad), pad)], dim=1)
        assert torch.equal(local, padded[:, p.local_index]), name
    # position_ids are global: the same as the unsharded computation, sliced
    expected_pos = torch.cat([torch.tensor([list(range(5)) + [0] + list(range(S - 6)), list(range(S))]),
                              torch.arange(p.pad).expand(2, p.pad)], dim=1)
    assert torch.equal(batch.position_ids, expected_pos[:, p.local_index])
    # shard -> unshard is the identity, with autograd; unshard's backward keeps this rank's slice
    x = torch.randn(2, S, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    local = cp.shard(x, p)
    full = cp.unshard(local, p)
    assert torch.equal(full, x)
    w = torch.randn(2, S, 3, generator=torch.Generator().manual_seed(1))
    (full * w).sum().backward()
    grad = x.grad.clone()
    dist.all_reduce(grad)  # each rank contributed its own tokens' share
    assert torch.allclose(grad, w), (grad - w).abs().max()
    assert torch.equal(cp.unshard(batch.input_ids, p), ids)


@pytest.mark.parametrize("world,style,cp_ulysses", [(1, "ulysses", None), (2, "ulysses", None), (2, "ring", None),
                                                    (4, "ulysses", None), (4, "ring", None), (4, "hybrid", 2)])
def test_shard_unshard_roundtrip_and_global_positions(world, style, cp_ulysses):
    run_distributed(_roundtrip_worker, world, style, cp_ulysses)


def _mismatch_worker(rank, world):
    dims = cp.ParallelDims(world_size=world, cp=world)
    dims.build()
    S = 32 if rank == 0 else 40
    with pytest.raises(ValueError, match="different batches"):
        cp.setup_cp_params(torch.zeros(1, S, dtype=torch.long), dims)
    with pytest.raises(ValueError, match="different batches"):
        cp.setup_cp_params(torch.zeros(1, 32, dtype=torch.long), dims, seq_lens=[[16, 16]] if rank else [[32]])
    return "raised"


def test_ranks_with_different_batches_fail_together_instead_of_hanging():
    assert run_distributed(_mismatch_worker, 2, timeout=60) == ["raised", "raised"]


def test_child_failures_come_back_with_their_rank():
    with pytest.raises(ZeroDivisionError) as info:
        run_distributed(_fail_on_rank_one, 2, timeout=60)
    assert "raised on rank 1 of 2" in str(info.value.__notes__)


def _fail_on_rank_one(rank, world):
    if rank == 1:
        return 1 / 0
    return rank
