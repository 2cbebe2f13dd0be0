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

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cp.collectives import head_to_seq, seq_to_head, start_all_to_all
from cp.kernels import Kernel, per_document, resolve_kernel
from cp.masks import AttnMask
from cp.params import CPParams
from cp.styles import CPConfigError, CPStyle, register_cp_style
from cp.validation import check_qkv


@dataclass(frozen=True)
class GroupedHeadSplit:
    """Heads split over the ranks of a Ulysses group, with the shared groups each rank's heads read
    (KV heads for GQA, key heads for Gated DeltaNet, B/C groups for Mamba2)."""

    head_index: list[list[int]]  # rank r: its heads (contiguous; sizes differ by at most one)
    group_index: list[list[int]]  # rank r: the groups its heads read (shared between ranks if fewer than ranks)
    heads_per_group: int

    def local_group_of_heads(self, rank: int) -> list[int]:
        """For each of rank's heads, the position of its group among the rank's received groups."""
        return [self.group_index[rank].index(h // self.heads_per_group) for h in self.head_index[rank]]


def grouped_head_split(num_heads: int, num_groups: int, size: int) -> GroupedHeadSplit:
    """Contiguous head chunks per rank (uneven when size does not divide num_heads) and their groups."""
    if num_groups < 1 or num_heads % num_groups:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_groups} KV heads")
    per_group = num_heads // num_groups
    head_index = [chunk.tolist() for chunk in torch.arange(num_heads).tensor_split(size)]
    group_index = [sorted({h // per_group for h in heads}) for heads in head_index]
    return GroupedHeadSplit(head_index=head_index, group_index=group_index, heads_per_group=per_group)


def align_groups_to_heads(a: torch.Tensor, b: torch.Tensor, group_of_head: list[int]):
    """Line local group tensors a, b [B, S, g, D] up with local heads as kernels expect (head i reads
    group i // (h/g)). Holds already for even splits; otherwise give every head its own copy."""
    heads, groups = len(group_of_head), a.shape[2]
    if heads % groups == 0 and group_of_head == [i // (heads // groups) for i in range(heads)]:
        return a, b
    index = torch.tensor(group_of_head, device=a.device)
    return a.index_select(2, index), b.index_select(2, index)  # [B, S, g, D] -> [B, S, h, D]


def ulysses_head_index(num_heads: int, num_kv_heads: int, size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Which query heads and which KV heads each of `size` ranks receives."""
    if num_heads < size:
        raise CPConfigError(f"Ulysses CP over {size} ranks needs at least {size} query heads, the model has "
                            f"{num_heads}: lower cp or use cp_style=ring (or hybrid with cp_ulysses <= {num_heads})",
                            "cp", "cp_style", "cp_ulysses")
    split = grouped_head_split(num_heads, num_kv_heads, size)
    return split.head_index, split.group_index


def match_local_gqa(k: torch.Tensor, v: torch.Tensor, q_heads: list[int], kv_heads: list[int], groups: int):
    """Make local KV heads line up with local query heads as kernel GQA expects (head i -> i // g)."""
    return align_groups_to_heads(k, v, [kv_heads.index(h // groups) for h in q_heads])


def _head_chunks(num_heads: int, num_kv: int, chunks: int) -> list[tuple[list[int], list[int]]]:
    """Split heads into `chunks` groups that keep every query head with its KV head."""
    if chunks < 1 or chunks > num_kv:
        raise CPConfigError(f"chunks={chunks} must be between 1 and the number of KV heads ({num_kv}), so every "
                            "head group keeps its query heads with their KV heads", "chunks")
    groups = num_heads // num_kv
    kv_chunks = [c.tolist() for c in torch.arange(num_kv).tensor_split(chunks)]
    return [(list(range(kv[0] * groups, (kv[-1] + 1) * groups)), kv) for kv in kv_chunks]


def _local_attention(q_full, k_full, v_full, params: CPParams, q_heads, kv_heads, groups, *, causal, scale, window,
                     sinks, kernel):
    """The kernel on the gathered full sequence of this rank's heads: [B, S, h_r, D]."""
    k_full, v_full = match_local_gqa(k_full, v_full, q_heads, kv_heads, groups)
    pos = params.ulysses_gathered_index().to(q_full.device)  # global position of each gathered token
    doc = params.doc_ids[:, pos]  # [B, S]
    mask = AttnMask(q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, causal=causal, window=window)
    local_sinks = None if sinks is None else sinks[q_heads]
    kernel = resolve_kernel(kernel)
    if params.document_spans is None:
        return kernel(q_full, k_full, v_full, mask, scale=scale, sinks=local_sinks)
    return per_document(kernel, q_full, k_full, v_full, mask, params.document_spans, scale=scale, sinks=local_sinks)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: CPParams, *,
                      causal: bool = True, scale: float | None = None, window: int | None = None,
                      sinks: torch.Tensor | None = None, kernel: str | Kernel | None = None,
                      chunks: int = 1, attn_fn: str | Kernel | None = None) -> torch.Tensor:
    """Exact attention of this rank's sequence shards q [B, S/P, H, D], k/v [B, S/P, Hkv, D].

    kernel: the local kernel on the full sequence: a name in cp.kernels.KERNELS, a callable with
    the kernel signature, or an HF attention function wrapped by cp.kernels.hf_kernel.
    chunks: > 1 pipelines the all-to-alls by head groups (KV heads split in `chunks`, query heads
    follow): the all-to-all of group i+1 runs while group i attends. Same numbers as chunks=1.
    attn_fn: the old name of `kernel` (deprecated).
    Returns [B, S/P, H, D].
    """
    if attn_fn is not None:
        if kernel is not None:
            raise TypeError("ulysses_attention: give kernel= (attn_fn= is its deprecated name), not both")
        warnings.warn("ulysses_attention(attn_fn=) is deprecated: pass kernel= (the same keyword as ring_attention "
                      "and hybrid_attention)", DeprecationWarning, stacklevel=2)
        kernel = attn_fn
    check_qkv(q, k, v, params, window, sinks)
    num_heads, num_kv = q.shape[2], k.shape[2]
    check_ulysses_heads(num_heads, num_kv, params.ulysses_size, chunks)  # before any collective
    kw = dict(causal=causal, scale=scale, window=window, kernel=kernel)
    if chunks == 1 or params.ulysses_size == 1:
        return _ulysses_single_shot(q, k, v, params, sinks=sinks, **kw)
    return _ulysses_pipelined(q, k, v, params, _head_chunks(num_heads, num_kv, chunks), sinks=sinks, **kw)


def check_ulysses_heads(num_heads: int, num_kv: int, size: int, chunks: int = 1) -> None:
    """Raise (CPConfigError) unless `size` Ulysses ranks can split these heads into `chunks` pipelined groups."""
    ulysses_head_index(num_heads, num_kv, size)
    plan = _head_chunks(num_heads, num_kv, chunks)
    if chunks > 1 and size > 1 and min(len(q_heads) for q_heads, _ in plan) < size:
        raise CPConfigError(f"chunks={chunks} leaves fewer query heads in a head group ({num_heads} heads, {num_kv} "
                            f"KV heads) than the {size} Ulysses ranks: lower chunks", "chunks")


def _ulysses_single_shot(q, k, v, params: CPParams, *, sinks, **kw) -> torch.Tensor:
    group, size = params.ulysses_group, params.ulysses_size
    rank = dist.get_rank(group) if size > 1 else 0
    num_heads, num_kv = q.shape[2], k.shape[2]
    q_index, kv_index = ulysses_head_index(num_heads, num_kv, size)
    q_full = seq_to_head(q, group, q_index)  # [B, S/P, H, D] -> [B, S, h_r, D]
    k_full = seq_to_head(k, group, kv_index)  # [B, S/P, Hkv, D] -> [B, S, kv_r, D]
    v_full = seq_to_head(v, group, kv_index)  # [B, S/P, Hkv, D] -> [B, S, kv_r, D]
    out = _local_attention(q_full, k_full, v_full, params, q_index[rank], kv_index[rank], num_heads // num_kv,
                           sinks=sinks, **kw)  # [B, S, h_r, D]
    return head_to_seq(out, group, q_index, num_heads)  # [B, S, h_r, D] -> [B, S/P, H, D]


def _ulysses_pipelined(q, k, v, params: CPParams, plan, *, sinks, **kw) -> torch.Tensor:
    """Head-chunked Ulysses: all-to-alls of chunk i+1 (and the way back of chunk i) overlap chunk i's attention."""
    group, size = params.ulysses_group, params.ulysses_size
    rank = dist.get_rank(group)
    groups = q.shape[2] // k.shape[2]

    def start(chunk):
        q_heads, kv_heads = chunk
        q_index, kv_index = ulysses_head_index(len(q_heads), len(kv_heads), size)
        waits = [start_all_to_all(q[:, :, q_heads], "seq_to_head", group, q_index, len(q_heads)),  # -> [B, S, h, D]
                 start_all_to_all(k[:, :, kv_heads], "seq_to_head", group, kv_index, len(kv_heads)),
                 start_all_to_all(v[:, :, kv_heads], "seq_to_head", group, kv_index, len(kv_heads))]
        return q_index, kv_index, waits

    outputs, next_chunk = [], start(plan[0])
    for i, (q_heads, kv_heads) in enumerate(plan):
        q_index, kv_index, waits = next_chunk
        if i + 1 < len(plan):
            next_chunk = start(plan[i + 1])  # in flight while this chunk attends
        q_full, k_full, v_full = (wait() for wait in waits)
        chunk_sinks = None if sinks is None else sinks[q_heads]
        out = _local_attention(q_full, k_full, v_full, params, q_index[rank], kv_index[rank], groups,
                               sinks=chunk_sinks, **kw)  # [B, S, h_r, D]
        outputs.append(start_all_to_all(out, "head_to_seq", group, q_index, len(q_heads)))  # -> [B, S/P, H_i, D]
    return torch.cat([wait() for wait in outputs], dim=2)  # chunks in head order -> [B, S/P, H, D]


STYLE = register_cp_style(CPStyle(
    name="ulysses", levels=("ulysses",), default_layout="contiguous", attention=ulysses_attention, kernel_kind="local",
    recurrent_mixers=True, options=("chunks",),
    description="all-to-all seq <-> heads around a local kernel; cp <= query heads"))
