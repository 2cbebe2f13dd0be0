"""GRPO with context parallelism: rollouts outside CP, the policy-gradient step under CP.

    torchrun --nproc-per-node N -m trainer.rl model.cp=2 model.cp_style=ulysses ...

    per step:
      1. HFRolloutEngine.sync(policy)              full weights -> a plain copy on every rank
      2. each rank: prompts_per_step / world prompts, group_size samples each (trainer/rl/rollout/hf.py); prompts
         from rollout.task (data.source=builtin) or a user dataset (trainer/rl/prompts.py load_rl_prompts)
         rewards fn(prompts, completions, **columns) -> weighted sum; group advantages (complete groups,
         local); rollout.skip_zero_advantage drops all-equal-reward groups from training
         then every rank waits for the slowest generator (rollout.timeout_s, a gloo group of its own)
      3. all_gather_object inside the cp group     every cp rank holds its dp group's rollouts
      4. pack prompt+completion documents into rows; ranks pad to the same number of micro-batches
         (data.max_tokens_per_rank: every rank's rollouts gathered and planned together into token-budget
         micro-batches, each at its own CP degree under model.cp_dynamic: trainer/planning/token_budget.py)
      5. per micro-batch: cp.setup_cp_params + cp.shard(old log-probs, advantages, weights)
         log-probs at temperature T on the local shard (trainer/loss.py: the LM head in token chunks, no
         full logits) -> loss.type policy loss
         (trainer/rl/policy_losses.py: grpo, dr_grpo, dapo, gspo)
         loss_r = sum(w * loss) / N_global  (N = tokens, sequences, or dr_grpo's constant)
      6. clip, AdamW; metrics.jsonl + W&B (reward, advantages, clip fraction, KL, entropy, lengths);
         sample completions as a table
    around the steps: trainer/engine.py (build, resume, checkpoints, the HF export); greedy eval accuracy on
    held-out prompts before the first step and after the last
"""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig

import cp
from models.adapters.lora import adapters_disabled
from trainer import config, modeling
from trainer.rl import grpo, policy_losses, tasks
from trainer.run import runtime
from trainer.engine import (CONFIG_DIR, Trainer, check_finite, finish, global_sum, maybe_resume, metrics_logger,
                            optimizer_step, summary_line, training_run, training_steps)
from trainer.loss import shard_logprobs
from trainer.rl.prompts import PromptSampler, load_rl_prompts, make_eval_prompts, make_prompts, split_eval_prompts
from trainer.rl.logprob_mismatch import is_weights, mismatch_sums
from trainer.rl.rollout import build_engine
from trainer.rl.async_rollouts import RolloutProducer, lag_histogram, split_stale
from trainer.rl.rollout.base import RolloutEngine, SamplingSettings, check_versions
from trainer.planning.token_budget import EMPTY_PASS_TOKENS
from trainer.data.tokenizer import pad_token_id


def check_init_model(cfg: DictConfig) -> None:
    name = cfg.model.name
    if not name.startswith(modeling.TINY_PREFIX) and name.startswith(("outputs", ".", "/")) and not Path(name).exists():
        raise ValueError(f"model.name={name} does not exist: run the SFT default first "
                         "(torchrun --nproc-per-node 2 -m trainer.sft writes outputs/sft/hf), or set model.name")


def _columns(prompts: list) -> dict:
    """Per-completion reward columns: {name: [value per completion]} (None where a row lacks the column)."""
    rows = [p.reward_columns() for p in prompts]
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in names}


def sampling_settings(cfg, step: int) -> SamplingSettings:
    """Sampling for the rollouts of step `step` + 1 (a seed per step and rank, the same in sync and async runs)."""
    r, rank = cfg.rollout, dist.get_rank()
    return SamplingSettings(n=r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                            top_p=r.top_p, seed=cfg.seed * 1_000_003 + step * 10_007 + rank * 101)


