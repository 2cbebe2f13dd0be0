"""Every CP collective lives here: autograd all-to-all (seq <-> head) and the autograd gather.

Ulysses re-shards BSHD activations between sequence-sharded and head-sharded:

    seq_to_head:  [B, S/P, H, D]  --all-to-all-->  [B, S, H/P, D]
    head_to_seq:  [B, S, H/P, D]  --all-to-all-->  [B, S/P, H, D]

Each rank sends to rank j the heads j needs (`head_index[j]`, a list of head ids: contiguous
equal chunks in the common case, uneven or overlapping when heads do not divide P or KV heads are
replicated for GQA) of its own sequence shard, and receives every rank's shard of its heads. The
send buffer is built from the local shard ([B, S/P, H, D] -> [P, B, S/P, h, D]), never from a
transposed full sequence. Backward of seq_to_head is the inverse all-to-all (head_to_seq of the
gradient, with overlapping heads summed); backward of head_to_seq is seq_to_head.

`gather_seq` all-gathers equal sequence shards; its backward returns this rank's slice of the
gradient (the computation after it is replicated on every rank of the group).

Group of size 1 (or None): everything is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

HeadIndex = Sequence[Sequence[int]]  # head_index[j] = head ids (of H) that rank j receives


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def even_head_index(num_heads: int, size: int) -> list[list[int]]:
    """Contiguous equal head chunks: rank j gets heads [j*H/P, (j+1)*H/P)."""
    if num_heads % size:
        raise ValueError(f"{num_heads} heads cannot be split evenly over {size} ranks")
    per = num_heads // size
    return [list(range(j * per, (j + 1) * per)) for j in range(size)]


def _is_even_split(head_index: HeadIndex, num_heads: int) -> bool:
    size = len(head_index)
    if num_heads % size:
        return False
    per = num_heads // size
    return all(list(h) == list(range(j * per, (j + 1) * per)) for j, h in enumerate(head_index))


def _seq_to_head(x: torch.Tensor, group: dist.ProcessGroup, head_index: HeadIndex) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    B, s, H, D = x.shape
    if _is_even_split(head_index, H):
        h = H // size
        send = x.reshape(B, s, size, h, D).permute(2, 0, 1, 3, 4).contiguous()  # [B, s, H, D] -> [P, B, s, h, D]
        recv = torch.empty_like(send)  # [P(source rank), B, s, h, D]
        dist.all_to_all_single(recv, send, group=group)
        if B == 1:
            return recv.view(1, size * s, h, D)  # [P, 1, s, h, D] -> [1, S, h, D] (no copy)
        return recv.permute(1, 0, 2, 3, 4).reshape(B, size * s, h, D)  # [P, B, s, h, D] -> [B, S, h, D]
    # Uneven or overlapping head sets: one flat buffer, one split per destination.
    pieces = [x[:, :, list(idx)] for idx in head_index]  # each [B, s, h_j, D]
    send = torch.cat([p.reshape(-1) for p in pieces])
    mine = len(head_index[rank])
    recv = x.new_empty(size * B * s * mine * D)
    dist.all_to_all_single(recv, send, output_split_sizes=[B * s * mine * D] * size,
                           input_split_sizes=[p.numel() for p in pieces], group=group)
    recv = recv.view(size, B, s, mine, D)  # [P(source), B, s, h_mine, D]
    return recv.permute(1, 0, 2, 3, 4).reshape(B, size * s, mine, D)  # -> [B, S, h_mine, D]


def _head_to_seq(x: torch.Tensor, group: dist.ProcessGroup, head_index: HeadIndex, num_heads: int) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    B, S, h, D = x.shape
    s = S // size
    if _is_even_split(head_index, num_heads):
        if B == 1:
            send = x.reshape(size, 1, s, h, D)  # [1, S, h, D] -> [P(dest), 1, s, h, D] (no copy)
        else:
            send = x.reshape(B, size, s, h, D).transpose(0, 1).contiguous()  # [B, S, h, D] -> [P, B, s, h, D]
        recv = torch.empty_like(send)  # [P(source rank = head chunk), B, s, h, D]
        dist.all_to_all_single(recv, send.contiguous(), group=group)
        return recv.permute(1, 2, 0, 3, 4).reshape(B, s, size * h, D)  # [P, B, s, h, D] -> [B, s, H, D]
    send = x.reshape(B, size, s, h, D).transpose(0, 1).contiguous()  # [B, S, h, D] -> [P, B, s, h, D]
    counts = [len(idx) for idx in head_index]
    recv = x.new_empty(B * s * sum(counts) * D)
    dist.all_to_all_single(recv, send.view(-1), output_split_sizes=[B * s * c * D for c in counts],
                           input_split_sizes=[B * s * h * D] * size, group=group)
    out = x.new_zeros(B, s, num_heads, D)
    for idx, flat in zip(head_index, recv.split([B * s * c * D for c in counts])):
        # Overlapping head sets (replicated KV heads) sum: this is the adjoint of the replication.
        out.index_add_(2, torch.tensor(list(idx), device=x.device), flat.view(B, s, len(idx), D))
    return out


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, head_index):
        ctx.group, ctx.head_index, ctx.num_heads = group, head_index, x.shape[2]
        return _seq_to_head(x, group, head_index)

    @staticmethod
    def backward(ctx, grad):
        return _head_to_seq(grad.contiguous(), ctx.group, ctx.head_index, ctx.num_heads), None, None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, head_index, num_heads):
        ctx.group, ctx.head_index = group, head_index
        return _head_to_seq(x, group, head_index, num_heads)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_head(grad.contiguous(), ctx.group, ctx.head_index), None, None, None


def seq_to_head(x: torch.Tensor, group: dist.ProcessGroup | None, head_index: HeadIndex | None = None) -> torch.Tensor:
    """[B, S/P, H, D] sequence shard -> [B, S, h, D] full sequence of this rank's heads.

    head_index[j] lists the heads rank j receives (default: H/P contiguous heads each).
    """
    if group_size(group) == 1:
        return x if head_index is None else x[:, :, list(head_index[0])]
    if head_index is None:
        head_index = even_head_index(x.shape[2], group_size(group))
    _check_head_index(head_index, x.shape[2], group_size(group))
    return _SeqToHead.apply(x.contiguous(), group, head_index)


def head_to_seq(x: torch.Tensor, group: dist.ProcessGroup | None, head_index: HeadIndex | None = None,
                num_heads: int | None = None) -> torch.Tensor:
    """[B, S, h, D] this rank's heads of the full sequence -> [B, S/P, H, D] sequence shard.

    The inverse of `seq_to_head` with the same head_index; num_heads = H (default h * P).
    """
    size = group_size(group)
    if size == 1:
        return x
    if num_heads is None:
        num_heads = x.shape[2] * size
    if head_index is None:
        head_index = even_head_index(num_heads, size)
    _check_head_index(head_index, num_heads, size)
    if x.shape[1] % size:
        raise ValueError(f"sequence length {x.shape[1]} is not divisible by the group size {size}")
    return _HeadToSeq.apply(x.contiguous(), group, head_index, num_heads)


def _check_head_index(head_index: HeadIndex, num_heads: int, size: int) -> None:
    if len(head_index) != size:
        raise ValueError(f"head_index has {len(head_index)} entries for a group of {size} ranks")
    for idx in head_index:
        if not idx or min(idx) < 0 or max(idx) >= num_heads:
            raise ValueError(f"head_index entry {list(idx)} is empty or outside [0, {num_heads})")


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(size, dim=ctx.dim)[rank].contiguous(), None, None


def gather_seq(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's equal shard along `dim`, in group-rank order.

    Backward keeps this rank's slice of the gradient: use it when the code after the gather is
    the same on every rank of the group (e.g. a loss over the full logits).
    """
    if group_size(group) == 1:
        return x
    return _GatherSeq.apply(x.contiguous(), group, dim)
