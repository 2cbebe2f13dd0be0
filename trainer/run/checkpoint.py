"""Checkpoints with torch.distributed.checkpoint, the resume point, and the HF export.

    output_dir/checkpoints/step_000040/      DCP shards: model + optimizer (sharded by FSDP)
                                 extra_rank{r}.pt   step, data position, RNG (per rank; the lr schedule
                                                    is rebuilt from the config on resume)
                                 config.json        the resolved config of the run that wrote it (+ world_size)
                                 complete.json      written last: the directory is a COMPLETE checkpoint
    output_dir/checkpoints/latest            the last complete checkpoint's directory name (atomic)
    output_dir/hf/                           safetensors + config + tokenizer (from_pretrained loads it; LoRA:
                                             the adapters merged, with checkpoint.export_merged)
    output_dir/adapter/                      LoRA: peft's adapter directory (PeftModel.from_pretrained loads it)
    LoRA (model.lora.rank): checkpoints hold the adapters and their AdamW state only (ignore_frozen_params);
    the frozen base is model.name's, rebuilt at resume

    save_checkpoint (every rank)
      (waits on a gloo group with checkpoint.timeout_s: a slow filesystem does not trip timeout_s)
      rank 0 clears a stale step_N.tmp ── barrier ── dcp.save -> step_N.tmp (every rank its shards)
      every rank: extra_rank{r}.pt; rank 0: config.json ── barrier (every rank's files are on disk)
      rank 0: complete.json (fsync) -> rename step_N.tmp -> step_N -> latest (temp + fsync + rename)
              -> delete complete checkpoints beyond checkpoint.keep_last (never the one latest names)
      barrier
    resume_point(cfg) (every rank, before the first step)
      rank 0: deletes step_N.tmp left by a crash mid-save
              resume=false: refuse an output_dir holding checkpoints unless overwrite=true (clears them)
              resume=true:  `latest` if it names a complete checkpoint, else the newest complete one
      broadcast -> every rank loads the same directory (or raises the same ValueError)
    check_resume_config(path, cfg, world)    refuse changes the saved state cannot follow (RESUME_REFUSED),
                                             return the honoured ones (lr, schedule, max_steps, ...)

A checkpoint directory is only ever renamed into place once complete, so a crash mid-save leaves a
step_N.tmp that no reader follows; a checkpoint is never rewritten in place.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from models.adapters.lora import adapter_weights, hf_state_dict, lora_spec
from models.apply import plain_model
from trainer.run.runtime import fsync_dir, write_atomic
from trainer.run.rank_zero import rank_zero_outcome

COMPLETE = "complete.json"
CONFIG = "config.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Changing these on resume would make the saved state mean something else (model shape and sharding,
# the token stream, the prompt pool, the seeded order): refused with the diff. Every other key (lr,
# schedule, warmup, max_steps, clipping, AdamW settings, batch size, logging, rewards, loss, ...) is
# honoured from the new config.
RESUME_REFUSED = ("model.name", "model.cp", "model.cp_style", "model.cp_ulysses", "model.tiny_hidden_size",
                  "model.lora.rank", "model.lora.alpha", "model.lora.target_modules",
                  "model.tiny_layers", "data.source", "data.tokenizer", "data.seq_len", "data.limit", "seed",
                  "world_size", "rollout.task", "rollout.prompts_per_step", "rollout.eval_prompts")
# Settings of the run itself, not of the training it continues: never compared.
_NOT_COMPARED = ("resume", "overwrite", "output_dir")


def _root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """A checkpoint directory every rank finished writing (complete.json is written after the barrier)."""
    return _step_of(path) is not None and (path / COMPLETE).is_file()


def complete_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = _root(output_dir)
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)] if root.is_dir() else []
    return sorted(found, key=_step_of)


def latest_checkpoint(output_dir: str) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if it is complete, else (an empty, torn or
    stale marker) the newest complete directory; None when there is none. Reads the filesystem only."""
    marker = _root(output_dir) / "latest"
    name = marker.read_text(errors="replace").strip() if marker.is_file() else ""
    if name and _STEP_DIR.match(name) and is_complete(_root(output_dir) / name):
        return _root(output_dir) / name
    complete = complete_checkpoints(output_dir)
    if marker.exists():
        print(f"checkpoint: {marker} holds {name!r}, not a complete checkpoint; "
              f"using {complete[-1].name if complete else 'none'} (the newest complete one)", file=sys.stderr)
    return complete[-1] if complete else None