def generate_rollouts(cfg, trainer: Trainer, engine: RolloutEngine, prompts, rewards, *,
                      step: int | None = None, synchronous: bool = True) -> tuple[list, dict]:
    """This rank's rollouts for step `step` + 1 (default: the trainer's next) with rewards and group advantages, and
    reward sums for logging. All of the rank's prompts go to the engine at once; in the synchronous loop every
    completion must carry this step's weight version (async: the consumer measures and bounds the lag).
    rewards: batched fn(prompts, completions, **columns) or per-sample fn(prompt, completion, answer) (adapted)."""
    step = trainer.step if step is None else step
    rewards = [tasks.as_batched(fn) for fn in rewards]
    groups = engine.sample([p.input_ids for p in prompts], sampling_settings(cfg, step))
    if synchronous:
        check_versions([c for group in groups for c in group], expected=step)
    sampled = [(prompt, c) for prompt, group in zip(prompts, groups) for c in group]  # group by group
    texts = [engine_decode(trainer.tokenizer, c.token_ids) for _, c in sampled]
    owners = [prompt for prompt, _ in sampled]
    scores = tasks.score(rewards, [p.prompt for p in owners], texts, _columns(owners))  # [reward][completion]
    rollouts, sums, samples = [], {"reward": 0.0, "reward_sq": 0.0, "n": 0.0, "length": 0.0, "max_length": 0.0,
                                   **{f"reward_{name}": 0.0 for name in cfg.reward.functions}}, []
    for j, ((prompt, completion), text) in enumerate(zip(sampled, texts)):
        parts = [values[j] for values in scores]
        total = sum(w * p for w, p in zip(cfg.reward.weights, parts))
        rollouts.append(grpo.Rollout(prompt.input_ids, completion.token_ids, completion.logprobs, total,
                                     version=completion.version))
        for name, p in zip(cfg.reward.functions, parts):
            sums[f"reward_{name}"] += p
        sums["reward"] += total
        sums["reward_sq"] += total * total
        sums["n"] += 1
        sums["length"] += len(completion.token_ids)
        sums["max_length"] = max(sums["max_length"], len(completion.token_ids))
        if len(samples) < 4:
            samples.append([prompt.prompt, text, prompt.answer, total])
    assign_advantages(cfg, rollouts)
    return rollouts, {**sums, "samples": samples}


def engine_decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def assign_advantages(cfg, rollouts: list) -> None:
    """Group advantages, in place (groups of rollout.group_size consecutive rollouts)."""
    g = cfg.rollout.group_size
    for start in range(0, len(rollouts), g):
        group = rollouts[start:start + g]
        advantages = grpo.group_advantages(torch.tensor([x.reward for x in group]), g,
                                           scale=policy_losses.scale_advantages(cfg))
        for rollout, adv in zip(group, advantages.tolist()):
            rollout.advantage = adv


def drop_zero_advantage_groups(cfg, rollouts: list) -> tuple[list, int, int]:
    """(rollouts to train on, groups, groups dropped): under rollout.skip_zero_advantage (DAPO's dynamic
    sampling) the groups whose rewards are all equal carry no policy gradient and are dropped."""
    if not policy_losses.skip_zero_advantage(cfg):
        return rollouts, 0, 0
    g, kept, groups = cfg.rollout.group_size, [], 0
    for start in range(0, len(rollouts), g):
        group = rollouts[start:start + g]
        groups += 1
        if max(x.reward for x in group) != min(x.reward for x in group):
            kept += group
    return kept, groups, groups - len(kept) // g


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


