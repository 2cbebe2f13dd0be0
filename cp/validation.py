"""Checks that run before any collective: a bad input fails here, on every rank, with the fix named
(an uneven shard or a missing head would otherwise deadlock or silently corrupt a collective)."""

from __future__ import annotations

import torch

from cp.params import CPParams


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: CPParams, window, sinks) -> None:
    """Shape and argument checks shared by the CP attention paths; raise before any collective."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q/k/v must be BSHD [B, S_local, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree on batch, "
                         "sequence or KV heads")
    if q.shape[0] != params.batch_size or q.shape[1] != params.local_len:
        raise ValueError(f"q has [B, S_local] = {list(q.shape[:2])} but CPParams describe "
                         f"[{params.batch_size}, {params.local_len}] (S_pad={params.padded_len}, cp={params.cp_size})")
    if window is not None and window < 1:
        raise ValueError(f"window={window}: a sliding window must be >= 1 (or None for full attention)")
    if sinks is not None and sinks.shape != (q.shape[2],):
        raise ValueError(f"sinks must have one logit per query head ({q.shape[2]}); got shape {tuple(sinks.shape)}")
