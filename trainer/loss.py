"""Losses on CP shards, normalised by the GLOBAL token count so gradients equal cp=1.

    rank r (of dp x cp): logits [B, S/cp, V], labels [B, S/cp] (already shifted, -100 ignored)
    loss_r = sum of r's token losses / N,   N = loss tokens of the whole step, all ranks, all micro-batches
    sum_r loss_r = the mean token loss of the global batch, and FSDP sums (not averages) gradients
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cp.documents import IGNORE_INDEX  # the one definition (cp.documents)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over this shard's loss tokens (fp32). logits [B, S, V], labels [B, S]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def count_loss_tokens(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())