def grpo_backward(cfg, trainer: Trainer, batches: list[tuple[grpo.RolloutRows, object]], ref_model=None) -> dict:
    """Forward + backward of every micro-batch (rows, the ParallelDims / CPSubgroup it runs under; None: this
    rank alone) with the loss.type policy loss; returns globally reduced statistics, the engine-trainer log-prob
    mismatch among them. rollout.old_logprobs=trainer: the ratio divides by the policy's own log-probs at the
    sampling weights, i.e. this forward's, detached (this step's weights sampled the rollouts); the loss is then
    weighted by rollout.is_correction (trainer/rl/logprob_mismatch.py)."""
    device, T, chunk, r = trainer.device, cfg.rollout.temperature, cfg.model.head_chunk_tokens, cfg.rollout
    policy_loss = policy_losses.get_policy_loss(cfg.loss.type)
    settings = policy_losses.LossSettings(clip_low=cfg.loss.clip_eps_low, clip_high=cfg.loss.clip_eps_high,
                                          kl_coef=cfg.loss.kl_coef)
    shards = []
    for rows, dims in batches:
        batch = cp.setup_cp_params(rows.input_ids.to(device), dims, labels=rows.labels.to(device),
                                   seq_lens=rows.seq_lens, style=None if dims else "ulysses")
        extra = [cp.shard(t.to(device), batch.params) for t in (rows.old_logp, rows.advantages, rows.weights)]
        seq_ids, versions = (cp.shard(t.to(device), batch.params, pad_value=-1) for t in (rows.seq_ids, rows.versions))
        shards.append((batch, seq_ids, versions, rows.seq_lengths.to(device), *extra))
    norm = policy_loss.normalizer(global_sum(sum(float(w.sum()) for *_, w in shards), trainer), cfg)
    stats = dict.fromkeys(("loss", "clipped", "kl", "entropy", "tokens", "mismatch_abs", "mismatch_k3",
                           "is_weight", "is_capped", "lagged_tokens", "lagged_abs", "lagged_k3"), 0.0)
    ratio_max = 0.0
    for i, (batch, seq_ids, versions, seq_lengths, engine_logp, adv, weight) in enumerate(shards):
        trainer.model.set_requires_gradient_sync(i == len(shards) - 1)
        logp, entropy = shard_logprobs(trainer.model, batch, temperature=T, entropy=True, chunk_tokens=chunk,
                                       top_p=r.top_p)
        ref_logp = None
        if ref_model is not None:
            with torch.no_grad(), adapters_disabled(ref_model):  # LoRA: the policy itself, adapters off
                ref_logp, _ = shard_logprobs(ref_model, batch, temperature=T, chunk_tokens=chunk, top_p=r.top_p)
        mask = (batch.labels != grpo.IGNORE_INDEX).float()
        old_logp = logp.detach() if r.old_logprobs == "trainer" else engine_logp
        tokens = policy_losses.TokenBatch(logp, old_logp, adv, mask, ref_logp=ref_logp, seq_ids=seq_ids,
                                          seq_lengths=seq_lengths, cp_group=batch.params.cp_group)
        loss_tok, loss_stats = policy_loss.token_loss(tokens, settings)
        if r.is_correction != "none":
            is_w, capped = is_weights(tokens, engine_logp, r.is_correction, r.is_cap)
            loss_tok = loss_tok * is_w
            stats["is_weight"] += float(is_w.sum())
            stats["is_capped"] += capped
        loss = policy_losses.rank_loss(loss_tok, weight, mask, norm)
        loss.backward()
        mismatch = mismatch_sums(logp, engine_logp, mask)
        ratio_max = max(ratio_max, mismatch.pop("mismatch_ratio_max"))
        for key, value in mismatch.items():
            stats[key] += value
        lagged = mask * (versions < trainer.step).float()  # sampled by older weights (async GRPO)
        lag = mismatch_sums(logp, engine_logp, lagged)
        stats.update(lagged_tokens=stats["lagged_tokens"] + float(lagged.sum()),
                     lagged_abs=stats["lagged_abs"] + lag["mismatch_abs"], lagged_k3=stats["lagged_k3"] + lag["mismatch_k3"])
        stats["loss"] += loss.item()
        stats["clipped"] += float((loss_stats["clipped"] * mask).sum())
        stats["kl"] += float((loss_stats["kl"] * mask).sum())
        stats["entropy"] += float((entropy * mask).sum())
        stats["tokens"] += float(mask.sum())
    reduced = {k: global_sum(v, trainer) for k, v in stats.items()}
    tokens = max(reduced["tokens"], 1.0)
    metrics = {"loss": reduced["loss"], "clip_frac": reduced["clipped"] / tokens, "kl": reduced["kl"] / tokens,
               "entropy": reduced["entropy"] / tokens, "train_tokens": int(reduced["tokens"]),
               "logp_mismatch_abs_mean": reduced["mismatch_abs"] / tokens,
               "logp_mismatch_kl": reduced["mismatch_k3"] / tokens,
               "logp_mismatch_ratio_max": global_max(ratio_max)}
    if r.is_correction != "none":
        metrics.update(is_weight_mean=reduced["is_weight"] / tokens, is_capped_frac=reduced["is_capped"] / tokens)
    if r.max_off_policy_steps:  # the mismatch apart for lag 0 (the engine's numerics alone) and lag >= 1 (+ the lag)
        lagged, fresh = reduced["lagged_tokens"], tokens - reduced["lagged_tokens"]
        metrics.update(lagged_token_frac=lagged / tokens,
                       logp_mismatch_abs_mean_lag0=(reduced["mismatch_abs"] - reduced["lagged_abs"]) / max(fresh, 1),
                       logp_mismatch_kl_lag0=(reduced["mismatch_k3"] - reduced["lagged_k3"]) / max(fresh, 1),
                       logp_mismatch_abs_mean_lagged=reduced["lagged_abs"] / max(lagged, 1),
                       logp_mismatch_kl_lagged=reduced["lagged_k3"] / max(lagged, 1))
    return metrics


