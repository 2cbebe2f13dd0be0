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
gradient (the computation after it is replicated on every rank of the group). `gather_shard_states`
all-gathers small per-shard tensors each rank uses differently (state-passing CP: shard summaries, conv
halos); its backward all-to-alls the gradient back and sums it on the owner.

Group of size 1 (or None): everything is a no-op.

Byte counting (benchmarks): `with count_comm() as counter:` counts the bytes this rank sends to
OTHER ranks through this module (all_to_all, p2p, all_gather; forward and backward), in a
CommCounter made active through a ContextVar. Backward run on another thread (CUDA autograd
workers) is not seen: run it under `torch.autograd.set_multithreading_enabled(False)`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

HeadIndex = Sequence[Sequence[int]]  # head_index[j] = head ids (of H) that rank j receives


COMM_KINDS = ("all_to_all", "p2p", "all_gather")


@dataclass
class CommCounter:
    """Bytes this rank sent to other ranks, per kind of collective, and how many sends."""

    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMM_KINDS, 0))
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMM_KINDS, 0))

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


_ACTIVE_COUNTER: contextvars.ContextVar[CommCounter | None] = contextvars.ContextVar("comm_counter", default=None)


@contextmanager
def count_comm(counter: CommCounter | None = None) -> Iterator[CommCounter]:
    """Count the bytes sent by this module's collectives inside the block (nests: inner wins)."""
    counter = CommCounter() if counter is None else counter
    token = _ACTIVE_COUNTER.set(counter)
    try:
        yield counter
    finally:
        _ACTIVE_COUNTER.reset(token)


def _record(kind: str, nbytes: int) -> None:
    counter = _ACTIVE_COUNTER.get()
    if counter is not None:
        counter.bytes[kind] += nbytes
        counter.calls[kind] += 1


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


