"""Pluggable RL policy losses, selected by `loss.type`: grpo, dr_grpo, dapo, gspo.

    trainer/rl/loop.py, per micro-batch on this rank's CP shard:
      TokenBatch(logp, old_logp, advantages, mask, ref_logp, seq_ids, seq_lengths, cp_group)
        ─ POLICY_LOSSES[loss.type](batch, settings) ─> (per-token loss [B, S_local], stats)
        ─ rank loss = sum(per-token loss * weight * mask) / N_global          (FSDP sums the grads)
    where weight (packed with the rows) and N are the loss's choice:
      grpo     weight 1 (or 1 / completion length for loss.normalization=sequence), N = sum of weights
      dr_grpo  weight 1, N = prompts_per_step * group_size * max_new_tokens (a constant); no std scaling
      dapo     weight 1, N = completion tokens of the step (token-level); clip-higher; drops groups whose
               rewards are all equal (rollout.skip_zero_advantage defaults to true)
      gspo     weight 1 / completion length, N = sequences of the step; the importance ratio is per
               sequence: s_i = exp(mean over sequence i's tokens of logp - old_logp)

Exactness under CP: a sequence's tokens can sit on several cp ranks. Sequence-level quantities are
built from per-sequence sums of this rank's tokens, summed over the cp group by `cp_sum`, an
all-reduce whose backward all-reduces the gradient: every rank then holds the same s_i, each rank's
tokens carry their share (weight 1 / length) of sequence i's loss, and backward hands every rank's
tokens the full d loss / d s_i, as one rank holding the whole sequence would get. Normalisers are
global sums (every rank divides by the same N), so cp=2 equals cp=1 up to summation order.

Adding a loss: subclass PolicyLoss, implement `token_loss`, set the class attributes, register it in
POLICY_LOSSES (README "Extending").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TokenBatch:
    """One micro-batch's shard, every tensor [B, S_local] at label positions (0 / -1 elsewhere)."""

    logp: torch.Tensor  # log-prob of each label under the policy (requires grad)
    old_logp: torch.Tensor  # under the sampling policy
    advantages: torch.Tensor  # the token's sequence's advantage
    mask: torch.Tensor  # 1.0 at completion tokens, 0.0 elsewhere
    ref_logp: torch.Tensor | None = None  # under the frozen reference (loss.kl_coef > 0)
    seq_ids: torch.Tensor | None = None  # long: index of the token's sequence in the micro-batch, -1 elsewhere
    seq_lengths: torch.Tensor | None = None  # [num sequences]: completion tokens of each (whole sequence)
    cp_group: dist.ProcessGroup | None = None  # ranks sharing these sequences (None: not sharded)


@dataclass(frozen=True)
class LossSettings:
    clip_low: float
    clip_high: float
    kl_coef: float = 0.0


class _CPSum(torch.autograd.Function):
    """Sum over the cp group; backward sums the gradient over the group (each rank's loss uses the sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def cp_sum(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Differentiable sum of `x` over the cp group (identity without one or at cp=1)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _CPSum.apply(x, group)


def sequence_sums(values: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Per-sequence sum of `values` over ALL its tokens (every cp rank's), differentiable: [num sequences]."""
    if batch.seq_ids is None or batch.seq_lengths is None:
        raise ValueError("this loss needs per-token sequence ids and lengths (TokenBatch.seq_ids, seq_lengths)")
    ids = batch.seq_ids.reshape(-1)
    keep = ids >= 0
    count = len(batch.seq_lengths)
    # at least one slot: a micro-batch without sequences (lock-step padding) still joins the cp all-reduce
    local = values.new_zeros(max(count, 1)).index_add(0, ids[keep], (values * batch.mask).reshape(-1)[keep])
    return cp_sum(local, batch.cp_group)[:count]


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, settings: LossSettings):
    """-min(r A, clip(r, 1 - low, 1 + high) A) and whether the clipped term was taken."""
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - settings.clip_low, 1 + settings.clip_high) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


