"""Packed-document descriptions and the conversions between them: the one home for all of them.

A batch of packed rows describes its documents in one of these forms (row b of the THD flattening
starts at b * S; documents never cross rows):

    seq_lens      [[30, 1, 50], ...]   document lengths per row                   (python lists)
    cu_seqlens    [0, 30, 31, 81, ...] cumulative lengths over the rows flattened  (THD, int)
    doc_ids       [B, S]               document id of each position, unique across rows
    seq_idx       [B, S] int32         index of the document within its row        (mamba-ssm / causal-conv1d)
    position_ids  [B, S]               0, 1, ... from each document's start

    seq_lens ──doc_ids_from_seq_lens──> doc_ids ──cu_seqlens_from_doc_ids──> cu_seqlens
    cu_seqlens ──doc_ids_from_cu_seqlens──> doc_ids ──seq_idx_from_doc_ids──> seq_idx
    cu_seqlens ──seq_lens_from_cu_seqlens──> seq_lens ──positions_from_seq_lens──> position_ids
    position_ids ──seq_lens_from_position_ids──> seq_lens

Label positions no loss is taken on carry IGNORE_INDEX (-100, the value torch's cross_entropy and HF
skip): the one definition cp, models and trainer share.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch

IGNORE_INDEX = -100


def doc_ids_from_seq_lens(seq_lens: Sequence[Sequence[int]], *, device=None) -> torch.Tensor:
    """[B, S] document id of each position from per-row document lengths (ids unique across rows)."""
    flat = [int(n) for row in seq_lens for n in row]
    ids = torch.repeat_interleave(torch.arange(len(flat), device=device), torch.tensor(flat, device=device))
    return ids.view(len(seq_lens), -1)  # [sum of lengths] -> [B, S]


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """[B, S] document ids from cumulative lengths over the flattened rows (row b starts at b * S)."""
    cu = torch.as_tensor(cu_seqlens).flatten().long()
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != batch * seq_len:
        raise ValueError(f"cu_seqlens must run from 0 to batch * seq_len = {batch * seq_len}; got {cu.tolist()}")
    ids = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1])
    return ids.view(batch, seq_len)  # [B * S] -> [B, S]


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] document ids (contiguous runs, unique across rows) -> int64 cu_seqlens [n_docs + 1] of the
    rows flattened (THD order), for varlen kernels that take packed documents."""
    flat = doc_ids.reshape(-1)  # [B, S] -> [B * S]
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    return torch.cat([starts.nonzero().flatten(), torch.tensor([flat.numel()], device=flat.device)])


def seq_idx_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] document ids (contiguous runs) -> [B, S] int32 index of the document within its row."""
    starts = torch.zeros_like(doc_ids, dtype=torch.int32)
    starts[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).to(torch.int32)
    return starts.cumsum(1, dtype=torch.int32)


def seq_lens_from_cu_seqlens(cu_seqlens, length: int) -> list[list[int]]:
    """One row's cumulative lengths -> [[lengths]]; ValueError unless they run from 0 to `length`."""
    cu = [int(x) for x in torch.as_tensor(cu_seqlens).flatten().tolist()]
    if not cu or cu[0] != 0 or cu[-1] != length:
        raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {length}; got {cu[:3]}...{cu[-2:]}")
    return [[b - a for a, b in pairwise(cu)]]


def seq_lens_from_position_ids(position_ids: torch.Tensor) -> list[list[int]]:
    """Document lengths per row: a new document wherever the position does not continue by +1."""
    lens = []
    for row in position_ids.tolist():
        starts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1] + 1]
        lens.append([b - a for a, b in zip(starts, starts[1:] + [len(row)])])
    return lens


def positions_from_seq_lens(seq_lens: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """[B, S]: each document counts 0, 1, ... from its own start."""
    return torch.stack([torch.cat([torch.arange(n, device=device) for n in row]) for row in seq_lens])
