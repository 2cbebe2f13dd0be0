"""GRPO with context parallelism, as the algorithm reads: rollouts on one side, training on the other.

    torchrun --nproc-per-node N -m trainer.rl model.cp=2 model.cp_style=ulysses rollout.env=... ...

    per step:
      1. engine.sync(policy)                     the policy's weights to the rollout engine (hf: a plain copy;
                                                 vllm: buckets through vLLM's weight-transfer protocol)
      2. rollouts (trainer/rl/rollouts.py)       this rank's prompts (rollout.task, a dataset, or the environment's
                                                 own rows) -> episodes in rollout.env (trainer/rl/episodes.py: token
                                                 in / token out, environment tokens masked) -> rewards -> group
                                                 advantages -> [grpo.Rollout]; then every rank waits for the slowest
                                                 generator (rollout.timeout_s, a gloo group of its own)
         async (rollout.max_off_policy_steps = k): the producer thread made them while earlier steps trained
      3. training (trainer/rl/training.py)       rollouts -> packed CP micro-batches (fixed rows or token budgets,
                                                 dynamic CP) -> the policy loss on sampled tokens -> gradients
      4. clip, AdamW; metrics.jsonl + W&B; samples; output_dir/rollouts.jsonl (episodes: rollout.log_episodes)
    around the steps: trainer/engine.py (build, resume, checkpoints, the HF export); greedy eval on held-out
    prompts before the first step and after the last
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from trainer import config, modeling
from trainer.data.tokenizer import pad_token_id
from trainer.engine import (CONFIG_DIR, Trainer, check_finite, finish, global_sum, maybe_resume, metrics_logger,
                            optimizer_step, summary_line, training_run, training_steps)
from trainer.rl import policy_losses, tasks
from trainer.rl.async_rollouts import RolloutProducer, lag_histogram, split_stale
from trainer.rl.envs import resolve_env
from trainer.rl.episode_log import EpisodeLog
from trainer.rl.prompts import (PromptSampler, env_prompts, load_rl_prompts, make_eval_prompts, make_prompts,
                                split_eval_prompts)
from trainer.rl.rendering import check_template
from trainer.rl.rollout import build_engine
from trainer.rl.rollout.base import RolloutEngine
from trainer.rl.rollouts import RolloutMaker, reward_metrics
from trainer.rl.training import (build_reference, drop_zero_advantage_groups, gather_cp_group, grpo_backward,
                                 micro_batches, token_budget_micro_batches)
from trainer.run import runtime


def check_init_model(cfg: DictConfig) -> None:
    name = cfg.model.name
    if not name.startswith(modeling.TINY_PREFIX) and name.startswith(("outputs", ".", "/")) and not Path(name).exists():
        raise ValueError(f"model.name={name} does not exist: run the SFT default first "
                         "(torchrun --nproc-per-node 2 -m trainer.sft writes outputs/sft/hf), or set model.name")


def wait_for_generation(wait_group) -> None:
    """Every rank waits here for the slowest one to finish generating, up to rollout.timeout_s (a gloo
    group of its own), so the collectives after it need only the ordinary timeout_s."""
    if wait_group is not None:
        dist.barrier(group=wait_group)


def sync_engine(engine: RolloutEngine, trainer: Trainer) -> dict:
    """The policy's weights to the engine as version trainer.step (optimizer steps applied), unless it has them."""
    if engine.version == trainer.step:
        return {}
    return engine.sync(trainer.model, trainer.step)


@dataclass
class RLRun:
    """What a GRPO run holds across steps: the two sides and what joins them."""

    trainer: Trainer  # the policy under CP + FSDP, its optimizer, dims, token budgets
    engine: RolloutEngine  # hf or vllm
    maker: RolloutMaker  # the rollouts side: environments, episodes, rewards, advantages
    sampler: PromptSampler  # this rank's prompts per step (checkpointed)
    ref_model: object = None  # the KL reference (None: loss.kl_coef = 0)
    pad_id: int = 0
    wait_group: object = None  # a gloo group waiting up to rollout.timeout_s for the slowest generator
    producer: RolloutProducer | None = None  # async GRPO's producer thread (None: synchronous)


