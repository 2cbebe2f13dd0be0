"""Two engines' log-probs of the same tokens: the mismatch, measured every step, and its importance-sampling fix.

    per micro-batch, this rank's shard, at completion tokens (mask):
      trainer = the policy's log-probs at the sampling weights (the training forward, detached)
      engine  = what the rollout engine reported for the tokens it sampled
      d = trainer - engine            (log of the ratio p_trainer / p_engine)
    mismatch_sums     sum |d|, sum k3 (exp(d) - 1 - d: estimates KL(engine || trainer) over engine samples),
                      max exp(d), token count -> step metrics logp_mismatch_{abs_mean, kl, ratio_max}
    is_weights        rollout.is_correction (rollout.old_logprobs=trainer): w on each token's loss
                      token_*     w_t = exp(d_t)
                      sequence_*  w_i = exp(sum of d over sequence i's tokens, every cp rank's: policy_losses.sequence_sums)
                      *_truncate  min(w, cap)             (TIS)
                      *_mask      w where 1/cap <= w <= cap, else 0
                      detached: the weight scales the gradient, it is not differentiated

Why both: vLLM and the trainer run different kernels (and, in bf16, round differently), so even at equal weights
p_engine != p_trainer. With rollout.old_logprobs=engine the PPO ratio p_new / p_engine absorbs the difference
(and clips it as if it were a policy change); with old_logprobs=trainer the ratio is exactly 1 at the first
update and the weight above corrects the sampling distribution explicitly (TRL, verl do the same).
"""

from __future__ import annotations

import torch

from trainer.rl.policy_losses import TokenBatch, sequence_sums


def mismatch_sums(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Sums over this shard's completion tokens (reduce over ranks: sums add, ratio_max takes the max)."""
    d = (trainer_logp.detach().float() - engine_logp.float()) * mask
    keep = mask > 0
    ratio_max = float(torch.exp(d[keep]).max()) if bool(keep.any()) else 0.0
    return {"mismatch_abs": float(d.abs().sum()), "mismatch_k3": float(((torch.exp(d) - 1 - d) * mask).sum()),
            "mismatch_ratio_max": ratio_max}


def is_weights(batch: TokenBatch, engine_logp: torch.Tensor, mode: str, cap: float) -> tuple[torch.Tensor, float]:
    """(weight per token [B, S_local], number of tokens the cap changed), for rollout.is_correction=mode."""
    d = (batch.logp.detach().float() - engine_logp.float()) * batch.mask
    level, rule = mode.split("_")
    if level == "sequence":
        seq_log_w = sequence_sums(d, batch)  # [sequences]: the whole sequence's sum over every cp rank
        ids = batch.seq_ids.clamp(min=0)
        log_w = seq_log_w[ids] if seq_log_w.numel() else torch.zeros_like(d)  # [B, S_local]
    else:
        log_w = d
    w = torch.exp(log_w)
    if rule == "truncate":
        capped = w > cap
        w = w.clamp(max=cap)
    else:
        capped = (w > cap) | (w < 1.0 / cap)
        w = torch.where(capped, torch.zeros_like(w), w)
    return (w * batch.mask).to(batch.logp.dtype), float((capped.float() * batch.mask).sum())
