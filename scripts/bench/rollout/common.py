"""What the rollout benchmark's parts share: the real model, its prompts, a one-rank group, the trainer's config.

    REAL_MODEL                 pretrained/smollm2-135m-instruct (python scripts/get_smollm2.py)
    prompts(n, tokenizer)      the first n training prompts of data=small_arith with the model's chat template
    rl_config(overrides)       the trainer's composed GRPO config: experiment=smollm2_arith + overrides
    one_rank_group()           a gloo group of one process (the engines' collectives), destroyed on exit
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[3]
REAL_MODEL = ROOT / "pretrained" / "smollm2-135m-instruct"


def require_real_model() -> Path:
    if not (REAL_MODEL / "config.json").exists():
        raise SystemExit(f"{REAL_MODEL} is missing: run python scripts/get_smollm2.py first")
    return REAL_MODEL


def rl_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from trainer import config
    config.register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("rl", overrides=["experiment=smollm2_arith", "wandb.mode=disabled",
                                        f"model.name={REAL_MODEL}", *overrides])


def prompts(n: int, tokenizer) -> list[list[int]]:
    """Token ids of the first n small_arith training prompts (the chat template's generation prompt)."""
    from trainer.rl.prompts import load_rl_prompts

    return [p.input_ids for p in load_rl_prompts("builtin:small_arith.jsonl", tokenizer, limit=n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_group():
    """A gloo process group of this process alone (the engines' sync and broadcast are collectives)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def load_model(dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(REAL_MODEL, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(REAL_MODEL)


def vllm_config(**overrides):
    """cfg.rollout.vllm of the trainer's defaults with `overrides`."""
    from omegaconf import OmegaConf

    from trainer.config import VLLMConfig
    return OmegaConf.merge(OmegaConf.structured(VLLMConfig), overrides)
