"""The training side of GRPO: trajectories -> packed CP micro-batches -> policy loss -> gradients.

    drop_zero_advantage_groups    rollout.skip_zero_advantage (DAPO's dynamic sampling): all-equal groups dropped
    gather_cp_group               fixed rows: every rank of a cp group holds its dp group's rollouts
    micro_batches                 fixed rows of data.seq_len (grpo.pack_rollouts), the same count on every rank
    token_budget_micro_batches    data.max_tokens_per_rank: every rank's rollouts planned together, each row at its
                                  own CP degree (model.cp_dynamic: trainer/planning/token_budget.py)
    grpo_backward                 per micro-batch: cp.setup_cp_params + cp.shard(old log-probs, advantages, weights,
                                  seq ids, versions); log-probs at temperature T (top-p: of the nucleus) on the local
                                  shard (trainer/loss.py: the LM head in token chunks); the loss.type policy loss
                                  (trainer/rl/policy_losses.py) on the SAMPLED tokens only (labels elsewhere are
                                  IGNORE: environment and template tokens are context, never targets);
                                  loss_r = sum(w * loss) / N_global; backward
    build_reference               the frozen reference for the KL term (LoRA: the policy with adapters off)

A multi-turn trajectory is one document like any other: its masked spans (environment replies) sit in the middle,
and a document longer than a rank's share is split over the CP group like any long document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

import cp
from models.adapters.lora import adapters_disabled
from trainer import modeling
from trainer.engine import Trainer, global_sum
from trainer.loss import shard_logprobs
from trainer.planning.token_budget import EMPTY_PASS_TOKENS
from trainer.rl import grpo, policy_losses
from trainer.rl.logprob_mismatch import is_weights, mismatch_sums
from trainer.rl.rollouts import prompt_groups


def drop_zero_advantage_groups(cfg, rollouts: list) -> tuple[list, int, int]:
    """(rollouts to train on, groups, groups dropped): under rollout.skip_zero_advantage (DAPO's dynamic
    sampling) the groups whose rewards are all equal carry no policy gradient and are dropped."""
    if not policy_losses.skip_zero_advantage(cfg):
        return rollouts, 0, 0
    groups = prompt_groups(rollouts, cfg.rollout.group_size)
    varied = [group for group in groups if max(x.reward for x in group) != min(x.reward for x in group)]
    return [x for group in varied for x in group], len(groups), len(groups) - len(varied)


def gather_cp_group(rollouts: list, trainer: Trainer) -> list:
    """Every rank of a cp group gets the union of the group's rollouts, in cp-rank order."""
    if trainer.dims.cp == 1:
        return rollouts
    parts = [None] * trainer.dims.cp
    dist.all_gather_object(parts, rollouts, group=trainer.dims.cp_group)
    return [r for part in parts for r in part]


def micro_batches(cfg, trainer: Trainer, rollouts: list, pad_id: int) -> list[tuple[grpo.RolloutRows, object]]:
    """Fixed rows: (micro_batch_size rows of data.seq_len, the run's ParallelDims) per micro-batch, the same count
    on every rank (empty ones added)."""
    sequence_norm = policy_losses.get_policy_loss(cfg.loss.type).uses_sequence_weights(cfg)
    batches = grpo.pack_rollouts(rollouts, seq_len=cfg.data.seq_len, rows_per_batch=cfg.data.micro_batch_size,
                                 pad_id=pad_id, sequence_norm=sequence_norm)
    count = torch.tensor(max(len(batches), 1))  # >= 1: every group skipped still runs one (empty) pass
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=trainer.dims.dp_cp_group)  # FSDP needs lock-step passes
    batches += [grpo.empty_rows(cfg.data.seq_len, cfg.data.micro_batch_size, pad_id)
                for _ in range(int(count) - len(batches))]
    return [(rows, trainer.dims) for rows in batches]


