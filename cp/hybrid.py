"""Hybrid (USP) attention: Ulysses inside each cp_ulysses group, ring across cp_ring groups.

    cp = ring x ulysses; cp rank = ring_rank * ulysses + ulysses_rank (ParallelDims mesh)
    sharding: zigzag over the ring, then each ring shard split contiguously among its Ulysses ranks

    q [B, S/cp, H, D] ──seq_to_head (ulysses group)──> [B, S/ring, h_u, D]   this ring rank's block, my heads
    k, v likewise (the KV heads my query heads use)                          ─┐
                              ring over cp_ring (cp.ring.ring_core): blocks ──┴─> [B, S/ring, h_u, D]
    out [B, S/cp, H, D] <──head_to_seq (ulysses group)──┘

Every factorisation works: ring=1 is Ulysses with the ring's LSE kernel, ulysses=1 is the ring.
The ring moves each KV head to only the Ulysses ranks whose query heads need it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp.collectives import head_to_seq, seq_to_head
from cp.params import CPParams
from cp.ring import ring_core
from cp.styles import CPStyle, register_cp_style
from cp.ulysses import match_local_gqa, ulysses_head_index
from cp.validation import check_qkv


def hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: CPParams, *, causal: bool = True,
                     scale: float | None = None, window: int | None = None, sinks: torch.Tensor | None = None,
                     kernel=None) -> torch.Tensor:
    """Exact attention of this rank's shards q [B, S/cp, H, D], k/v [B, S/cp, Hkv, D]; returns [B, S/cp, H, D].

    params come from setup_cp_params with a hybrid ParallelDims (any style's params work: a missing
    level has size 1). kernel: the ring's block kernel (cp.block_kernels.BLOCK_KERNELS).
    """
    check_qkv(q, k, v, params, window, sinks)
    group, size = params.ulysses_group, params.ulysses_size
    rank = dist.get_rank(group) if size > 1 else 0
    num_heads, num_kv = q.shape[2], k.shape[2]
    q_index, kv_index = ulysses_head_index(num_heads, num_kv, size)

    q_blk = seq_to_head(q, group, q_index)  # [B, S/cp, H, D] -> [B, S/ring, h_u, D]
    k_blk = seq_to_head(k, group, kv_index)  # [B, S/cp, Hkv, D] -> [B, S/ring, kv_u, D]
    v_blk = seq_to_head(v, group, kv_index)  # [B, S/cp, Hkv, D] -> [B, S/ring, kv_u, D]
    k_blk, v_blk = match_local_gqa(k_blk, v_blk, q_index[rank], kv_index[rank], num_heads // num_kv)
    local_sinks = None if sinks is None else sinks[q_index[rank]]
    out = ring_core(q_blk, k_blk, v_blk, params, causal=causal, scale=scale, window=window, sinks=local_sinks,
                    kernel=kernel)  # [B, S/ring, h_u, D]
    return head_to_seq(out, group, q_index, num_heads)  # [B, S/ring, h_u, D] -> [B, S/cp, H, D]


STYLE = register_cp_style(CPStyle(
    name="hybrid", levels=("ring", "ulysses"), default_layout="zigzag", attention=hybrid_attention, kernel_kind="block",
    recurrent_mixers=False, description="Ulysses inside cp_ulysses groups x ring across them (USP)"))