def global_max(value: float) -> float:
    t = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def reward_metrics(sums: dict, trainer: Trainer, rollouts: list, cfg) -> dict:
    """Reward, advantage and length statistics over ALL ranks' rollouts (each counted once)."""
    adv = [r.advantage for r in rollouts]
    local = {**{k: v for k, v in sums.items() if k not in ("samples", "max_length")},
             "adv": sum(adv), "adv_abs": sum(abs(a) for a in adv), "adv_sq": sum(a * a for a in adv)}
    totals = {k: global_sum(v, trainer) for k, v in local.items()}
    n = max(totals["n"], 1.0)
    mean, adv_mean = totals["reward"] / n, totals["adv"] / n
    max_len = torch.tensor(sums["max_length"])
    dist.all_reduce(max_len, op=dist.ReduceOp.MAX)
    std = lambda sq, m: max(sq / n - m * m, 0.0) ** 0.5
    metrics = {"reward_mean": mean, "reward_std": std(totals["reward_sq"], mean),
               "completion_len_mean": totals["length"] / n, "completion_len_max": float(max_len),
               "adv_mean": adv_mean, "adv_abs_mean": totals["adv_abs"] / n, "adv_std": std(totals["adv_sq"], adv_mean)}
    metrics.update({f"reward_{name}": totals[f"reward_{name}"] / n for name in cfg.reward.functions})
    return metrics


def wait_for_generation(wait_group) -> None:
    """Every rank waits here for the slowest one to finish generating, up to rollout.timeout_s (a gloo
    group of its own), so the collectives after it need only the ordinary timeout_s."""
    if wait_group is not None:
        dist.barrier(group=wait_group)


def evaluate(cfg, trainer: Trainer, engine: RolloutEngine, prompts, wait_group=None) -> float:
    """Greedy accuracy on held-out prompts, split over all ranks, each rank's share in one engine call (built-in
    tasks: the <answer> tag; a user dataset: extract_final_answer)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    grade = tasks.correctness_reward if cfg.data.source == "builtin" else tasks.open_correctness_reward
    mine = prompts[rank::world]
    completions = engine.greedy([p.input_ids for p in mine], max_new_tokens=cfg.rollout.max_new_tokens)
    correct = sum(grade(p.prompt, engine_decode(trainer.tokenizer, c), p.answer) for p, c in zip(mine, completions))
    wait_for_generation(wait_group)
    t = torch.tensor([correct, len(mine)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / max(t[1], 1))


def sync_engine(engine: RolloutEngine, trainer: Trainer) -> dict:
    """The policy's weights to the engine as version trainer.step (optimizer steps applied), unless it has them."""
    if engine.version == trainer.step:
        return {}
    return engine.sync(trainer.model, trainer.step)


