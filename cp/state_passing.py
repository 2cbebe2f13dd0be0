"""State-passing CP for recurrent mixers (Gated DeltaNet, Mamba2): the recurrent state crosses ranks, not the heads.

Every rank keeps its contiguous sequence shard and all heads; a layer's recurrence is affine in the state
entering a shard, so a shard is summarised by two tensors and only those travel:

    rank r: shard [B, L, ...] of rows 0..B-1 (positions r*L .. r*L+L-1 of every row)
        1. scan the shard from a zero state      -> outputs from zero, and per row
                                                    final  N_r: the state leaving the shard (its last document's)
                                                    transition M_r: how a state entering the shard reaches its end
                                                    (Gated DeltaNet: a [Dk, Dk] matrix per head; Mamba2: a scalar
                                                    decay per head)
        2. gather_shard_states([M_r | N_r])      one all-gather: every rank receives every shard's summary
        3. fold over the shards before r:        S = M_j S + N_j while the document runs through shard j
                                                    (passes[j]), S = N_j where a document starts inside shard j,
                                                    S = 0 entering r if r's first token starts a document
        4. the mixer corrects its outputs with S (the state that really enters the shard)

    conv1d halo: rank r needs the last (kernel - 1) inputs before its shard: the same gather of every
    shard's tail; the varlen conv masks the halo wherever a document starts (and before position 0).

Packed documents: which shard a document starts in, and whether it runs through a whole shard, comes from
the global doc_ids of CPParams (every rank knows every boundary: no collective). Rows are independent.

Cost per layer and rank: one all-gather of (P - 1) summaries (B H Dk (Dk + Dv) floats for Gated DeltaNet,
B H (1 + hd N) for Mamba2) and of (P - 1) halos (B (K - 1) C), the same bytes back in the backward's
all-to-all; the fold is P - 1 small matmuls per head on every rank. Latency: one collective each way, at
any P (a sequential P2P scan would send each state once, but wait P - 1 hops and order the backward's
sends across ranks). Ulysses moves the activations instead: (P - 1)/P of the shard's q/k/v (or x/B/C), twice.

The backward is autograd's through the gather (its backward all-to-alls each slot's gradient back to the
rank that sent it and sums it there): the state's adjoint flows from later shards to earlier ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cp.collectives import gather_shard_states
from cp.params import CPParams


class _Tie(torch.autograd.Function):
    """out unchanged, with `anchor` in its graph (zero gradient): keeps a collective's backward on every rank."""

    @staticmethod
    def forward(ctx, out, anchor):
        ctx.anchor_shape, ctx.anchor_dtype = anchor.shape, anchor.dtype
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.anchor_shape, dtype=ctx.anchor_dtype)