@dataclass
class _Exchange:
    """One all-to-all, packed: the send buffer, split sizes (None = even), the receive buffer, and
    how to turn the received buffer into the result."""

    send: torch.Tensor
    recv: torch.Tensor
    output_splits: list[int] | None
    input_splits: list[int] | None
    unpack: Callable[[torch.Tensor], torch.Tensor]

    def run(self, group: dist.ProcessGroup, async_op: bool = False):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        splits = self.input_splits or [self.send.numel() // size] * size
        _record("all_to_all", (sum(splits) - splits[rank]) * self.send.element_size())  # the self-chunk stays
        return dist.all_to_all_single(self.recv, self.send, output_split_sizes=self.output_splits,
                                      input_split_sizes=self.input_splits, group=group, async_op=async_op)


def _pack_seq_to_head(x: torch.Tensor, group: dist.ProcessGroup, head_index: HeadIndex) -> _Exchange:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    B, s, H, D = x.shape
    if _is_even_split(head_index, H):
        h = H // size
        send = x.reshape(B, s, size, h, D).permute(2, 0, 1, 3, 4).contiguous()  # [B, s, H, D] -> [P, B, s, h, D]
        if B == 1:
            unpack = lambda recv: recv.view(1, size * s, h, D)  # [P, 1, s, h, D] -> [1, S, h, D] (no copy)
        else:
            unpack = lambda recv: recv.permute(1, 0, 2, 3, 4).reshape(B, size * s, h, D)  # [P, B, s, h, D] -> [B, S, h, D]
        return _Exchange(send, torch.empty_like(send), None, None, unpack)
    # Uneven or overlapping head sets: one flat buffer, one split per destination.
    pieces = [x[:, :, list(idx)] for idx in head_index]  # each [B, s, h_j, D]
    mine = len(head_index[rank])
    send = torch.cat([p.reshape(-1) for p in pieces])
    recv = x.new_empty(size * B * s * mine * D)

    def unpack(recv):
        recv = recv.view(size, B, s, mine, D)  # [P(source), B, s, h_mine, D]
        return recv.permute(1, 0, 2, 3, 4).reshape(B, size * s, mine, D)  # -> [B, S, h_mine, D]

    return _Exchange(send, recv, [B * s * mine * D] * size, [p.numel() for p in pieces], unpack)


def _pack_head_to_seq(x: torch.Tensor, group: dist.ProcessGroup, head_index: HeadIndex, num_heads: int) -> _Exchange:
    size = dist.get_world_size(group)
    B, S, h, D = x.shape
    s = S // size
    if _is_even_split(head_index, num_heads):
        if B == 1:
            send = x.reshape(size, 1, s, h, D)  # [1, S, h, D] -> [P(dest), 1, s, h, D] (no copy)
        else:
            send = x.reshape(B, size, s, h, D).transpose(0, 1).contiguous()  # [B, S, h, D] -> [P, B, s, h, D]
        # recv: [P(source = head chunk), B, s, h, D] -> [B, s, P, h, D] -> [B, s, H, D]
        unpack = lambda recv: recv.permute(1, 2, 0, 3, 4).reshape(B, s, size * h, D)
        return _Exchange(send, torch.empty_like(send), None, None, unpack)
    send = x.reshape(B, size, s, h, D).transpose(0, 1).reshape(-1)  # [B, S, h, D] -> [P, B, s, h, D] -> flat
    counts = [len(idx) for idx in head_index]
    recv = x.new_empty(B * s * sum(counts) * D)

    def unpack(recv):
        out = recv.new_zeros(B, s, num_heads, D)
        for idx, flat in zip(head_index, recv.split([B * s * c * D for c in counts])):
            # Overlapping head sets (replicated KV heads) sum: the adjoint of the replication.
            out.index_add_(2, torch.tensor(list(idx), device=recv.device), flat.view(B, s, len(idx), D))
        return out

    return _Exchange(send, recv, [B * s * c * D for c in counts], [B * s * h * D] * size, unpack)


def _pack(direction: str, x, group, head_index, num_heads) -> _Exchange:
    if direction == "seq_to_head":
        return _pack_seq_to_head(x, group, head_index)
    return _pack_head_to_seq(x, group, head_index, num_heads)


_INVERSE = {"seq_to_head": "head_to_seq", "head_to_seq": "seq_to_head"}


def _all_to_all(direction: str, x, group, head_index, num_heads) -> torch.Tensor:
    exchange = _pack(direction, x, group, head_index, num_heads)
    exchange.run(group)
    return exchange.unpack(exchange.recv)


class _AllToAll(torch.autograd.Function):
    """Synchronous all-to-all in `direction`; backward is the inverse direction."""

    @staticmethod
    def forward(ctx, x, direction, group, head_index, num_heads):
        ctx.args = (_INVERSE[direction], group, head_index, num_heads)
        return _all_to_all(direction, x, group, head_index, num_heads)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(ctx.args[0], grad.contiguous(), *ctx.args[1:]), None, None, None, None


class PendingAllToAll:
    """An all-to-all in flight (forward) and, later, its gradient's inverse all-to-all (backward)."""

    def __init__(self):
        self.forward: tuple | None = None  # (work, exchange)
        self.backward: tuple | None = None


class _StartAllToAll(torch.autograd.Function):
    """Launch the all-to-all; returns the receive buffer (filled once _WaitAllToAll has waited).
    Backward waits for the gradient's inverse all-to-all that _WaitAllToAll.backward launched."""

    @staticmethod
    def forward(ctx, x, direction, group, head_index, num_heads, pending):
        exchange = _pack(direction, x, group, head_index, num_heads)
        pending.forward = (exchange.run(group, async_op=True), exchange)
        ctx.pending = pending
        return exchange.recv

    @staticmethod
    def backward(ctx, _unused):
        work, exchange = ctx.pending.backward
        work.wait()
        ctx.pending.backward = None
        return exchange.unpack(exchange.recv), None, None, None, None, None


class _WaitAllToAll(torch.autograd.Function):
    """Wait and unpack; backward launches the inverse all-to-all of the gradient without waiting."""

    @staticmethod
    def forward(ctx, recv, direction, group, head_index, num_heads, pending):
        work, exchange = pending.forward
        work.wait()
        pending.forward = None
        ctx.args = (_INVERSE[direction], group, head_index, num_heads)
        ctx.pending, ctx.recv_shape, ctx.recv_dtype = pending, recv.shape, recv.dtype
        return exchange.unpack(recv)

    @staticmethod
    def backward(ctx, grad):
        direction, group, head_index, num_heads = ctx.args
        exchange = _pack(direction, grad.contiguous(), group, head_index, num_heads)
        ctx.pending.backward = (exchange.run(group, async_op=True), exchange)
        # The receive buffer's gradient is carried by `pending`; autograd only needs a placeholder.
        placeholder = torch.zeros((), dtype=ctx.recv_dtype, device=grad.device).expand(ctx.recv_shape)
        return placeholder, None, None, None, None, None


def _resolve(x, group, head_index, num_heads, direction):
    size = group_size(group)
    if head_index is None:
        head_index = even_head_index(num_heads, size)
    _check_head_index(head_index, num_heads, size)
    if direction == "head_to_seq" and x.shape[1] % size:
        raise ValueError(f"sequence length {x.shape[1]} is not divisible by the group size {size}")
    return head_index


def seq_to_head(x: torch.Tensor, group: dist.ProcessGroup | None, head_index: HeadIndex | None = None) -> torch.Tensor:
    """[B, S/P, H, D] sequence shard -> [B, S, h, D] full sequence of this rank's heads.

    head_index[j] lists the heads rank j receives (default: H/P contiguous heads each).
    """
    if group_size(group) == 1:
        if head_index is None or list(head_index[0]) == list(range(x.shape[2])):
            return x  # all heads in order: no copy
        return x[:, :, list(head_index[0])]
    head_index = _resolve(x, group, head_index, x.shape[2], "seq_to_head")
    return _AllToAll.apply(x.contiguous(), "seq_to_head", group, head_index, x.shape[2])


def head_to_seq(x: torch.Tensor, group: dist.ProcessGroup | None, head_index: HeadIndex | None = None,
                num_heads: int | None = None) -> torch.Tensor:
    """[B, S, h, D] this rank's heads of the full sequence -> [B, S/P, H, D] sequence shard.

    The inverse of `seq_to_head` with the same head_index; num_heads = H (default h * P).
    """
    size = group_size(group)
    if size == 1:
        return x
    num_heads = x.shape[2] * size if num_heads is None else num_heads
    head_index = _resolve(x, group, head_index, num_heads, "head_to_seq")
    return _AllToAll.apply(x.contiguous(), "head_to_seq", group, head_index, num_heads)


def start_all_to_all(x: torch.Tensor, direction: str, group: dist.ProcessGroup, head_index: HeadIndex,
                     num_heads: int) -> Callable[[], torch.Tensor]:
    """Launch seq_to_head / head_to_seq asynchronously; returns `wait()` giving the result.

    Compute issued between start and wait overlaps the communication, in forward and (mirrored by
    autograd) in backward. Results are identical to the synchronous functions. Group size > 1.
    """
    head_index = _resolve(x, group, head_index, num_heads, direction)
    pending = PendingAllToAll()
    recv = _StartAllToAll.apply(x.contiguous(), direction, group, head_index, num_heads, pending)
    return lambda: _WaitAllToAll.apply(recv, direction, group, head_index, num_heads, pending)


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
        _record("all_gather", (len(parts) - 1) * x.numel() * x.element_size())
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


class _GatherShardStates(torch.autograd.Function):
    """All-gather whose backward is an all-to-all + sum: rank j gets back the sum over ranks of the gradient
    of its slot (the code after the gather differs per rank, unlike gather_seq's)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        size = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        _record("all_gather", (size - 1) * x.numel() * x.element_size())
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)  # P x [...] -> [P, ...]

    @staticmethod
    def backward(ctx, grad):
        size = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        recv = torch.empty_like(grad)
        _record("all_to_all", (size - 1) * grad[0].numel() * grad.element_size())
        dist.all_to_all_single(recv, grad, group=ctx.group)  # slot j of every rank -> rank j
        return recv.sum(0), None  # [P, ...] -> [...]


def gather_shard_states(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's `x` (equal shapes), stacked in group-rank order: [...] -> [P, ...].

    Unlike gather_seq, each rank may use any slots differently: the backward returns to rank j the sum over all
    ranks of the gradient of slot j (an all-to-all of the [P, ...] gradient, then a sum). Every rank must use the
    result in its loss graph (with zero weight if need be), or the backward all-to-all is not entered everywhere.
    State-passing CP (cp.state_passing) exchanges its per-shard summaries and conv halos through it.
    """
    if group_size(group) == 1:
        return x.unsqueeze(0)
    return _GatherShardStates.apply(x.contiguous(), group)


class RingExchange:
    """Batched P2P for the ring: send tensors to the next rank, receive the previous rank's.

        ex = RingExchange(group)
        ex.start([k, v])        # isend to rank+1, irecv from rank-1, one batch_isend_irecv
        ... compute on k, v ...
        k, v = ex.wait()        # the previous rank's tensors
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (rank + 1) % size)
        self.prev = dist.get_global_rank(group, (rank - 1) % size)
        self._works: list = []
        self._sent: list[torch.Tensor] = []  # kept alive until wait()
        self._recv: list[torch.Tensor] = []

    def start(self, tensors: list[torch.Tensor]) -> None:
        if self._works:
            raise RuntimeError("RingExchange.start called twice without wait")
        self._sent = [t.contiguous() for t in tensors]
        self._recv = [torch.empty_like(t) for t in self._sent]
        _record("p2p", sum(t.numel() * t.element_size() for t in self._sent))
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in self._sent]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in self._recv]
        self._works = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._works, self._sent = [], []
        return self._recv