class PolicyLoss(ABC):
    """A policy-gradient objective: per-token loss + how tokens are weighted and normalised.

    token_loss(batch, settings) -> (loss [B, S_local], {"clipped": bool [B, S_local], "kl": [B, S_local]})
    sequence_weights: pack weight 1 / completion length per token (True) or 1 (False)
    scale_advantages: None follows loss.scale_advantages; True / False forces it
    skip_zero_advantage: the default of rollout.skip_zero_advantage for this loss
    normalizer(weight_sum, cfg): N, given the global sum of the token weights of the step
    """

    name = ""
    sequence_weights = False
    scale_advantages: bool | None = None
    skip_zero_advantage = False

    @abstractmethod
    def token_loss(self, batch: TokenBatch, settings: LossSettings):
        """(per-token loss [B, S_local], {"clipped": bool, "kl": detached}) on this rank's shard."""

    def normalizer(self, weight_sum: float, cfg) -> float:
        return weight_sum

    def uses_sequence_weights(self, cfg) -> bool:
        return self.sequence_weights

    def _with_kl(self, loss, batch: TokenBatch, settings: LossSettings):
        kl = torch.zeros_like(batch.logp)
        if batch.ref_logp is not None and settings.kl_coef:
            kl = k3_kl(batch.logp, batch.ref_logp)
            loss = loss + settings.kl_coef * kl
        return loss, kl.detach()


class GRPOLoss(PolicyLoss):
    """Per-token clipped surrogate (+ k3 KL); token or sequence normalisation (loss.normalization)."""

    name = "grpo"

    def uses_sequence_weights(self, cfg) -> bool:
        return cfg.loss.normalization == "sequence"

    def token_loss(self, batch, settings):
        loss, clipped = clipped_surrogate(torch.exp(batch.logp - batch.old_logp), batch.advantages, settings)
        loss, kl = self._with_kl(loss, batch, settings)
        return loss, {"clipped": clipped, "kl": kl}


class DrGRPOLoss(GRPOLoss):
    """Dr. GRPO: advantages only centred (no std scaling), the sum of token losses over a constant
    N = prompts_per_step * group_size * max_new_tokens (no length bias from the normaliser)."""

    name = "dr_grpo"
    scale_advantages = False

    def uses_sequence_weights(self, cfg) -> bool:
        return False

    def normalizer(self, weight_sum, cfg):
        r = cfg.rollout
        return float(r.prompts_per_step * r.group_size * r.max_new_tokens)


class DAPOLoss(GRPOLoss):
    """DAPO: token-level normalisation, clip-higher (loss.clip_eps_high > clip_eps_low), dynamic sampling
    (groups with all-equal rewards are dropped: rollout.skip_zero_advantage defaults to true)."""

    name = "dapo"
    skip_zero_advantage = True

    def uses_sequence_weights(self, cfg) -> bool:
        return False


class GSPOLoss(PolicyLoss):
    """GSPO: one importance ratio per sequence, s_i = exp(mean_t (logp - old_logp)), clipped per sequence;
    the loss is the mean over sequences (each token carries 1 / length of its sequence's loss)."""

    name = "gspo"
    sequence_weights = True

    def token_loss(self, batch, settings):
        log_ratio_sum = sequence_sums(batch.logp - batch.old_logp, batch)  # [num sequences], whole sequences
        seq_ratio = torch.exp(log_ratio_sum / batch.seq_lengths.clamp(min=1).to(log_ratio_sum.dtype))
        ids = batch.seq_ids.clamp(min=0)
        ratio = seq_ratio[ids] if seq_ratio.numel() else torch.ones_like(batch.logp)  # [B, S_local]
        loss, clipped = clipped_surrogate(ratio, batch.advantages, settings)
        loss, kl = self._with_kl(loss, batch, settings)
        return loss, {"clipped": clipped, "kl": kl}


def rank_loss(token_loss: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, norm: float) -> torch.Tensor:
    """This rank's share of the step's loss: sum(loss * weight * mask) / N (N global, so FSDP's grad sum is
    the gradient of the step's loss)."""
    return (token_loss * weights * mask).sum() / max(norm, 1e-9)


POLICY_LOSSES: dict[str, PolicyLoss] = {loss.name: loss for loss in (GRPOLoss(), DrGRPOLoss(), DAPOLoss(), GSPOLoss())}


def get_policy_loss(name: str) -> PolicyLoss:
    if name not in POLICY_LOSSES:
        raise ValueError(f"loss.type={name!r}: choose one of {', '.join(POLICY_LOSSES)} "
                         "(or register a PolicyLoss in trainer.rl.policy_losses.POLICY_LOSSES)")
    return POLICY_LOSSES[name]


def skip_zero_advantage(cfg) -> bool:
    """rollout.skip_zero_advantage, or the loss's default when it is null."""
    value = cfg.rollout.skip_zero_advantage
    return get_policy_loss(cfg.loss.type).skip_zero_advantage if value is None else bool(value)


def scale_advantages(cfg) -> bool:
    forced = get_policy_loss(cfg.loss.type).scale_advantages
    return cfg.loss.scale_advantages if forced is None else forced
