"""Supervised fine-tuning with context parallelism.

    torchrun --nproc-per-node N -m trainer.sft model.cp=2 model.cp_style=ulysses data.seq_len=4096 ...

    hydra compose ─> validate (config, then model vs style) ─> ParallelDims(dp x cp).build()
    model ─> models.apply_cp ─> FSDP2 over dp_cp                 tokenizer, chat data ─> PackedLoader(dp rank)
    per optimizer step:
        grad_accum micro-batches [B, seq_len] (same on every rank of a cp group)
          ─> cp.setup_cp_params ─> this rank's shard + CPParams
        N = loss tokens of the whole step (all-reduce over dp_cp)
        for each micro-batch: loss_r = token_loss_sum(shard) / N; backward  (FSDP sums grads)
        clip (a non-finite total norm stops before AdamW), AdamW, schedule; metrics.jsonl + W&B;
        checkpoint every N steps (trainer/checkpoint.py: complete-or-absent, keep_last, resume rules)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig

import cp
from trainer import checkpoint, config, data, loss, modeling, optim, runtime
from trainer.metrics import MetricsLogger

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


@dataclass
class Trainer:
    cfg: DictConfig
    dims: cp.ParallelDims
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tokenizer: object
    step: int = 0
    checkpointed_step: int = -1  # the step of the checkpoint on disk this run saved or resumed from
    io_group: object = None  # gloo group with checkpoint.timeout_s: waits for checkpoint / export writes


def build_trainer(cfg: DictConfig, *, validate=config.validate_sft) -> Trainer:
    """Everything up to the first training step; every check that can fail runs before a CP collective."""
    rank, world, device = runtime.init_distributed(cfg.timeout_s)
    validate(cfg, world)
    runtime.seed_everything(cfg.seed)
    tokenizer_name = data.resolve_tokenizer_name(cfg.data.tokenizer, cfg.model.name)
    tokenizer = data.load_tokenizer(tokenizer_name)
    model = modeling.build_model(cfg.model, len(tokenizer), seed=cfg.seed)
    data.check_tokenizer_fits_model(tokenizer, model, tokenizer_name=tokenizer_name, model_name=cfg.model.name)
    cp.assert_cp_style_supports_model(cfg.model.cp_style, model)
    dims = cp.ParallelDims(world_size=world, cp=cfg.model.cp, cp_style=cfg.model.cp_style,
                           cp_ulysses=cfg.model.cp_ulysses)
    dims.build(device.type)
    modeling.parallelize(model, dims, cfg.model, device)
    optimizer = optim.build_optimizer(model, cfg.optim)
    scheduler = optim.build_scheduler(optimizer, cfg.optim, cfg.max_steps)
    return Trainer(cfg, dims, device, model, optimizer, scheduler, tokenizer,
                   io_group=runtime.patient_group(cfg.checkpoint.timeout_s))


def build_sft_loader(cfg: DictConfig, trainer: Trainer) -> data.PackedLoader:
    records = data.load_sft_records(cfg.data.source, limit=cfg.data.limit)
    docs = data.tokenize_sft_records(trainer.tokenizer, records, max_len=cfg.data.seq_len)
    return data.PackedLoader(docs, seq_len=cfg.data.seq_len, micro_batch_size=cfg.data.micro_batch_size,
                             dp_rank=trainer.dims.dp_rank, dp_size=trainer.dims.dp, seed=cfg.seed,
                             pad_token_id=data.pad_token_id(trainer.tokenizer))


def maybe_resume(trainer: Trainer, loader) -> None:
    """Resume from the latest complete checkpoint (resume=true), or check a fresh run may use output_dir
    (checkpoint.resume_point). Settings come from THIS config (checkpoint.check_resume_config): the lr
    schedule is rebuilt at the resumed step, the AdamW hyper-parameters are re-applied."""
    cfg = trainer.cfg
    path = checkpoint.resume_point(cfg)
    if path is None:
        return
    honoured = checkpoint.check_resume_config(path, cfg, dist.get_world_size())
    extra = checkpoint.load_checkpoint(path, trainer.model, trainer.optimizer)
    loader.load_state_dict(extra["loader"])
    runtime.set_rng_state(extra["rng"])
    trainer.step = trainer.checkpointed_step = extra["step"]
    for group in trainer.optimizer.param_groups:  # the loaded optimizer state carries the saved run's settings
        group.update(betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    trainer.scheduler = optim.build_scheduler(trainer.optimizer, cfg.optim, cfg.max_steps, start_step=trainer.step)
    if honoured and dist.get_rank() == 0:
        print(f"resume from {path}: config changes honoured: {'; '.join(honoured)}", flush=True)


def save(trainer: Trainer, loader) -> None:
    """A checkpoint at the current step, unless the one on disk is already of this step (a run resumed at
    max_steps never rewrites it)."""
    if trainer.step == trainer.checkpointed_step:
        return
    cfg = trainer.cfg
    checkpoint.save_checkpoint(cfg.output_dir, trainer.step, trainer.model, trainer.optimizer,
                               {"loader": loader.state_dict(), "rng": runtime.rng_state()},
                               config=checkpoint.run_config(cfg, dist.get_world_size()),
                               keep_last=cfg.checkpoint.keep_last, group=trainer.io_group)
    trainer.checkpointed_step = trainer.step


def global_sum(value: float, trainer: Trainer) -> float:
    t = torch.tensor(float(value), dtype=torch.float64, device=trainer.device)
    dist.all_reduce(t, group=trainer.dims.dp_cp_group)
    return t.item()


def backward_on_shards(trainer: Trainer, shards: list[cp.CPBatch]) -> tuple[float, float]:
    """Forward + backward every micro-batch shard; returns (global mean token loss, global loss tokens)."""
    total_tokens = global_sum(sum(loss.count_loss_tokens(s.labels) for s in shards), trainer)
    local_loss = 0.0
    for i, shard in enumerate(shards):
        trainer.model.set_requires_gradient_sync(i == len(shards) - 1)  # reduce-scatter once per step
        out = trainer.model(input_ids=shard.input_ids, position_ids=shard.position_ids, cp_params=shard.params)
        micro_loss = loss.token_loss_sum(out.logits, shard.labels) / max(total_tokens, 1.0)
        micro_loss.backward()
        local_loss += micro_loss.item()
    return global_sum(local_loss, trainer), total_tokens


def optimizer_step(trainer: Trainer) -> float:
    clip = trainer.cfg.optim.grad_clip or math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if not math.isfinite(float(grad_norm)):  # the total norm: every rank sees the same value and stops here
        trainer.optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(
            f"non-finite gradient norm {float(grad_norm)} at step {trainer.step + 1}: stopped before the optimizer "
            f"step, nothing saved after step {trainer.step} (lower optim.lr, check the data; resume=true continues "
            "from the last checkpoint)")
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def check_finite(value: float, step: int) -> None:
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite loss {value} at step {step}: stopping (lower optim.lr, check the data)")


def sft_step(trainer: Trainer, loader: data.PackedLoader) -> dict:
    cfg, start = trainer.cfg, time.perf_counter()
    pad = data.pad_token_id(trainer.tokenizer)
    shards = []
    for _ in range(cfg.optim.grad_accum):
        batch = loader.next_batch()
        shards.append(cp.setup_cp_params(batch.input_ids.to(trainer.device), trainer.dims,
                                         labels=batch.labels.to(trainer.device), seq_lens=batch.seq_lens,
                                         pad_token_id=pad))
    lr = trainer.scheduler.get_last_lr()[0]
    mean_loss, tokens = backward_on_shards(trainer, shards)
    check_finite(mean_loss, trainer.step + 1)
    grad_norm = optimizer_step(trainer)
    trainer.step += 1
    elapsed = time.perf_counter() - start
    step_tokens = cfg.optim.grad_accum * cfg.data.micro_batch_size * cfg.data.seq_len * trainer.dims.dp
    return {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "loss_tokens": int(tokens),
            "tokens_per_s": step_tokens / elapsed, "step_time_s": elapsed,
            "peak_mem_gb": runtime.peak_memory_gb(trainer.device), "epoch": loader.epoch}


def summary_line(job: str, cfg, history: list[dict], key: str = "loss") -> str:
    if not history:
        return f"{job}: no steps run (already at max_steps={cfg.max_steps})"
    first, last = history[0], history[-1]
    tps = sum(h["tokens_per_s"] for h in history) / len(history)
    return (f"{job} done: steps {first['step']}-{last['step']}, {key} {first[key]:.4f} -> {last[key]:.4f}, "
            f"{tps:.0f} tok/s, peak {max(h['peak_mem_gb'] for h in history):.2f} GB/rank, "
            f"cp={cfg.model.cp} {cfg.model.cp_style}, output in {cfg.output_dir}")


def run_sft(cfg: DictConfig) -> list[dict]:
    trainer = build_trainer(cfg)
    with runtime.fail_loudly(dist.get_rank()):
        loader = build_sft_loader(cfg, trainer)
        maybe_resume(trainer, loader)
        logger = MetricsLogger(cfg, rank=dist.get_rank(), total_steps=cfg.max_steps, start_step=trainer.step, job="sft")
        while trainer.step < cfg.max_steps:
            metrics = sft_step(trainer, loader)
            logger.log(trainer.step, metrics)
            if cfg.checkpoint.every and trainer.step % cfg.checkpoint.every == 0 and trainer.step < cfg.max_steps:
                save(trainer, loader)
        save(trainer, loader)
        if cfg.checkpoint.export_hf:
            checkpoint.export_hf(cfg.output_dir, trainer.model, trainer.tokenizer, dtype=modeling.export_dtype(cfg),
                                 group=trainer.io_group)
        logger.close(summary_line("sft", cfg, logger.history))
    history = logger.history
    dist.destroy_process_group()
    return history


config.register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="sft", version_base=None)
def main(cfg: DictConfig) -> None:
    run_sft(cfg)


if __name__ == "__main__":
    main()
