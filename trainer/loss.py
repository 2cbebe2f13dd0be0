"""Losses and log-probs on CP shards, normalised by the GLOBAL token count so gradients equal cp=1.

    rank r (of dp x cp): shard input_ids / position_ids / labels [B, S/cp] (labels shifted, -100 ignored)
    shard_logprobs(model, shard, T)   log p(label) [B, S/cp] (and the entropy), 0 where ignored:
        chunked head installed (model.chunked_head, the default): model(..., token_stats=) -> the LM head
            runs C tokens at a time inside the model's forward; [B, S/cp, V] logits never exist
        otherwise: model(...).logits [B, S/cp, V] -> fp32 -> log_softmax(logits / T) -> gather
        top_p < 1 (GRPO, rollout.top_p): logits / T truncated to the sampled nucleus first (models/nucleus.py)
    shard_loss_sum(model, shard)      SFT: sum of this shard's token cross-entropies = -sum log p(label)
    loss_r = shard_loss_sum / N,   N = loss tokens of the whole step, all ranks, all micro-batches
    sum_r loss_r = the mean token loss of the global batch, and FSDP sums (not averages) gradients
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cp.documents import IGNORE_INDEX  # the one definition (cp.documents)
from models.memory.chunked_head import TokenStatsRequest, has_chunked_head
from models.nucleus import entropy_of, top_p_truncated


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over this shard's loss tokens (fp32) from full logits [B, S, V], labels [B, S]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float, top_p: float = 1.0):
    """Log-prob of each label under softmax(logits / T), truncated to the top-p nucleus when top_p < 1
    (models/nucleus.py: the distribution the engine sampled from), and the entropy (detached), from full logits."""
    safe = labels.clamp(min=0)
    logp_all = F.log_softmax(top_p_truncated(logits.float() / temperature, safe, top_p), dim=-1)  # [B, S_local, V]
    logp = logp_all.gather(-1, safe[..., None]).squeeze(-1)  # [B, S_local]
    return logp, entropy_of(logp_all, top_p < 1).detach()


def _model_inputs(shard) -> dict:
    return {"input_ids": shard.input_ids, "position_ids": shard.position_ids, "cp_params": shard.params}


def shard_logprobs(model, shard, *, temperature: float = 1.0, entropy: bool = False, chunk_tokens: int | None = None,
                   top_p: float = 1.0):
    """(log p(label) [B, S_local] fp32 with grad, entropy [B, S_local] detached or None) of a cp.CPBatch;
    0 where the label is ignored. chunk_tokens: the chunked head's tokens per chunk (None: automatic); top_p < 1:
    of the nucleus the rollout engine sampled from (rollout.top_p)."""
    if has_chunked_head(model):
        stats = model(**_model_inputs(shard), token_stats=TokenStatsRequest(
            shard.labels, temperature=temperature, entropy=entropy, chunk_tokens=chunk_tokens, top_p=top_p))
        return stats.logp, stats.entropy
    logp, ent = token_logprobs(model(**_model_inputs(shard)).logits, shard.labels, temperature, top_p)
    mask = shard.labels != IGNORE_INDEX
    return logp * mask, (ent * mask if entropy else None)


def shard_loss_sum(model, shard, *, chunk_tokens: int | None = None) -> torch.Tensor:
    """SFT: the sum of this shard's token cross-entropies (fp32 scalar)."""
    if has_chunked_head(model):
        return -shard_logprobs(model, shard, chunk_tokens=chunk_tokens)[0].sum()
    return token_loss_sum(model(**_model_inputs(shard)).logits, shard.labels)


def count_loss_tokens(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())