def token_budget_micro_batches(cfg, trainer: Trainer, rollouts: list, pad_id: int) -> tuple[list, dict]:
    """data.max_tokens_per_rank: every rank's rollouts planned together (trainer/planning/token_budget.py) into
    micro-batches within the budget per rank, each row at its CP degree (model.cp_dynamic); this rank's
    (one packed row, its CPSubgroup; None: an empty pass on this rank alone) per micro-batch, and the plan's
    metrics."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rollouts, group=trainer.dims.dp_cp_group)
    everyone = [r for part in parts for r in part]
    plan = trainer.budget.plan([len(r.prompt_ids) + len(r.completion_ids) for r in everyone])
    sequence_norm = policy_losses.get_policy_loss(cfg.loss.type).uses_sequence_weights(cfg)
    batches = []
    for subgroup, row in trainer.budget.my_rows(plan):
        if not row:
            batches.append((grpo.empty_rows(EMPTY_PASS_TOKENS, 1, pad_id), None))
            continue
        docs = [everyone[i] for i in row]
        length = sum(len(r.prompt_ids) + len(r.completion_ids) for r in docs)
        [rows] = grpo.pack_rollouts(docs, seq_len=length, rows_per_batch=1, pad_id=pad_id,
                                    sequence_norm=sequence_norm)  # one row: the documents back to back
        batches.append((rows, subgroup))
    return batches, plan.metrics()


STAT_KEYS = ("loss", "clipped", "kl", "entropy", "tokens", "mismatch_abs", "mismatch_k3", "is_weight", "is_capped",
             "lagged_tokens", "lagged_abs", "lagged_k3")  # per-rank sums over a step's micro-batches


@dataclass(frozen=True)
class LossRecipe:
    """What the policy-gradient loss needs from the config, read once per step."""

    policy_loss: object  # trainer/rl/policy_losses.py entry of loss.type
    settings: policy_losses.LossSettings
    temperature: float
    top_p: float
    chunk_tokens: int | None
    old_from_trainer: bool  # rollout.old_logprobs=trainer
    is_correction: str
    is_cap: float
    split_lag: bool  # async GRPO: mismatch metrics apart for fresh and lagged tokens

    @classmethod
    def of(cls, cfg) -> "LossRecipe":
        r, loss = cfg.rollout, cfg.loss
        return cls(policy_losses.get_policy_loss(loss.type),
                   policy_losses.LossSettings(clip_low=loss.clip_eps_low, clip_high=loss.clip_eps_high,
                                              kl_coef=loss.kl_coef),
                   r.temperature, r.top_p, cfg.model.head_chunk_tokens, r.old_logprobs == "trainer",
                   r.is_correction, r.is_cap, bool(r.max_off_policy_steps))


@dataclass
class Shard:
    """A micro-batch on this rank: the CP batch and the per-token columns on its shard."""

    batch: object  # cp.CPBatch
    seq_ids: torch.Tensor
    versions: torch.Tensor
    seq_lengths: torch.Tensor
    engine_logp: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor


def shard_rows(rows: grpo.RolloutRows, dims, device) -> Shard:
    """Packed rows -> this rank's shard (dims: the ParallelDims / CPSubgroup they run under; None: alone)."""
    batch = cp.setup_cp_params(rows.input_ids.to(device), dims, labels=rows.labels.to(device),
                               seq_lens=rows.seq_lens, style=None if dims else "ulysses")
    old, adv, weight = (cp.shard(t.to(device), batch.params) for t in (rows.old_logp, rows.advantages, rows.weights))
    seq_ids, versions = (cp.shard(t.to(device), batch.params, pad_value=-1) for t in (rows.seq_ids, rows.versions))
    return Shard(batch, seq_ids, versions, rows.seq_lengths.to(device), old, adv, weight)


def shard_backward(model, shard: Shard, recipe: LossRecipe, norm, *, step: int,
                   ref_model=None) -> tuple[dict, float]:
    """Forward + backward of one shard; (its statistics' sums, its largest engine/trainer ratio)."""
    batch = shard.batch
    logp, entropy = shard_logprobs(model, batch, temperature=recipe.temperature, entropy=True,
                                   chunk_tokens=recipe.chunk_tokens, top_p=recipe.top_p)
    ref_logp = None
    if ref_model is not None:
        with torch.no_grad(), adapters_disabled(ref_model):  # LoRA: the policy itself, adapters off
            ref_logp, _ = shard_logprobs(ref_model, batch, temperature=recipe.temperature,
                                         chunk_tokens=recipe.chunk_tokens, top_p=recipe.top_p)
    mask = (batch.labels != grpo.IGNORE_INDEX).float()  # sampled tokens only: environment tokens have no label
    old_logp = logp.detach() if recipe.old_from_trainer else shard.engine_logp
    tokens = policy_losses.TokenBatch(logp, old_logp, shard.advantages, mask, ref_logp=ref_logp,
                                      seq_ids=shard.seq_ids, seq_lengths=shard.seq_lengths,
                                      cp_group=batch.params.cp_group)
    loss_tok, loss_stats = recipe.policy_loss.token_loss(tokens, recipe.settings)
    sums = dict.fromkeys(STAT_KEYS, 0.0)
    if recipe.is_correction != "none":
        is_w, capped = is_weights(tokens, shard.engine_logp, recipe.is_correction, recipe.is_cap)
        loss_tok = loss_tok * is_w
        sums.update(is_weight=float(is_w.sum()), is_capped=capped)
    loss = policy_losses.rank_loss(loss_tok, shard.weights, mask, norm)
    loss.backward()
    mismatch = mismatch_sums(logp, shard.engine_logp, mask)
    ratio_max = mismatch.pop("mismatch_ratio_max")
    lagged = mask * (shard.versions < step).float()  # sampled by older weights (async GRPO)
    lag = mismatch_sums(logp, shard.engine_logp, lagged)
    sums.update(mismatch, lagged_tokens=float(lagged.sum()), lagged_abs=lag["mismatch_abs"],
                lagged_k3=lag["mismatch_k3"], loss=loss.item(), clipped=float((loss_stats["clipped"] * mask).sum()),
                kl=float((loss_stats["kl"] * mask).sum()), entropy=float((entropy * mask).sum()),
                tokens=float(mask.sum()))
    return sums, ratio_max


