"""Ulysses context parallelism: two seq <-> head all-to-alls around ANY local attention kernel.

    rank r holds S/P tokens of every head            rank r holds every token of its heads
    q [B, S/P, H,   D] ──seq_to_head──> [B, S, h_r,  D] ─┐
    k [B, S/P, Hkv, D] ──seq_to_head──> [B, S, kv_r, D] ─┼─> kernel(q, k, v, AttnMask) ─> [B, S, h_r, D]
    v [B, S/P, Hkv, D] ──seq_to_head──> [B, S, kv_r, D] ─┘                                   │
    out [B, S/P, H, D] <──────────────────────head_to_seq──────────────────────────────────────┘

The kernel sees the full sequence, so the mask (documents, causality, sliding window, sinks) is
judged on GLOBAL positions from CPParams: a window between S/P and S is kept, not dropped (the
prime-rl bug), and sinks are sliced to this rank's query heads.

Heads: query heads are split in contiguous chunks (h_r = H/P, or H//P and H//P + 1 when P does
not divide H). Each rank receives exactly the KV heads its query heads use (kv_r): with
Hkv % P == 0 that is an even split; with fewer KV heads than ranks a KV head goes to every rank
that needs it (replication inside the all-to-all, gradients summed on the way back).

Constraints: H >= P (every rank needs at least one query head; use ring or hybrid beyond that);
H % Hkv == 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp.collectives import head_to_seq, seq_to_head
from cp.kernels import AttnMask, Kernel, resolve_kernel
from cp.params import CPParams


def ulysses_head_index(num_heads: int, num_kv_heads: int, size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Which query heads and which KV heads each of `size` ranks receives."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if num_heads < size:
        raise ValueError(f"Ulysses CP over {size} ranks needs at least {size} query heads, the model has "
                         f"{num_heads}: lower model.cp or use model.cp_style=ring (or hybrid with "
                         f"model.cp_ulysses <= {num_heads})")
    groups = num_heads // num_kv_heads
    q_index = [chunk.tolist() for chunk in torch.arange(num_heads).tensor_split(size)]
    kv_index = [sorted({h // groups for h in heads}) for heads in q_index]
    return q_index, kv_index


def _match_local_gqa(k: torch.Tensor, v: torch.Tensor, q_heads: list[int], kv_heads: list[int], groups: int):
    """Make local KV heads line up with local query heads as kernel GQA expects (head i -> i // g).

    Holds already for even splits; otherwise expand KV to one head per query head.
    """
    local_kv = [kv_heads.index(h // groups) for h in q_heads]
    ratio = len(q_heads) // len(kv_heads)
    if len(q_heads) % len(kv_heads) == 0 and local_kv == [i // ratio for i in range(len(q_heads))]:
        return k, v
    index = torch.tensor(local_kv, device=k.device)
    return k.index_select(2, index), v.index_select(2, index)  # [B, S, kv_r, D] -> [B, S, h_r, D]


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: CPParams, window, sinks) -> None:
    """Shape and argument checks shared by the CP attention paths; raise before any collective."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q/k/v must be BSHD [B, S_local, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape[:3] + k.shape[3:] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree on batch, "
                         "sequence or KV heads")
    if q.shape[0] != params.batch_size or q.shape[1] != params.local_len:
        raise ValueError(f"q has [B, S_local] = {list(q.shape[:2])} but CPParams describe "
                         f"[{params.batch_size}, {params.local_len}] (S_pad={params.padded_len}, cp={params.cp_size})")
    if window is not None and window < 1:
        raise ValueError(f"window={window}: a sliding window must be >= 1 (or None for full attention)")
    if sinks is not None and sinks.shape != (q.shape[2],):
        raise ValueError(f"sinks must have one logit per query head ({q.shape[2]}); got shape {tuple(sinks.shape)}")


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: CPParams, *,
                      causal: bool = True, scale: float | None = None, window: int | None = None,
                      sinks: torch.Tensor | None = None, attn_fn: str | Kernel | None = None) -> torch.Tensor:
    """Exact attention of this rank's sequence shards q [B, S/P, H, D], k/v [B, S/P, Hkv, D].

    attn_fn: the local kernel on the full sequence: a name in cp.kernels.KERNELS, a callable with
    the kernel signature, or an HF attention function wrapped by cp.kernels.hf_kernel. Returns
    [B, S/P, H, D].
    """
    check_qkv(q, k, v, params, window, sinks)
    group, size = params.ulysses_group, params.ulysses_size
    rank = dist.get_rank(group) if size > 1 else 0
    num_heads, num_kv = q.shape[2], k.shape[2]
    q_index, kv_index = ulysses_head_index(num_heads, num_kv, size)

    q_full = seq_to_head(q, group, q_index)  # [B, S/P, H, D] -> [B, S, h_r, D]
    k_full = seq_to_head(k, group, kv_index)  # [B, S/P, Hkv, D] -> [B, S, kv_r, D]
    v_full = seq_to_head(v, group, kv_index)  # [B, S/P, Hkv, D] -> [B, S, kv_r, D]
    k_full, v_full = _match_local_gqa(k_full, v_full, q_index[rank], kv_index[rank], num_heads // num_kv)

    pos = params.ulysses_gathered_index().to(q.device)  # global position of each gathered token
    doc = params.doc_ids[:, pos]  # [B, S]
    mask = AttnMask(q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, causal=causal, window=window)
    local_sinks = None if sinks is None else sinks[q_index[rank]]
    out = resolve_kernel(attn_fn)(q_full, k_full, v_full, mask, scale=scale, sinks=local_sinks)  # [B, S, h_r, D]
    return head_to_seq(out, group, q_index, num_heads)  # [B, S, h_r, D] -> [B, S/P, H, D]
