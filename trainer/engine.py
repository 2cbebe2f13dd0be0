"""What the SFT and GRPO trainers share: the training state, its build, resume, checkpoints, the optimizer
step, global sums, finite checks, the run frame and its end (HF export, summary line).

    trainer/sft.py, trainer/rl/loop.py (entry points: the job's data and its step function)
      with training_run(cfg, validate) as trainer:        init_distributed ─> validate ─> seed ─> tokenizer
                                                          (trainer/data/tokenizer.py) ─> model ─> fits-model check
                                                          ─> ParallelDims(dp x cp).build() ─> apply_cp + FSDP2
                                                          ─> AdamW + schedule     = Trainer (step 0)
          maybe_resume(trainer, loader)                   latest complete checkpoint (resume=true): weights,
                                                          AdamW state, loader position, RNG; schedule rebuilt
          logger = metrics_logger(trainer, job)
          for _ in training_steps(trainer, loader):       until max_steps; save() every checkpoint.every
              job step: ... global_sum(...) over dp x cp  steps and at the end
                        check_finite(loss) ─> optimizer_step (clip; a non-finite norm stops before AdamW)
              logger.log(trainer.step, metrics)
          finish(trainer, logger, summary_line(...))      output_dir/hf (checkpoint.export_hf), the summary
      (leaving the block: destroy_process_group; a dead peer: runtime.fail_loudly exits non-zero)

`loader` is whatever feeds the steps and is saved with the checkpoint (state_dict / load_state_dict):
SFT's PackedLoader, GRPO's PromptSampler.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

import cp
from models.adapters.lora import lora_spec, peft_export_problem
from trainer import config, modeling, optim
from trainer.run import checkpoint, runtime
from trainer.run.metrics import MetricsLogger
from trainer.planning.token_budget import TokenBudget
from trainer.data.tokenizer import check_tokenizer_fits_model, load_tokenizer, resolve_tokenizer_name

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
    budget: TokenBudget | None = None  # data.max_tokens_per_rank: token-budget micro-batches (model.cp_dynamic)


def build_trainer(cfg: DictConfig, *, validate: Callable[[DictConfig, int], None]) -> Trainer:
    """Everything up to the first training step; every check that can fail runs before a CP collective."""
    rank, world, device = runtime.init_distributed(cfg.timeout_s)
    validate(cfg, world)
    runtime.seed_everything(cfg.seed)
    tokenizer_name = resolve_tokenizer_name(cfg.data.tokenizer, cfg.model.name)
    tokenizer = load_tokenizer(tokenizer_name)
    if cfg.data.chat_template:
        tokenizer.chat_template = Path(cfg.data.chat_template).read_text()
    model = modeling.build_model(cfg.model, len(tokenizer), seed=cfg.seed)
    check_tokenizer_fits_model(tokenizer, model, tokenizer_name=tokenizer_name, model_name=cfg.model.name)
    cp.assert_cp_style_supports_model(cfg.model.cp_style, model)
    dims = cp.ParallelDims(world_size=world, cp=cfg.model.cp, cp_style=cfg.model.cp_style,
                           cp_ulysses=cfg.model.cp_ulysses)
    dims.build(device.type)
    budget = None
    if cfg.data.max_tokens_per_rank:  # before FSDP: the cost model counts the full parameters
        budget = TokenBudget.build(dims, model, cfg.data.max_tokens_per_rank, dynamic=cfg.model.cp_dynamic)
    modeling.parallelize(model, dims, cfg.model, device)
    if cfg.model.lora.rank is not None and cfg.checkpoint.export_hf:
        if problem := peft_export_problem(model, lora_spec(model)):
            raise ValueError(f"model.lora with checkpoint.export_hf: the exported adapter would not load as trained "
                             f"({problem}). Set model.lora.target_modules without those, or checkpoint.export_hf=false "
                             "(the checkpoints hold the adapters)")
    optimizer = optim.build_optimizer(model, cfg.optim)
    scheduler = optim.build_scheduler(optimizer, cfg.optim, cfg.max_steps)
    return Trainer(cfg, dims, device, model, optimizer, scheduler, tokenizer,
                   io_group=runtime.patient_group(cfg.checkpoint.timeout_s), budget=budget)


@contextlib.contextmanager
def training_run(cfg: DictConfig, *, validate: Callable[[DictConfig, int], None]) -> Iterator[Trainer]:
    """build_trainer, then the body under runtime.fail_loudly; the process group is destroyed after a
    body that returns (not after an error: destroying would wait on a dead peer). cp's errors about its
    arguments (cp.CPConfigError: "cp_style=ring") come out in config keys ("model.cp_style=ring")."""
    with config.cp_errors_in_config_terms():
        trainer = build_trainer(cfg, validate=validate)
    with runtime.fail_loudly(dist.get_rank()), config.cp_errors_in_config_terms():
        yield trainer
    dist.destroy_process_group()


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


def metrics_logger(trainer: Trainer, job: str) -> MetricsLogger:
    """metrics.jsonl, W&B and the progress bar, from the (possibly resumed) current step."""
    cfg = trainer.cfg
    return MetricsLogger(cfg, rank=dist.get_rank(), total_steps=cfg.max_steps, start_step=trainer.step, job=job)


def training_steps(trainer: Trainer, loader) -> Iterator[int]:
    """The steps left until max_steps (each item: the step the caller runs next, one optimizer step); a
    checkpoint after every checkpoint.every-th step before the last, and one at the end."""
    cfg = trainer.cfg
    while trainer.step < cfg.max_steps:
        yield trainer.step + 1
        if cfg.checkpoint.every and trainer.step % cfg.checkpoint.every == 0 and trainer.step < cfg.max_steps:
            save(trainer, loader)
    save(trainer, loader)


def global_sum(value: float, trainer: Trainer) -> float:
    t = torch.tensor(float(value), dtype=torch.float64, device=trainer.device)
    dist.all_reduce(t, group=trainer.dims.dp_cp_group)
    return t.item()


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


def summary_line(job: str, cfg, history: list[dict], progress: Callable[[list[dict]], str]) -> str:
    """The run's last line: "<job> done: steps a-b, <progress(history)>, cp=..., output in ..."."""
    if not history:
        return f"{job}: no steps run (already at max_steps={cfg.max_steps})"
    return (f"{job} done: steps {history[0]['step']}-{history[-1]['step']}, {progress(history)}, "
            f"cp={cfg.model.cp} {cfg.model.cp_style}, output in {cfg.output_dir}")


def finish(trainer: Trainer, logger: MetricsLogger, summary: str) -> None:
    """The end of a run: the HF export (checkpoint.export_hf, in checkpoint.export_dtype; LoRA: the adapter
    directory, and the merged weights with checkpoint.export_merged), then the summary."""
    cfg = trainer.cfg
    lora = cfg.model.lora.rank is not None
    if cfg.checkpoint.export_hf and lora:
        checkpoint.export_adapter(cfg.output_dir, trainer.model, trainer.tokenizer, base_model=cfg.model.name,
                                  group=trainer.io_group)
    if cfg.checkpoint.export_hf and (not lora or cfg.checkpoint.export_merged):
        checkpoint.export_hf(cfg.output_dir, trainer.model, trainer.tokenizer, dtype=modeling.export_dtype(cfg),
                             group=trainer.io_group)
    logger.close(summary)
