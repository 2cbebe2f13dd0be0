"""AdamW and the learning-rate schedule (linear warmup, then cosine / linear decay / constant).

AdamW runs on the fp32 master shards (trainer/modeling.py: model.dtype is only the compute dtype),
so its moments are fp32 and an update far below a bf16 step still lands.
"""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, which must be fp32 masters (its state takes their dtype)."""
    low = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32})
    if low:
        raise ValueError(f"trainable parameters in {', '.join(low)}: AdamW state would be too, and small updates "
                         "would round away. Keep parameters fp32 (trainer.modeling.build_model) and set the "
                         "compute dtype with model.dtype")
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    return torch.optim.AdamW(trainable, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, max_steps: int,
                    start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of `cfg` (peak cfg.lr) positioned at optimizer step `start_step` (a resumed run: the
    param groups' lr is set from THIS config, whatever a loaded optimizer state held)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup=cfg.warmup_steps, total=max_steps, schedule=cfg.schedule,
                                          min_ratio=cfg.min_lr_ratio), last_epoch=start_step - 1)