def rl_step(cfg, trainer: Trainer, engine: RolloutEngine, sampler, rewards, ref_model, pad_id,
            wait_group=None, producer: RolloutProducer | None = None) -> tuple[dict, list]:
    """One optimizer step; its rollouts come from the synchronous path (sync weights | generate) or, with
    rollout.max_off_policy_steps >= 1, from the producer that generated them while earlier steps trained (the
    weights go to the engine right after the optimizer step). Times: sync, generate, train apart."""
    start = time.perf_counter()
    runtime.reset_peak_memory(trainer.device)
    if producer is None:
        sync = sync_engine(engine, trainer)
        synced = time.perf_counter()
        rollouts, sums = generate_rollouts(cfg, trainer, engine, sampler.next_prompts(), rewards)
        wait_for_generation(wait_group)
        generated = time.perf_counter()
        timing = {"sync_s": synced - start, "generate_s": generated - synced}
        extra = {}
    else:
        rollouts, sums, timing, extra = take_async_batch(cfg, trainer, producer, sampler, wait_group)
        generated = time.perf_counter()
    metrics = reward_metrics(sums, trainer, rollouts, cfg)
    metrics.update(extra)
    train, groups, dropped = drop_zero_advantage_groups(cfg, rollouts)
    if policy_losses.skip_zero_advantage(cfg):
        metrics["groups_skipped_frac"] = global_sum(dropped, trainer) / max(global_sum(groups, trainer), 1.0)
    if trainer.budget:
        batches, plan_metrics = token_budget_micro_batches(cfg, trainer, train, pad_id)
        metrics.update(plan_metrics)
    else:
        batches = micro_batches(cfg, trainer, gather_cp_group(train, trainer), pad_id)
    lr = trainer.scheduler.get_last_lr()[0]
    metrics.update(grpo_backward(cfg, trainer, batches, ref_model))
    check_finite(metrics["loss"], trainer.step + 1)
    metrics.update(lr=lr, grad_norm=optimizer_step(trainer))
    trainer.step += 1
    trained = time.perf_counter()
    if producer is not None:  # the new weights to the engine now: the producer's requests go on with them
        sync = engine.sync(trainer.model, trainer.step, in_flight=True)
        producer.notify_version()
        timing["sync_s"] = time.perf_counter() - trained
    end = time.perf_counter()
    metrics.update(step_time_s=end - start, train_s=trained - generated, **timing,
                   tokens_per_s=metrics["train_tokens"] / (end - start),
                   train_tokens_per_s=metrics["train_tokens"] / (trained - generated),
                   peak_mem_gb=runtime.peak_memory_gb(trainer.device),
                   **{k: v for k, v in sync.items() if k in ("sync_bytes", "sync_buckets")})
    return metrics, sums["samples"]


def take_async_batch(cfg, trainer: Trainer, producer: RolloutProducer, sampler,
                     wait_group=None) -> tuple[list, dict, dict, dict]:
    """The producer's rollouts for this step (trainer/rl/async_rollouts.py): waited for (trainer idle time), the
    prompts checked against the checkpointed sampler, groups older than rollout.max_off_policy_steps dropped and
    counted, the lag histogram over every rank's rollouts."""
    k, step = cfg.rollout.max_off_policy_steps, trainer.step + 1
    batch, waited = producer.take(step, cfg.rollout.timeout_s)
    wait_for_generation(wait_group)  # the slowest rank's producer, before the step's collectives
    expected = [p.prompt for p in sampler.next_prompts()]  # the sampler as consumed: what a checkpoint resumes
    if [p.prompt for p in batch.prompts] != expected:
        raise RuntimeError(f"step {step}: the producer's prompts differ from the sampler's (out of order)")
    rollouts, dropped = split_stale(batch.rollouts, cfg.rollout.group_size, trains_at=trainer.step, k=k)
    lags = lag_histogram(rollouts, trains_at=trainer.step, k=k)
    totals = {j: global_sum(n, trainer) for j, n in lags.items()}
    count = max(sum(totals.values()), 1.0)
    engine_idle = producer.pop_engine_idle()
    extra = {**{f"off_policy_lag_{j}_frac": n / count for j, n in totals.items()},
             "stale_dropped": global_sum(dropped, trainer), "trainer_idle_s": waited,
             "engine_idle_s": engine_idle, "batch_age_s": time.perf_counter() - batch.ready_at}
    return rollouts, batch.sums, {"generate_s": batch.generate_s}, extra


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


PROMPT_POOL = 4096  # training prompts drawn per run (the task spaces are small: repeats are fine)