def rl_step(cfg, run: RLRun) -> tuple[dict, dict]:
    """One optimizer step; its rollouts come from the synchronous path (sync weights | episodes) or, with
    rollout.max_off_policy_steps >= 1, from the producer that made them while earlier steps trained (the weights go
    to the engine right after the optimizer step). Times: sync, generate, train apart. Returns the metrics and
    the step's sums (samples and episode records among them)."""
    trainer, engine, producer, wait_group = run.trainer, run.engine, run.producer, run.wait_group
    start = time.perf_counter()
    runtime.reset_peak_memory(trainer.device)
    if producer is None:
        sync = sync_engine(engine, trainer)
        synced = time.perf_counter()
        rollouts, sums = run.maker.generate(engine, run.sampler.next_prompts(), trainer.step)
        wait_for_generation(wait_group)
        generated = time.perf_counter()
        timing = {"sync_s": synced - start, "generate_s": generated - synced}
        extra = {}
    else:
        rollouts, sums, timing, extra = take_async_batch(cfg, trainer, producer, run.sampler, wait_group)
        generated = time.perf_counter()
    metrics = reward_metrics(sums, rollouts)
    metrics.update(extra)
    metrics.update(engine.step_metrics())
    train, groups, dropped = drop_zero_advantage_groups(cfg, rollouts)
    if policy_losses.skip_zero_advantage(cfg):
        metrics["groups_skipped_frac"] = global_sum(dropped, trainer) / max(global_sum(groups, trainer), 1.0)
    if trainer.budget:
        batches, plan_metrics = token_budget_micro_batches(cfg, trainer, train, run.pad_id)
        metrics.update(plan_metrics)
    else:
        batches = micro_batches(cfg, trainer, gather_cp_group(train, trainer), run.pad_id)
    lr = trainer.scheduler.get_last_lr()[0]
    metrics.update(grpo_backward(cfg, trainer, batches, run.ref_model))
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
    return metrics, sums


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


def evaluate(maker: RolloutMaker, engine: RolloutEngine, prompts: list, *, open_answers: bool,
             wait_group=None) -> tuple[float, dict[str, float]]:
    """Greedy score on held-out prompts, split over all ranks, each rank's share in one engine call per turn
    (single_turn: the task's accuracy; another environment: its mean reward), and the mean of each reward part."""
    rank, world = dist.get_rank(), dist.get_world_size()
    score, count, parts = maker.evaluate(engine, prompts[rank::world], open_answers=open_answers)
    wait_for_generation(wait_group)
    t = torch.tensor([score, count], dtype=torch.float64)
    dist.all_reduce(t)
    gathered = [None] * world
    dist.all_gather_object(gathered, parts)
    names = sorted({name for part in gathered for name in part})
    count = max(float(t[1]), 1.0)
    return float(t[0]) / count, {name: sum(part.get(name, 0.0) for part in gathered) / count for name in names}


PROMPT_POOL = 4096  # training prompts drawn per run (the task spaces are small: repeats are fine)
EVAL_ROWS_SEED = 7_919  # an environment's eval rows (make_rows), excluded from its training pool