def _tie(out: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    return _Tie.apply(out, anchor) if anchor.requires_grad else out


def check_state_layout(params: CPParams) -> None:
    """ValueError unless every cp rank holds one contiguous run of each row, in rank order (state passing's layout).
    Checked once per CPParams (the host copy of the shard index would otherwise sync a GPU at every layer)."""
    if params.memo.get("state_layout_ok"):
        return
    if params.ring_size != 1:
        raise ValueError(f"state-passing mixers need one contiguous shard per rank; cp_style={params.style} has a ring "
                         f"level of {params.ring_size}: use model.cp_style=ulysses with model.mixer_cp=state")
    if not torch.equal(params.shard_index.reshape(-1).cpu(), torch.arange(params.padded_len)):
        raise ValueError("state-passing mixers need the contiguous layout (rank r holds positions r*L .. r*L+L-1); "
                         f"these CPParams use layout={params.layout}: use model.cp_style=ulysses")
    params.memo["state_layout_ok"] = True


@dataclass(frozen=True, eq=False)
class ShardChain:
    """This rank's place in the chain of shards, and the document boundaries between shards (per row)."""

    group: dist.ProcessGroup | None
    size: int
    rank: int
    local_len: int
    doc_ids: torch.Tensor  # [B, S_pad] global
    continues: torch.Tensor  # bool [P, B]: shard j's first token continues shard j-1's last document
    passes: torch.Tensor  # bool [P, B]: a state entering shard j reaches its end (continues, no start inside)

    @classmethod
    def from_params(cls, params: CPParams) -> ShardChain:
        check_state_layout(params)
        memo = params.memo.get("shard_chain")
        if memo is not None:
            return memo
        size, length = params.cp_size, params.local_len
        doc = params.doc_ids
        shards = doc.reshape(doc.shape[0], size, length).transpose(0, 1)  # [B, S_pad] -> [P, B, L]
        first, last = shards[..., 0], shards[..., -1]  # [P, B]
        continues = torch.zeros_like(first, dtype=torch.bool)
        continues[1:] = first[1:] == last[:-1]
        single_run = (shards == first[..., None]).all(-1)  # [P, B]: ids are contiguous runs
        chain = cls(group=params.cp_group if size > 1 else None, size=size, rank=params.cp_rank, local_len=length,
                    doc_ids=doc, continues=continues, passes=continues & single_run)
        params.memo["shard_chain"] = chain
        return chain

    @property
    def local_doc_ids(self) -> torch.Tensor:
        """[B, L]: the documents of this rank's positions."""
        start = self.rank * self.local_len
        return self.doc_ids[:, start:start + self.local_len]

    # -- conv halo -----------------------------------------------------------------------------------

    def with_halo(self, x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, C] (this rank's shard) -> ([B, width + L, C], doc ids [B, width + L]): the `width` positions
        before the shard prepended (zeros with document -1 before position 0), for a causal conv of kernel width+1
        whose first `width` outputs are dropped."""
        if width == 0:
            return x, self.local_doc_ids.to(x.device)
        batch = x.shape[0]
        tail = x[:, -min(width, self.local_len):]  # [B, w, C]: w = width, or the whole shard if shorter
        tails = gather_shard_states(tail, self.group)  # [P, B, w, C]
        before = tails[:self.rank].transpose(0, 1).flatten(1, 2)  # [r, B, w, C] -> [B, r * w, C] (positions in order)
        pad = max(0, width - before.shape[1])
        halo = torch.cat([x.new_zeros(batch, pad, x.shape[2]), before[:, before.shape[1] - (width - pad):]], dim=1)
        halo = _tie(halo, tails)  # [B, width, C]
        start = self.rank * self.local_len
        positions = torch.arange(start - width, start + self.local_len, device=self.doc_ids.device)
        docs = self.doc_ids.index_select(1, positions.clamp(min=0))  # [B, width + L]
        docs = torch.where(positions >= 0, docs, -1)
        return torch.cat([halo, x], dim=1), docs.to(x.device)

    def causal_conv(self, conv, x: torch.Tensor, weight: torch.Tensor, bias, *, activation) -> torch.Tensor:
        """conv(x, weight, bias, doc_ids, activation=) (a varlen causal conv1d, weight [C, 1, K] or [C, K]) over this
        rank's shard x [B, L, C], the previous shards' last K - 1 inputs as its history -> [B, L, C]."""
        halo = weight.shape[-1] - 1
        with_halo, docs = self.with_halo(x, halo)  # [B, L, C] -> [B, K-1 + L, C]
        return conv(with_halo, weight, bias, docs, activation=activation)[:, halo:]

    # -- the state entering the shard --------------------------------------------------------------

    def entering_state(self, transition: torch.Tensor, final: torch.Tensor,
                       apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The state entering this rank's shard, per row: [B, ...] like `final`.

        transition [B, ...], final [B, ...]: this shard's summary (a state entering the shard leaves it as
        apply(transition, state) + final when passes; final alone: the state leaving it from zero).
        Zero for rows whose shard starts a document (and on rank 0).
        """
        batch = final.shape[0]
        dtype = torch.promote_types(final.dtype, torch.float32)  # fp32 state math (float64 stays float64)
        summary = torch.cat([transition.reshape(batch, -1), final.reshape(batch, -1)], dim=1).to(dtype)  # [B, m + n]
        gathered = gather_shard_states(summary, self.group)  # [P, B, m + n]
        split = transition[0].numel()
        state = final.new_zeros(final.shape, dtype=dtype)
        for j in range(self.rank):
            passes = self.passes[j].to(final.device).view(batch, *[1] * (final.dim() - 1))
            carried = apply(gathered[j, :, :split].view(transition.shape), state)
            state = torch.where(passes, carried, 0.0) + gathered[j, :, split:].view(final.shape)
        entering = self.continues[self.rank].to(final.device).view(batch, *[1] * (final.dim() - 1))
        return _tie(torch.where(entering, state, 0.0), gathered)


def matrix_transition(transition: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Gated DeltaNet: transition [B, H, Dk, Dk] @ state [B, H, Dk, Dv]."""
    return transition @ state


def decay_transition(transition: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Mamba2: a scalar decay per head, transition [B, H] * state [B, H, P, N]."""
    return transition[..., None, None] * state