def _previous_run_files(output_dir: str) -> list[str]:
    root = _root(output_dir)
    found = sorted(p.name for p in root.iterdir() if _step_of(p) is not None or p.name == "latest") \
        if root.is_dir() else []
    return found


def _clear_previous_run(output_dir: str) -> None:
    """overwrite=true: what a previous run left that a new run would otherwise mix with its own."""
    out = Path(output_dir)
    for name in ("checkpoints", "hf"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "samples.jsonl", "rollouts.jsonl"):
        (out / name).unlink(missing_ok=True)


def _clear_staging(output_dir: str) -> None:
    """step_N.tmp directories a crash left mid-save (no save is in flight before the first step)."""
    root = _root(output_dir)
    for path in root.glob("step_*.tmp") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def _decide_start(cfg) -> str | None:
    """Rank 0: the checkpoint directory to resume from (None: a fresh start); ValueError naming the fix."""
    _clear_staging(cfg.output_dir)
    if cfg.resume:
        path = latest_checkpoint(cfg.output_dir)
        if path is None:
            raise ValueError(f"resume=true but {cfg.output_dir}/checkpoints has no complete checkpoint: "
                             "set resume=false to start a new run")
        return str(path)
    previous = _previous_run_files(cfg.output_dir)
    if previous and not cfg.get("overwrite", False):
        raise ValueError(f"output_dir={cfg.output_dir} already holds another run's checkpoints "
                         f"({', '.join(previous[-3:])}): set resume=true to continue it, overwrite=true to delete "
                         "its checkpoints, metrics and HF export and start fresh, or choose another output_dir")
    if previous:
        _clear_previous_run(cfg.output_dir)
    return None


def resume_point(cfg) -> Path | None:
    """Every rank: the checkpoint this run resumes from (None: a fresh start). Rank 0 decides, so every
    rank loads the same directory or raises the same ValueError."""
    path = rank_zero_outcome(lambda: _decide_start(cfg), error_type=ValueError)
    return Path(path) if path else None


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_config(cfg, world_size: int) -> dict:
    """The resolved config as saved with a checkpoint (plus the world size)."""
    from omegaconf import OmegaConf
    return {**OmegaConf.to_container(cfg, resolve=True), "world_size": world_size}


def check_resume_config(path: Path, cfg, world_size: int) -> list[str]:
    """Compare the saved run's config with this one. Raise ValueError listing every change in
    RESUME_REFUSED; return the other changes ("key: old -> new"), which the trainer honours."""
    saved_file = path / CONFIG
    if not saved_file.is_file():  # written before configs were saved: nothing to compare
        return []
    saved = _flatten(json.loads(saved_file.read_text()))
    now = _flatten(run_config(cfg, world_size))
    changed = [key for key in sorted(set(saved) & set(now)) if saved[key] != now[key] and key not in _NOT_COMPARED]
    refused = [f"{key}: {saved[key]!r} -> {now[key]!r}" for key in changed if key in RESUME_REFUSED]
    if refused:
        raise ValueError(f"cannot resume {path}: these settings differ from the run that wrote it and the saved "
                         f"state cannot follow them: {'; '.join(refused)}. Set them back, or start a new run "
                         "(another output_dir, or overwrite=true)")
    return [f"{key}: {saved[key]!r} -> {now[key]!r}" for key in changed]


def _publish(staging: Path, final: Path, step: int) -> None:
    """Rank 0, after every rank wrote its files: mark complete, rename into place, point `latest` at it."""
    write_atomic(staging / COMPLETE, json.dumps({"step": step, "world_size": dist.get_world_size()}))
    _replace_dir(staging, final)  # the same step saved by an earlier attempt is replaced only now, whole
    write_atomic(final.parent / "latest", final.name)


