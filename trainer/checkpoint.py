"""Checkpoints with torch.distributed.checkpoint, and the HF export.

    output_dir/checkpoints/step_000040/      DCP shards: model + optimizer (sharded by FSDP)
                                 extra_rank{r}.pt   step, scheduler, data position, RNG (per rank)
    output_dir/checkpoints/latest            the last COMPLETE checkpoint's directory name
    output_dir/hf/                           safetensors + config + tokenizer (from_pretrained loads it)
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from models.apply import to_hf_state_dict
from models.attention import CP_ATTENTION_PREFIX


def _root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str, step: int, model, optimizer, extra: dict) -> Path:
    """Save a resumable checkpoint at optimizer step `step` (every rank calls this)."""
    path = _root(output_dir) / f"step_{step:06d}"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    torch.save({"step": step, **extra}, path / f"extra_rank{dist.get_rank()}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        (_root(output_dir) / "latest").write_text(path.name)
    return path


def latest_checkpoint(output_dir: str) -> Path | None:
    marker = _root(output_dir) / "latest"
    return _root(output_dir) / marker.read_text().strip() if marker.exists() else None


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Load model + optimizer in place; return this rank's extra state (step, scheduler, data, RNG)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = path / f"extra_rank{dist.get_rank()}.pt"
    if not extra.exists():
        raise ValueError(f"{path} was written by a run with a different world size (no {extra.name}): resume with "
                         "the same number of ranks")
    return torch.load(extra, weights_only=False)


def export_hf(output_dir: str, model, tokenizer) -> Path | None:
    """Gather the full weights and write a transformers-loadable directory (rank 0 writes)."""
    from transformers import AutoModelForCausalLM
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = Path(output_dir) / "hf"
    if dist.get_rank() == 0:
        config = copy.deepcopy(model.config)
        if str(config._attn_implementation).startswith(CP_ATTENTION_PREFIX):
            config._attn_implementation = "sdpa"
        config.use_cache = True
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(to_hf_state_dict(model, full), strict=True)
        plain.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
    dist.barrier()
    return path
