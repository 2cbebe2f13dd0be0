"""Supervised fine-tuning with context parallelism: the entry point and the SFT step (the rest: trainer/engine.py).

    torchrun --nproc-per-node N -m trainer.sft model.cp=2 model.cp_style=ulysses data.seq_len=4096 ...

    hydra compose ─> training_run (validate, ParallelDims(dp x cp), model, apply_cp, FSDP2 over dp_cp)
    data.source ─> load_sft_records ─> tokenize_sft_records (chat template, assistant loss mask)
                ─> PackedLoader(dp rank)                   trainer/data/records.py, chat.py, packing.py
    per optimizer step (sft_step):
        grad_accum micro-batches [B, seq_len] (same on every rank of a cp group)
          ─> cp.setup_cp_params ─> this rank's shard + CPParams
        or data.max_tokens_per_rank: the same documents re-planned (trainer/planning/token_budget.py) into micro-batches
          within the budget per rank, balanced by cost over all dp x cp ranks, each at its own CP degree under
          model.cp_dynamic ─> cp.setup_cp_params(row, the degree's CPSubgroup)
        N = loss tokens of the whole step (all-reduce over dp_cp)
        for each micro-batch: loss_r = token_loss_sum(shard) / N; backward  (FSDP sums grads)
        clip (a non-finite total norm stops before AdamW), AdamW, schedule; metrics.jsonl + W&B;
        checkpoint every N steps (trainer/run/checkpoint.py: complete-or-absent, keep_last, resume rules)
    the end: HF export (output_dir/hf), "sft done: ..." summary
"""

from __future__ import annotations

import time

import hydra
import torch
from omegaconf import DictConfig

import cp
from trainer import config, loss
from trainer.run import runtime
from trainer.data.chat import tokenize_sft_records
from trainer.engine import (CONFIG_DIR, Trainer, check_finite, finish, global_sum, maybe_resume, metrics_logger,
                            optimizer_step, summary_line, training_run, training_steps)
from trainer.data.packing import PackedLoader, sft_row
from trainer.data.records import load_sft_records
from trainer.planning.token_budget import empty_pass
from trainer.data.tokenizer import pad_token_id


def build_sft_loader(cfg: DictConfig, trainer: Trainer) -> PackedLoader:
    records = load_sft_records(cfg.data.source, limit=cfg.data.limit)
    docs = tokenize_sft_records(trainer.tokenizer, records, max_len=cfg.data.seq_len)
    return PackedLoader(docs, seq_len=cfg.data.seq_len, micro_batch_size=cfg.data.micro_batch_size,
                        dp_rank=trainer.dims.dp_rank, dp_size=trainer.dims.dp, seed=cfg.seed,
                        pad_token_id=pad_token_id(trainer.tokenizer))


def backward_on_shards(trainer: Trainer, shards: list[cp.CPBatch]) -> tuple[float, float]:
    """Forward + backward every micro-batch shard; returns (global mean token loss, global loss tokens)."""
    total_tokens = global_sum(sum(loss.count_loss_tokens(s.labels) for s in shards), trainer)
    local_loss = 0.0
    for i, shard in enumerate(shards):
        trainer.model.set_requires_gradient_sync(i == len(shards) - 1)  # reduce-scatter once per step
        micro_loss = loss.shard_loss_sum(trainer.model, shard, chunk_tokens=trainer.cfg.model.head_chunk_tokens)
        micro_loss = micro_loss / max(total_tokens, 1.0)
        micro_loss.backward()
        local_loss += micro_loss.item()
    return global_sum(local_loss, trainer), total_tokens


def fixed_row_shards(trainer: Trainer, loader: PackedLoader, pad: int) -> tuple[list[cp.CPBatch], dict]:
    """grad_accum micro-batches of micro_batch_size rows of data.seq_len, under the run's cp."""
    shards, tokens = [], 0
    for _ in range(trainer.cfg.optim.grad_accum):
        batch = loader.next_batch()
        shards.append(cp.setup_cp_params(batch.input_ids.to(trainer.device), trainer.dims,
                                         labels=batch.labels.to(trainer.device), seq_lens=batch.seq_lens,
                                         pad_token_id=pad))
        tokens += batch.step_tokens
    return shards, {"step_tokens": tokens}


def token_budget_shards(trainer: Trainer, loader: PackedLoader, pad: int) -> tuple[list[cp.CPBatch], dict]:
    """The same documents as fixed rows, planned into token-budget micro-batches (data.max_tokens_per_rank),
    each at its own CP degree under model.cp_dynamic (trainer/planning/token_budget.py); this rank's shards."""
    docs = loader.next_step_docs(trainer.cfg.optim.grad_accum)
    plan = trainer.budget.plan([len(doc) for doc in docs])
    shards = []
    for subgroup, row in trainer.budget.my_rows(plan):
        if not row:
            shards.append(empty_pass(trainer.device, pad))
            continue
        row_docs = [docs[i] for i in row]
        columns, seq_lens = sft_row(row_docs, sum(len(doc) for doc in row_docs), pad)
        ids, labels = (torch.tensor([columns[name]], device=trainer.device) for name in ("input_ids", "labels"))
        shards.append(cp.setup_cp_params(ids, subgroup, labels=labels, seq_lens=[seq_lens], pad_token_id=pad))
    return shards, {"step_tokens": sum(plan.lengths), **plan.metrics()}


def sft_step(trainer: Trainer, loader: PackedLoader) -> dict:
    start = time.perf_counter()
    runtime.reset_peak_memory(trainer.device)
    pad = pad_token_id(trainer.tokenizer)
    shards, extra = (token_budget_shards if trainer.budget else fixed_row_shards)(trainer, loader, pad)
    lr = trainer.scheduler.get_last_lr()[0]
    mean_loss, tokens = backward_on_shards(trainer, shards)
    check_finite(mean_loss, trainer.step + 1)
    grad_norm = optimizer_step(trainer)
    trainer.step += 1
    elapsed = time.perf_counter() - start
    step_tokens = extra.pop("step_tokens")
    return {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "loss_tokens": int(tokens),
            "tokens_per_s": step_tokens / elapsed, "step_time_s": elapsed,
            "peak_mem_gb": runtime.peak_memory_gb(trainer.device), "epoch": loader.epoch, **extra}


def loss_progress(history: list[dict]) -> str:
    """The summary's middle: "loss first -> last, mean tok/s, peak GB/rank"."""
    first, last = history[0], history[-1]
    tps = sum(h["tokens_per_s"] for h in history) / len(history)
    return (f"loss {first['loss']:.4f} -> {last['loss']:.4f}, {tps:.0f} tok/s, "
            f"peak {max(h['peak_mem_gb'] for h in history):.2f} GB/rank")


def run_sft(cfg: DictConfig) -> list[dict]:
    with training_run(cfg, validate=config.validate_sft) as trainer:
        loader = build_sft_loader(cfg, trainer)
        maybe_resume(trainer, loader)
        logger = metrics_logger(trainer, "sft")
        for _ in training_steps(trainer, loader):
            metrics = sft_step(trainer, loader)
            logger.log(trainer.step, metrics)
        finish(trainer, logger, summary_line("sft", cfg, logger.history, loss_progress))
    return logger.history


config.register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="sft", version_base=None)
def main(cfg: DictConfig) -> None:
    run_sft(cfg)


if __name__ == "__main__":
    main()
