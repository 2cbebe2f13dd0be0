"""The training half of a GRPO step against SFT, on the real model and the same tokens (2 ranks, cp=2 Ulysses,
fp32, FSDP2 + AdamW, one optimizer step each):

    rollouts   per rank 32 documents shaped like the real run's: a small_arith prompt (~40 tokens with the chat
               template) + a completion of 8-48 random tokens (the run's completions: 12-35 on average)
    grpo rows     the GRPO loss in fixed rows (data.seq_len=256, data.micro_batch_size=4: packed rows of 256,
                  4 per micro-batch; what a GRPO config without a token budget runs)
    grpo budget   the GRPO loss in token-budget micro-batches (data.max_tokens_per_rank=2048: the experiment's)
    sft rows      SFT's loss (cross-entropy on the completion tokens) on the same documents packed into
                  2048-token rows, one per micro-batch: what the SFT trainer runs (backward_on_shards)
    tokens/s = every token of the step (prompts and completions) / (packing + forward + backward + optimizer);
    median of `repeats` steps after a warm-up step.

Where the rows case loses: 4 x 256-token rows hold ~3-4 documents each, so a step is many small micro-batches,
each paying FSDP's per-layer all-gathers (forward and backward) and the per-call overheads of 30 layers.
"""

from __future__ import annotations

import random
import statistics
import time


def _rollouts(tokenizer, rank: int, count: int = 32):
    from bench.rollout.common import prompts
    from trainer.rl import grpo

    rng = random.Random(rank)
    ids = prompts(count * 2, tokenizer)[rank::2]
    out = []
    for prompt in ids:
        completion = [rng.randrange(1000, 40000) for _ in range(rng.randint(8, 48))]
        out.append(grpo.Rollout(prompt, completion, [-1.0] * len(completion), 0.0, advantage=rng.uniform(-1, 1)))
    return out


def _grpo_step(cfg, trainer, rollouts):
    from trainer.engine import optimizer_step
    from trainer.rl.training import gather_cp_group, grpo_backward, micro_batches, token_budget_micro_batches

    if trainer.budget:
        batches, _ = token_budget_micro_batches(cfg, trainer, rollouts, 2)
    else:
        batches = micro_batches(cfg, trainer, gather_cp_group(rollouts, trainer), 2)
    grpo_backward(cfg, trainer, batches)
    optimizer_step(trainer)
    return len(batches)


def _sft_step(cfg, trainer, rollouts):
    import cp
    from trainer.engine import optimizer_step
    from trainer.rl import grpo
    from trainer.rl.training import gather_cp_group
    from trainer.sft import backward_on_shards

    everyone = gather_cp_group(rollouts, trainer)
    rows = grpo.pack_rollouts(everyone, seq_len=2048, rows_per_batch=1, pad_id=2, sequence_norm=False)
    shards = [cp.setup_cp_params(r.input_ids, trainer.dims, labels=r.labels, seq_lens=r.seq_lens, pad_token_id=2)
              for r in rows]
    backward_on_shards(trainer, shards)
    optimizer_step(trainer)
    return len(shards)


def _rank(rank: int, world: int, case: str, repeats: int) -> dict:
    import torch.distributed as dist

    from bench.rollout.common import rl_config
    from trainer import config
    from trainer.engine import build_trainer

    overrides = {"grpo rows": ["data.max_tokens_per_rank=null", "data.seq_len=256", "data.micro_batch_size=4"],
                 "grpo budget": ["data.max_tokens_per_rank=2048"],
                 "sft rows": ["data.max_tokens_per_rank=null", "data.seq_len=2048"]}[case]
    cfg = rl_config(["rollout.eval_prompts=0", *overrides])
    trainer = build_trainer(cfg, validate=config.validate_rl)
    rollouts = _rollouts(trainer.tokenizer, rank)
    step = _sft_step if case == "sft rows" else _grpo_step
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        passes = step(cfg, trainer, rollouts)
        dist.barrier()
        times.append(time.perf_counter() - start)
    tokens = [sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)]
    all_tokens = [None] * world
    dist.all_gather_object(all_tokens, tokens[0])
    seconds = statistics.median(times[1:])
    return {"case": case, "tokens": sum(all_tokens), "micro_batches": passes, "step_s": seconds,
            "tokens_per_s": sum(all_tokens) / seconds}


def measure(repeats: int, log) -> list[dict]:
    from bench.launch import spawn

    rows = []
    for case in ("grpo rows", "grpo budget", "sft rows"):
        row = spawn(_rank, 2, "cpu", case, repeats, timeout_s=3600)
        rows.append(row)
        log(f"  {case}: {row['tokens']} tokens in {row['micro_batches']} micro-batches, {row['step_s']:.1f} s, "
            f"{row['tokens_per_s']:.0f} tok/s")
    return rows