def prune_checkpoints(output_dir: str, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` (0 keeps all); never the one `latest`
    names. Returns the deleted directories."""
    if keep_last <= 0:
        return []
    latest = latest_checkpoint(output_dir)
    old = [p for p in complete_checkpoints(output_dir)[:-keep_last] if p != latest]
    for path in old:
        (path / COMPLETE).unlink()  # first: a half-deleted directory is never taken for a checkpoint
        shutil.rmtree(path)
    return old


def _options(model) -> StateDictOptions:
    """LoRA: the adapters and their optimizer state only; the frozen base is rebuilt from model.name (loading
    leaves it as built: not strict about the frozen keys; dcp.load is strict about every adapter key)."""
    lora = lora_spec(model) is not None
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def save_checkpoint(output_dir: str, step: int, model, optimizer, extra: dict, *, config: dict | None = None,
                    keep_last: int = 0, group=None) -> Path:
    """Save a resumable checkpoint at optimizer step `step` (every rank calls this); see the module doc.
    group: the process group the ranks wait on for each other's writes (runtime.patient_group: a gloo group
    with checkpoint.timeout_s, so a slow filesystem does not trip the collective timeout); None: the default."""
    rank, root = dist.get_rank(), _root(output_dir)
    final = root / f"step_{step:06d}"
    staging = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash mid-save
        staging.mkdir(parents=True)
    dist.barrier(group=group)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(staging), process_group=group)
    torch.save({"step": step, **extra}, staging / f"extra_rank{rank}.pt")
    if rank == 0 and config is not None:
        (staging / CONFIG).write_text(json.dumps(config, indent=1, default=str))
    dist.barrier(group=group)
    if rank == 0:
        _publish(staging, final, step)
        prune_checkpoints(output_dir, keep_last)
    dist.barrier(group=group)
    return final


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Load model + optimizer in place; return this rank's extra state (step, data position, RNG)."""
    extra = path / f"extra_rank{dist.get_rank()}.pt"
    if not extra.exists():
        raise ValueError(f"{path} was written by a run with a different world size (no {extra.name}): resume with "
                         "the same number of ranks")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(model))
    return torch.load(extra, weights_only=False)


def export_hf(output_dir: str, model, tokenizer, dtype: torch.dtype | None = None, *,
              group=None, name: str = "hf", merge: bool = True) -> Path | None:
    """Gather the full weights and write a transformers-loadable directory output_dir/<name> (rank 0 writes).
    dtype: the exported weights' dtype (None: as held, i.e. the fp32 master weights). LoRA: the adapters merged
    into the weights (merge=False: the frozen base alone).

    Rank 0 writes into output_dir/<name>.tmp and renames it over output_dir/<name> once complete (a crash
    leaves the previous export whole). The other ranks wait for it on `group`, a gloo group with its
    own timeout (runtime.patient_group(checkpoint.timeout_s); None: the default group): writing a large
    model can take longer than the collective timeout, which keeps guarding every other collective."""
    def write(full: dict, staging: Path) -> None:
        plain = plain_model(model)
        plain.load_state_dict(hf_state_dict(full, lora_spec(model), merge=merge), strict=True)  # LoRA: merged or the base
        if dtype is not None:  # precision: master weights are fp32; export what the user asked for
            plain.to(dtype)
        plain.save_pretrained(staging, safe_serialization=True)

    return _export_staged(output_dir, name, model, tokenizer, write, group)


def export_adapter(output_dir: str, model, tokenizer, *, base_model: str, group=None,
                   name: str = "adapter") -> Path:
    """LoRA: output_dir/<name> as peft's own save_pretrained writes it (adapter_config.json with
    base_model_name_or_path = model.name, adapter_model.safetensors with peft's keys): the adapters gathered from
    their shards, put on a plain model of the same config by peft, saved (rank 0; same staging and rename as
    export_hf). PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model.name), dir) loads it."""
    import peft

    def write(full: dict, staging: Path) -> None:
        spec = lora_spec(model)
        plain = plain_model(model)
        plain.load_state_dict(hf_state_dict(full, spec, merge=False), strict=True)
        plain.name_or_path = base_model  # what peft writes as base_model_name_or_path
        wrapped = peft.get_peft_model(plain, spec.peft_config(base_model))
        adapters = adapter_weights(full)
        with torch.no_grad():
            for key, param in wrapped.base_model.model.named_parameters():  # the same names: same HF model, same peft
                if key in adapters:
                    param.copy_(adapters.pop(key))
        if adapters:
            raise RuntimeError(f"adapter weights peft's model does not have: {sorted(adapters)[:5]}")
        wrapped.save_pretrained(staging, safe_serialization=True)

    return _export_staged(output_dir, name, model, tokenizer, write, group)


def _export_staged(output_dir: str, name: str, model, tokenizer, write, group) -> Path:
    """Gather the full state dict; rank 0 runs write(full, staging dir), adds the tokenizer and renames the
    staging dir over output_dir/<name>; every rank waits on `group`."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = Path(output_dir) / name
    staging = path.with_name(f"{name}.tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        write(full, staging)
        tokenizer.save_pretrained(staging)
        _replace_dir(staging, path)
    dist.barrier(group=group)
    return path


def _replace_dir(new: Path, target: Path) -> None:
    """Put the complete directory `new` at `target`, replacing what was there."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
