"""The autograd all-to-all (seq <-> head) and gather on real gloo groups: values and adjoints."""

import pytest
import torch
import torch.distributed as dist

from cp.collectives import even_head_index, gather_seq, head_to_seq, seq_to_head
from tests.dist import run_distributed


def _full(B, S, H, D, seed):
    return torch.randn(B, S, H, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _a2a_worker(rank, world, B, H, head_index):
    group = dist.group.WORLD
    S, D = 6 * world, 3
    x_full = _full(B, S, H, D, 0)
    s = S // world
    x = x_full[:, rank * s:(rank + 1) * s].clone().requires_grad_()
    mine = head_index[rank] if head_index else even_head_index(H, world)[rank]
    y = seq_to_head(x, group, head_index)
    # forward: the full sequence of exactly this rank's heads
    assert torch.equal(y, x_full[:, :, mine]), "seq_to_head put tokens or heads in the wrong place"
    # backward is the adjoint: <seq_to_head(x), g> summed over ranks == <x, grad>
    g = _full(B, S, len(mine), D, 1 + rank)
    (y * g).sum().backward()
    expected = torch.zeros_like(x_full)
    for r in range(world):  # every rank's g lands on the heads it received, summed where heads overlap
        heads = head_index[r] if head_index else even_head_index(H, world)[r]
        expected[:, :, heads] += _full(B, S, len(heads), D, 1 + r)
    assert torch.allclose(x.grad, expected[:, rank * s:(rank + 1) * s]), "backward is not the inverse all-to-all"
    if head_index is None or all(len(set(a) & set(b)) == 0 for a in head_index for b in head_index if a is not b):
        # head_to_seq inverts seq_to_head for partitions of the heads
        back = head_to_seq(y.detach(), group, head_index, H)
        assert torch.equal(back, x.detach())


@pytest.mark.parametrize("world,B,H,head_index", [
    (2, 1, 4, None),
    (2, 3, 4, None),  # batch > 1 takes the permute path
    (4, 2, 8, None),
    (4, 1, 6, [[0, 1], [2, 3], [4], [5]]),  # uneven head split
    (4, 2, 2, [[0], [0], [1], [1]]),  # replicated KV heads (GQA with fewer KV heads than ranks)
    (2, 1, 3, [[0, 1, 2], [2]]),  # overlapping, uneven
])
def test_seq_to_head_values_and_adjoint(world, B, H, head_index):
    run_distributed(_a2a_worker, world, B, H, head_index)


def test_group_of_one_is_a_no_op():
    x = torch.randn(2, 5, 4, 3)
    assert seq_to_head(x, None) is x
    assert head_to_seq(x, None) is x
    assert gather_seq(x, None) is x


def _gather_worker(rank, world):
    x = torch.full((2, 3, 4), float(rank), requires_grad=True)
    y = gather_seq(x, dist.group.WORLD, dim=1)
    assert y.shape == (2, 3 * world, 4)
    assert torch.equal(y[:, 3 * rank:3 * (rank + 1)], x.detach())
    (y * torch.arange(3 * world).view(1, -1, 1)).sum().backward()
    assert torch.equal(x.grad, torch.arange(3 * rank, 3 * rank + 3).view(1, -1, 1).expand(2, 3, 4).float())


def test_gather_seq_backward_keeps_this_ranks_slice():
    run_distributed(_gather_worker, 4)
