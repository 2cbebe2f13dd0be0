"""The support of the distribution a rollout engine sampled from: top-p (nucleus) truncation of scaled logits.

    y = logits / T  [..., V] fp32 ──sort ascending──> cumulative softmax ──drop where it is <= 1 - top_p──>
        (the largest one always kept, as vLLM's apply_top_k_top_p and transformers' TopPLogitsWarper do)
        ──the sampled token kept too──> y with -inf outside the kept set

log_softmax of the result is the log-prob of the truncated, renormalised distribution: what vLLM returns under
--logprobs-mode processed_logprobs and what the hf engine samples with top_p < 1. The trainer's policy, old and
reference log-probs use it so that every importance ratio compares the distribution that was sampled (at identical
weights the ratio is 1; the full softmax would give p_full / p_nucleus < 1 on every token). The sampled token is
kept even where the trainer's own rounding puts it just outside its nucleus: its log-prob stays finite. Gradients
flow through the kept logits only (the set itself is a selection, not differentiable).
"""

from __future__ import annotations

import torch


def top_p_truncated(y: torch.Tensor, targets: torch.Tensor, top_p: float) -> torch.Tensor:
    """y [..., V] scaled logits, targets [...] long (the sampled token; negative: none) -> y with -inf outside the
    nucleus of mass top_p (a new tensor; y itself when top_p >= 1)."""
    if top_p >= 1.0:
        return y
    sorted_y, order = y.sort(dim=-1)  # ascending [..., V]
    drop_sorted = sorted_y.softmax(-1).cumsum_(-1) <= 1 - top_p  # [..., V] in sorted order
    drop_sorted[..., -1] = False  # the most likely token always stays
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocabulary order
    drop.scatter_(-1, targets.clamp(min=0).unsqueeze(-1), False)
    return y.masked_fill(drop, float("-inf"))


def entropy_of(logp_all: torch.Tensor, truncated: bool) -> torch.Tensor:
    """-sum(p log p) over the last dim of log-probs; truncated: they may hold -inf (p = 0 there adds 0, which
    takes one more [.., V] buffer, so only then)."""
    p = logp_all.exp()
    return -(p.mul_(logp_all.nan_to_num(neginf=0.0) if truncated else logp_all)).sum(-1)