def check_prompt_lengths(cfg, prompts) -> None:
    """Every prompt + rollout.max_new_tokens must fit one packed row (data.seq_len)."""
    budget = cfg.data.seq_len - cfg.rollout.max_new_tokens
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    n = len(prompts[longest].input_ids)
    if n > budget:
        raise ValueError(f"{cfg.data.source} row {longest} is {n} prompt tokens; data.seq_len={cfg.data.seq_len} - "
                         f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves {budget}: raise data.seq_len")


def build_prompt_sets(cfg, tokenizer) -> tuple[list, list]:
    """(training prompt pool, held-out eval prompts). A user dataset (data.source): its rows (data.limit: the
    first N), the last rollout.eval_prompts of them held out. data.source=builtin: the environment's own rows if it
    makes them (make_rows: eval rows from another seed, excluded from the pool), else rollout.task's prompts with
    eval prompts covering every task of the mix in equal shares (rollout.eval_prompts=0: no eval, the whole pool)."""
    if cfg.data.source != "builtin":
        prompts = load_rl_prompts(cfg.data.source, tokenizer, limit=cfg.data.limit,
                                  system_prompt=cfg.rollout.system_prompt)
        check_prompt_lengths(cfg, prompts)
        return split_eval_prompts(prompts, cfg.rollout.eval_prompts)
    env_class = resolve_env(cfg.rollout.env)
    if hasattr(env_class, "make_rows"):
        eval_prompts = env_prompts(env_class.make_rows(cfg.rollout.eval_prompts, EVAL_ROWS_SEED))
        held_out = {p.prompt for p in eval_prompts}
        pool = [p for p in env_prompts(env_class.make_rows(PROMPT_POOL, cfg.seed)) if p.prompt not in held_out]
        return pool, eval_prompts
    eval_prompts = make_eval_prompts(cfg.rollout.task, cfg.rollout.eval_prompts, tokenizer)
    pool = make_prompts(cfg.rollout.task, PROMPT_POOL, cfg.seed, tokenizer,
                        exclude_prompts={p.prompt for p in eval_prompts})
    return pool, eval_prompts


def check_environment(maker: RolloutMaker, tokenizer) -> None:
    """Multi-turn environments: the chat template must extend a conversation without re-rendering it
    (trainer/rl/rendering.py), with the environment's tools; refused at startup, naming the fix."""
    if maker.single_turn:
        return
    probe = maker.env_class(**maker.env_args)
    check_template(tokenizer, maker.runner.stop_ids, getattr(probe, "tools", None))


def run_rl(cfg: DictConfig) -> list[dict]:
    check_init_model(cfg)
    with training_run(cfg, validate=config.validate_rl) as trainer:
        rank, world = dist.get_rank(), dist.get_world_size()
        ref_model = build_reference(cfg, trainer)
        open_answers = cfg.data.source != "builtin"
        rewards = [tasks.resolve_batched_reward(f, open_answers=open_answers) for f in cfg.reward.functions]
        maker = RolloutMaker(cfg, trainer.tokenizer, rewards)
        check_environment(maker, trainer.tokenizer)
        wait_group = runtime.patient_group(cfg.rollout.timeout_s)
        prompts, eval_prompts = build_prompt_sets(cfg, trainer.tokenizer)
        sampler = PromptSampler(prompts, batch_size=cfg.rollout.prompts_per_step // world, dp_rank=rank,
                                dp_size=world, seed=cfg.seed)
        maybe_resume(trainer, sampler)
        pad_id = pad_token_id(trainer.tokenizer)
        logger = metrics_logger(trainer, "rl")
        run_start = time.perf_counter()
        episodes_log = EpisodeLog(Path(cfg.output_dir) / "rollouts.jsonl") if rank == 0 else None

        def held_out_eval() -> float:
            """Greedy score at the current weights; a line of output_dir/eval.jsonl (step, accuracy = the score, run
            time, and an environment's reward parts: reward_env_<part>)."""
            sync_engine(engine, trainer)
            accuracy, parts = evaluate(maker, engine, eval_prompts, open_answers=open_answers, wait_group=wait_group)
            logger.log_table("eval", ["accuracy", "elapsed_s", *parts],
                             [[accuracy, time.perf_counter() - run_start, *parts.values()]], trainer.step)
            return accuracy

        with closing(build_engine(cfg, trainer, wait_group)) as engine, closing(maker):
            eval_start = held_out_eval() if eval_prompts else None
            producer = start_producer(cfg, trainer, engine, sampler, maker)
            run = RLRun(trainer, engine, maker, sampler, ref_model, pad_id, wait_group, producer)
            try:
                for _ in training_steps(trainer, sampler):
                    metrics, sums = rl_step(cfg, run)
                    every = cfg.rollout.eval_every
                    if eval_prompts and every and trainer.step % every == 0 and trainer.step < cfg.max_steps:
                        metrics["eval_accuracy"] = held_out_eval()
                    logger.log(trainer.step, metrics)
                    logger.log_table("samples", ["prompt", "completion", "answer", "reward"], sums["samples"],
                                     trainer.step)
                    if episodes_log is not None:
                        episodes_log.write(trainer.step, sums["episode_records"])
            finally:
                if producer is not None:
                    producer.close()
            summary = summary_line("rl", cfg, logger.history, reward_progress)
            if eval_prompts:
                what = "accuracy" if maker.single_turn else "reward"
                summary += f"; greedy eval {what} {eval_start:.3f} -> {held_out_eval():.3f}"
        finish(trainer, logger, summary)
    return logger.history


def start_producer(cfg, trainer: Trainer, engine: RolloutEngine, sampler,
                   maker: RolloutMaker) -> RolloutProducer | None:
    """rollout.max_off_policy_steps >= 1: the thread generating the next steps' rollouts (None: synchronous)."""
    k = cfg.rollout.max_off_policy_steps
    if not k:
        return None

    def make_batch(step: int, prompts):
        return maker.generate(engine, prompts, step - 1, synchronous=False)

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
