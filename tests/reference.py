"""Single-rank references and random packed batches shared by the CP tests.

The reference attention is written independently of cp.kernels: one document at a time, an
explicit softmax in float64, window and sinks applied the textbook way.
"""

from __future__ import annotations

import math
import random

import torch


def reference_attention(q, k, v, seq_lens, *, causal=True, scale=None, window=None, sinks=None):
    """q [B, S, H, D], k/v [B, S, Hkv, D] full sequences; seq_lens: document lengths per row."""
    B, S, H, D = q.shape
    groups = H // k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    rows = []
    for b in range(B):
        docs, start = [], 0
        for n in seq_lens[b]:
            qd = q[b, start:start + n].double().transpose(0, 1)  # [n, H, D] -> [H, n, D]
            kd = k[b, start:start + n].double().transpose(0, 1).repeat_interleave(groups, 0)  # -> [H, n, D]
            vd = v[b, start:start + n].double().transpose(0, 1).repeat_interleave(groups, 0)  # -> [H, n, D]
            scores = qd @ kd.transpose(1, 2) * scale  # [H, n, n]
            i = torch.arange(n)
            diff = i[:, None] - i[None, :]
            allowed = torch.ones(n, n, dtype=torch.bool)
            if causal:
                allowed &= diff >= 0
            if window is not None:
                allowed &= (diff if causal else diff.abs()) < window
            scores = scores.masked_fill(~allowed, float("-inf"))
            if sinks is not None:
                scores = torch.cat([scores, sinks.double()[:, None, None].expand(H, n, 1)], dim=-1)
            probs = torch.softmax(scores, dim=-1)[..., :n]  # the sink column has a zero value vector
            docs.append((probs @ vd).transpose(0, 1))  # [H, n, D] -> [n, H, D]
            start += n
        rows.append(torch.cat(docs))
    return torch.stack(rows)  # [B, S, H, D] float64


def random_doc_lens(total: int, rng: random.Random, *, max_len: int | None = None) -> list[int]:
    """Random document lengths summing to `total`, with some length-1 documents mixed in."""
    max_len = max_len or max(2, total // 3)
    lens = []
    while sum(lens) < total:
        left = total - sum(lens)
        n = 1 if rng.random() < 0.2 else rng.randint(1, max_len)
        lens.append(min(n, left))
    return lens