def check_prompt_lengths(cfg, prompts) -> None:
    """Every prompt + rollout.max_new_tokens must fit one packed row (data.seq_len)."""
    budget = cfg.data.seq_len - cfg.rollout.max_new_tokens
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    n = len(prompts[longest].input_ids)
    if n > budget:
        raise ValueError(f"{cfg.data.source} row {longest} is {n} prompt tokens; data.seq_len={cfg.data.seq_len} - "
                         f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves {budget}: raise data.seq_len")


def build_prompt_sets(cfg, tokenizer) -> tuple[list, list]:
    """(training prompt pool, held-out eval prompts). data.source=builtin: the eval prompts cover every task of
    rollout.task in equal shares and are excluded from the pool (rollout.eval_prompts=0: no eval, the whole
    pool). A user dataset: its rows (data.limit: the first N), the last rollout.eval_prompts of them held out."""
    if cfg.data.source != "builtin":
        prompts = load_rl_prompts(cfg.data.source, tokenizer, limit=cfg.data.limit,
                                  system_prompt=cfg.rollout.system_prompt)
        check_prompt_lengths(cfg, prompts)
        return split_eval_prompts(prompts, cfg.rollout.eval_prompts)
    eval_prompts = make_eval_prompts(cfg.rollout.task, cfg.rollout.eval_prompts, tokenizer)
    pool = make_prompts(cfg.rollout.task, PROMPT_POOL, cfg.seed, tokenizer,
                        exclude_prompts={p.prompt for p in eval_prompts})
    return pool, eval_prompts


def run_rl(cfg: DictConfig) -> list[dict]:
    check_init_model(cfg)
    with training_run(cfg, validate=config.validate_rl) as trainer:
        rank, world = dist.get_rank(), dist.get_world_size()
        ref_model = build_reference(cfg, trainer)
        rewards = [tasks.resolve_batched_reward(f, open_answers=cfg.data.source != "builtin")
                   for f in cfg.reward.functions]
        wait_group = runtime.patient_group(cfg.rollout.timeout_s)
        prompts, eval_prompts = build_prompt_sets(cfg, trainer.tokenizer)
        sampler = PromptSampler(prompts, batch_size=cfg.rollout.prompts_per_step // world, dp_rank=rank,
                                dp_size=world, seed=cfg.seed)
        maybe_resume(trainer, sampler)
        pad_id = pad_token_id(trainer.tokenizer)
        logger = metrics_logger(trainer, "rl")
        run_start = time.perf_counter()

        def held_out_eval() -> float:
            """Greedy accuracy at the current weights; a line of output_dir/eval.jsonl (step, accuracy, run time)."""
            sync_engine(engine, trainer)
            accuracy = evaluate(cfg, trainer, engine, eval_prompts, wait_group)
            logger.log_table("eval", ["accuracy", "elapsed_s"], [[accuracy, time.perf_counter() - run_start]],
                             trainer.step)
            return accuracy

        with closing(build_engine(cfg, trainer, wait_group)) as engine:
            eval_start = held_out_eval() if eval_prompts else None
            producer = start_producer(cfg, trainer, engine, sampler, rewards)
            try:
                for _ in training_steps(trainer, sampler):
                    metrics, samples = rl_step(cfg, trainer, engine, sampler, rewards, ref_model, pad_id,
                                               wait_group, producer)
                    every = cfg.rollout.eval_every
                    if eval_prompts and every and trainer.step % every == 0 and trainer.step < cfg.max_steps:
                        metrics["eval_accuracy"] = held_out_eval()
                    logger.log(trainer.step, metrics)
                    logger.log_table("samples", ["prompt", "completion", "answer", "reward"], samples, trainer.step)
            finally:
                if producer is not None:
                    producer.close()
            summary = summary_line("rl", cfg, logger.history, reward_progress)
            if eval_prompts:
                summary += f"; greedy eval accuracy {eval_start:.3f} -> {held_out_eval():.3f}"
        finish(trainer, logger, summary)
    return logger.history


def start_producer(cfg, trainer: Trainer, engine: RolloutEngine, sampler, rewards) -> RolloutProducer | None:
    """rollout.max_off_policy_steps >= 1: the thread generating the next steps' rollouts (None: synchronous)."""
    k = cfg.rollout.max_off_policy_steps
    if not k:
        return None

    def make_batch(step: int, prompts):
        return generate_rollouts(cfg, trainer, engine, prompts, rewards, step=step - 1, synchronous=False)

    sync_engine(engine, trainer)  # a resumed run's weights (the server started from model.name's): the gate needs them
    return RolloutProducer(make_batch, engine, sampler, first_step=trainer.step + 1, k=k).start()


def reward_progress(history: list[dict]) -> str:
    """The summary's middle: mean reward of the first and the last quarter of the steps."""
    k = max(1, len(history) // 4)
    head = sum(h["reward_mean"] for h in history[:k]) / k
    tail = sum(h["reward_mean"] for h in history[-k:]) / k
    return f"reward_mean {head:.3f} (first {k}) -> {tail:.3f} (last {k})"


config.register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="rl", version_base=None)
def main(cfg: DictConfig) -> None:
    run_rl(cfg)


if __name__ == "__main__":
    main()
