"""GRPO pieces as pure functions: group advantages, the clipped per-token objective, packing rollouts.

    rollouts (prompt ids, completion ids, old log-probs, reward) per sample, G samples per prompt; a multi-turn
    episode's completion is every token after the prompt (its sampled turns and the environment's replies), with
    loss_mask True on the sampled tokens only
      ─ group_advantages ─> A_i = (r_i - mean_group) [/ std_group]
      ─ pack_rollouts ─> rows [B, S]: input_ids, labels (sampled completion tokens only, shifted),
                          old_logp, advantages, weights (token: 1, sequence: 1 / completion length)
                          (trainer/data/packing.py next_fit_rows + assemble_row: the SFT loader's packing)
      ─ cp.setup_cp_params + cp.shard ─> this rank's shard
      ─ trainer.rl.policy_losses (loss.type) on logp from the local logits ─> sum(w * loss) / N_global
    seq_ids / seq_lengths: which completion each label belongs to, for sequence-level losses (GSPO)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cp.documents import IGNORE_INDEX  # the one definition (cp.documents)
from trainer.data.packing import assemble_row, next_fit_rows
from trainer.rl.policy_losses import POLICY_LOSSES, LossSettings, TokenBatch


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [N] in groups of `group_size` consecutive samples -> advantages [N]."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    groups = rewards.view(-1, group_size).double()  # [N] -> [N / G, G]
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1).to(rewards.dtype)  # [N / G, G] -> [N]


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *, clip_low: float,
                    clip_high: float, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0):
    """Per-token clipped surrogate (+ k3 KL to the reference). Returns (loss, clipped mask, kl).
    The `grpo` entry of trainer.rl.policy_losses, kept as a function for callers of the old API."""
    settings = LossSettings(clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef)
    batch = TokenBatch(logp, old_logp, advantages, torch.ones_like(logp), ref_logp=ref_logp)
    loss, stats = POLICY_LOSSES["grpo"].token_loss(batch, settings)
    return loss, stats["clipped"], stats["kl"]


@dataclass
class Rollout:
    """One episode of one prompt: the prompt ids, then every later token (single-turn: the sampled completion;
    multi-turn: sampled turns and environment replies, loss_mask telling which were sampled)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    old_logp: list[float]  # the sampling engine's log-prob of each completion token (0.0 where not sampled)
    reward: float
    advantage: float = 0.0
    version: int = 0  # the weight version that sampled its first token (trainer.rl.rollout.base.check_versions)
    loss_mask: list[bool] | None = None  # per completion token: sampled (trained) or not; None: all sampled
    token_versions: list[int] | None = None  # per completion token: the version that sampled it (None: `version`)
    group: int = -1  # the prompt's index in the step: advantages compare a group (-1: consecutive group_size)

    def sampled(self) -> list[bool]:
        return self.loss_mask if self.loss_mask is not None else [True] * len(self.completion_ids)

    @property
    def sampled_count(self) -> int:
        return sum(self.sampled())


@dataclass
class RolloutRows:
    """Packed rows of rollouts, full (unsharded) on every rank of a cp group."""

    input_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S], completion tokens only, already shifted
    old_logp: torch.Tensor  # [B, S] the engine's log-probs at label positions, 0 elsewhere
    advantages: torch.Tensor  # [B, S]
    weights: torch.Tensor  # [B, S] loss weight per label position (0 where no label)
    seq_lens: list[list[int]]
    seq_ids: torch.Tensor | None = None  # [B, S] long: the completion's index in the micro-batch, -1 elsewhere
    seq_lengths: torch.Tensor | None = None  # [completions in the micro-batch]: tokens of each
    versions: torch.Tensor | None = None  # [B, S] long: the weight version that sampled the completion, -1 elsewhere


def _rollout_columns(r: Rollout, seq_id: int, sequence_norm: bool) -> dict[str, list]:
    """One prompt+completion document as assemble_row columns: labels, old log-probs, advantages, weights, seq_ids
    and versions only at the positions that predict a SAMPLED completion token (environment tokens: context only)."""
    n, p = len(r.prompt_ids) + len(r.completion_ids), len(r.prompt_ids)
    labels, old, adv, weight, seq_ids = [IGNORE_INDEX] * n, [0.0] * n, [0.0] * n, [0.0] * n, [-1] * n
    versions = [-1] * n
    sampled, count = r.sampled(), max(r.sampled_count, 1)
    for i, token in enumerate(r.completion_ids):  # position p-1+i predicts completion token i
        if not sampled[i]:
            continue
        labels[p - 1 + i] = token
        old[p - 1 + i] = r.old_logp[i]
        adv[p - 1 + i] = r.advantage
        weight[p - 1 + i] = 1.0 / count if sequence_norm else 1.0
        seq_ids[p - 1 + i] = seq_id
        versions[p - 1 + i] = r.token_versions[i] if r.token_versions is not None else r.version
    return {"input_ids": r.prompt_ids + r.completion_ids, "labels": labels, "old_logp": old, "advantages": adv,
            "weights": weight, "seq_ids": seq_ids, "versions": versions}


def pack_rollouts(rollouts: list[Rollout], *, seq_len: int, rows_per_batch: int, pad_id: int,
                  sequence_norm: bool) -> list[RolloutRows]:
    """Prompt+completion documents packed into rows (trainer.data.packing: next_fit_rows, assemble_row, as SFT),
    grouped into micro-batches."""
    lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
    rows = [[rollouts[i] for i in row] for row in next_fit_rows(lengths, seq_len)]
    pad = {"input_ids": pad_id, "labels": IGNORE_INDEX, "old_logp": 0.0, "advantages": 0.0, "weights": 0.0,
           "seq_ids": -1, "versions": -1}
    batches = []
    for start in range(0, len(rows), rows_per_batch):
        chunk = rows[start:start + rows_per_batch]
        firsts = [sum(len(docs) for docs in chunk[:j]) for j in range(len(chunk))]  # completion ids per row
        packed = [assemble_row([_rollout_columns(r, first + k, sequence_norm) for k, r in enumerate(docs)],
                               seq_len, pad) for docs, first in zip(chunk, firsts)]
        columns = {name: torch.tensor([row[name] for row, _ in packed]) for name in pad}  # RolloutRows fields
        batches.append(RolloutRows(**columns, seq_lens=[seq_lens for _, seq_lens in packed],
                                   seq_lengths=torch.tensor([r.sampled_count for docs in chunk for r in docs])))
    return batches


def empty_rows(seq_len: int, rows: int, pad_id: int) -> RolloutRows:
    """A micro-batch that trains nothing (all pad): keeps ranks in lock-step when they have fewer rows."""
    zeros, none = torch.zeros(rows, seq_len), torch.full((rows, seq_len), -1)
    return RolloutRows(torch.full((rows, seq_len), pad_id), torch.full((rows, seq_len), IGNORE_INDEX), zeros, zeros,
                       zeros, [[seq_len]] * rows, none, torch.zeros(0, dtype=torch.long), none)
