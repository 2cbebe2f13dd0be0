"""Model construction and parallelisation for the trainers.

    build_model(cfg.model, vocab_size)      tiny:<family> from a config, or from_pretrained (hub id / path)
    validate_model_for_cp(model, dims, ...) cp.assert_cp_style_supports_model + head checks (startup)
    parallelize(model, dims, cfg.model)     models.apply_cp -> activation checkpointing -> FSDP2
                                            (fully_shard per decoder layer, then the root, over dp_cp)

FSDP2 shards parameters over the flattened dp_cp mesh. Gradients are SUMMED across it (divide
factor 1): each rank's loss is already normalised by the global token count (trainer/loss.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import cp
import models
from models.tiny import tiny_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_PREFIX = "tiny:"


def build_model(mcfg, vocab_size: int | None, *, seed: int) -> nn.Module:
    """The model on CPU in its parameter dtype, in train mode."""
    if mcfg.name.startswith(TINY_PREFIX):
        model = tiny_model(mcfg.name[len(TINY_PREFIX):], seed=seed, vocab_size=vocab_size,
                           hidden_size=mcfg.tiny_hidden_size, num_layers=mcfg.tiny_layers)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(mcfg.name, dtype=DTYPES[mcfg.dtype])
    return model.to(DTYPES[mcfg.dtype]).train()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP wraps one by one (model.model.layers for HF decoders)."""
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    return list(layers)


def parallelize(model: nn.Module, dims: cp.ParallelDims, mcfg, device: torch.device) -> nn.Module:
    models.apply_cp(model, dims, attn=mcfg.attn)
    if mcfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    mesh = dims.dp_cp_mesh
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[mcfg.dtype], reduce_dtype=torch.float32)
    for module in decoder_layers(model) + [model]:
        fully_shard(module, mesh=mesh, mp_policy=policy)
        # Every FSDP unit SUMS gradients over dp_cp (losses are normalised by the global token count),
        # with a plain SUM collective (gloo has no PREMUL_SUM).
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return model