def step_metrics(reduced: dict, ratio_max: float, recipe: LossRecipe) -> dict:
    """Global sums -> the step's loss metrics (means over the trained tokens)."""
    tokens = max(reduced["tokens"], 1.0)
    metrics = {"loss": reduced["loss"], "clip_frac": reduced["clipped"] / tokens, "kl": reduced["kl"] / tokens,
               "entropy": reduced["entropy"] / tokens, "train_tokens": int(reduced["tokens"]),
               "logp_mismatch_abs_mean": reduced["mismatch_abs"] / tokens,
               "logp_mismatch_kl": reduced["mismatch_k3"] / tokens, "logp_mismatch_ratio_max": ratio_max}
    if recipe.is_correction != "none":
        metrics.update(is_weight_mean=reduced["is_weight"] / tokens, is_capped_frac=reduced["is_capped"] / tokens)
    if recipe.split_lag:  # the mismatch apart for lag 0 (the engine's numerics alone) and lag >= 1 (+ the lag)
        lagged, fresh = reduced["lagged_tokens"], tokens - reduced["lagged_tokens"]
        metrics.update(lagged_token_frac=lagged / tokens,
                       logp_mismatch_abs_mean_lag0=(reduced["mismatch_abs"] - reduced["lagged_abs"]) / max(fresh, 1),
                       logp_mismatch_kl_lag0=(reduced["mismatch_k3"] - reduced["lagged_k3"]) / max(fresh, 1),
                       logp_mismatch_abs_mean_lagged=reduced["lagged_abs"] / max(lagged, 1),
                       logp_mismatch_kl_lagged=reduced["lagged_k3"] / max(lagged, 1))
    return metrics


def grpo_backward(cfg, trainer: Trainer, batches: list[tuple[grpo.RolloutRows, object]], ref_model=None) -> dict:
    """Forward + backward of every micro-batch (rows, the ParallelDims / CPSubgroup it runs under; None: this
    rank alone) with the loss.type policy loss; returns globally reduced statistics, the engine-trainer log-prob
    mismatch among them. rollout.old_logprobs=trainer: the ratio divides by the policy's own log-probs at the
    sampling weights, i.e. this forward's, detached (this step's weights sampled the rollouts); the loss is then
    weighted by rollout.is_correction (trainer/rl/logprob_mismatch.py)."""
    recipe = LossRecipe.of(cfg)
    shards = [shard_rows(rows, dims, trainer.device) for rows, dims in batches]
    norm = recipe.policy_loss.normalizer(global_sum(sum(float(s.weights.sum()) for s in shards), trainer), cfg)
    totals, ratio_max = dict.fromkeys(STAT_KEYS, 0.0), 0.0
    for i, shard in enumerate(shards):
        trainer.model.set_requires_gradient_sync(i == len(shards) - 1)  # FSDP: reduce gradients once, at the end
        sums, ratio = shard_backward(trainer.model, shard, recipe, norm, step=trainer.step, ref_model=ref_model)
        totals = {key: totals[key] + sums[key] for key in STAT_KEYS}
        ratio_max = max(ratio_max, ratio)
    return step_metrics({key: global_sum(totals[key], trainer) for key in STAT_KEYS}, global_max(ratio_max), recipe)


def global_max(value: float) -> float:
    t = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def build_reference(cfg, trainer: Trainer):
    """A frozen copy of the initial policy under the same CP, for the KL term (kl_coef > 0). LoRA: the policy
    itself, run with its adapters disabled (the base it started from): no second model."""
    if not cfg.loss.kl_coef:
        return None
    if cfg.model.lora.rank is not None:
        return trainer.model
    ref = modeling.build_model(cfg.model, len(trainer.tokenizer), seed=cfg.seed)
    modeling.parallelize(ref, trainer.dims, cfg.model, trainer.device)
    ref.requires_grad_(False)
    return ref.eval()
