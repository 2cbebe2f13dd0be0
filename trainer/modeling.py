"""Model construction and parallelisation for the trainers.

    build_model(cfg.model, vocab_size)      tiny:<family> from a config, or from_pretrained (hub id / path);
                                            parameters in fp32 (the master weights) whatever model.dtype is
    validate_model_for_cp(model, dims, ...) cp.assert_cp_style_supports_model + head checks (startup)
    parallelize(model, dims, cfg.model)     models.apply_cp -> LoRA adapters (model.lora.rank: frozen base in
                                            model.dtype, fp32 adapters) -> install_long_context (tiled MLP,
                                            activation checkpointing + offload, chunked LM head) -> FSDP2
                                            (fully_shard per decoder layer, then the root, over dp_cp)

FSDP2 shards parameters over the flattened dp_cp mesh. Gradients are SUMMED across it (divide
factor 1): each rank's loss is already normalised by the global token count (trainer/loss.py).

Precision (DESIGN rule 11): `model.dtype` is the COMPUTE dtype. Master parameters, their sharded
gradients and so the AdamW state stay fp32; FSDP2's MixedPrecisionPolicy casts the gathered
parameters to the compute dtype for forward/backward (buffers such as RoPE frequencies stay fp32)
and reduce-scatters gradients in fp32:

    fp32 shard ──all-gather──> fp32 full ──cast──> bf16 compute ──grads bf16──cast──> fp32 reduce-scatter
         ^                                                                               │
         └──────────────────────── AdamW (fp32 moments) <── fp32 sharded grad ───────────┘

An update smaller than half a bf16 step still lands in the fp32 master. The RL rollout copy casts
its parameters the same way (cast_parameters), so sampling log-probs match the training forward.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import cp
import models
from models.adapters.lora import apply_lora
from models.memory.activation_offload import enable_activation_offload
from models.memory.chunked_head import ChunkedHeadUnsupported, install_chunked_head
from models.memory.tiled_mlp import apply_tiled_mlp
from models.tiny import tiny_model
from trainer.data.tokenizer import TINY_MODEL_PREFIX as TINY_PREFIX

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MASTER_DTYPE = torch.float32


def compute_dtype(mcfg) -> torch.dtype:
    """The dtype forward and backward run in (model.dtype); parameters are kept in MASTER_DTYPE."""
    return DTYPES[mcfg.dtype]


def export_dtype(cfg) -> torch.dtype:
    """dtype of the HF export: checkpoint.export_dtype, by default the compute dtype (model.dtype)."""
    return DTYPES[cfg.checkpoint.export_dtype or cfg.model.dtype]


def build_model(mcfg, vocab_size: int | None, *, seed: int) -> nn.Module:
    """The model on CPU with fp32 (master) parameters, in train mode; model.dtype applies at compute time."""
    if mcfg.name.startswith(TINY_PREFIX):
        model = tiny_model(mcfg.name[len(TINY_PREFIX):], seed=seed, vocab_size=vocab_size,
                           hidden_size=mcfg.tiny_hidden_size, num_layers=mcfg.tiny_layers)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(mcfg.name, dtype=MASTER_DTYPE)
    return cast_parameters(model, MASTER_DTYPE).train()


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Floating-point parameters to `dtype`, buffers untouched (what FSDP2's param_dtype does: RoPE
    frequencies and other fp32 buffers stay fp32). In place; returns the model."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP wraps one by one (model.model.layers for HF decoders)."""
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    return list(layers)


def install_long_context(model: nn.Module, mcfg) -> nn.Module:
    """The long-context memory techniques model.* asks for, in the order they compose: tiled MLP, activation
    checkpointing (+ offload of the checkpointed layer inputs), the chunked LM head (a family whose head does
    more than a linear layer + final softcap keeps full logits, said once)."""
    if mcfg.tiled_mlp:
        apply_tiled_mlp(model, mcfg.mlp_tile_tokens)
    if mcfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mcfg.activation_offload:  # after gradient_checkpointing_enable, which resets the checkpoint functions
            enable_activation_offload(model)
    if mcfg.chunked_head:
        try:
            install_chunked_head(model)
        except ChunkedHeadUnsupported as exc:
            warnings.warn(f"model.chunked_head: {exc}; this run computes full logits", stacklevel=2)
    return model


def parallelize(model: nn.Module, dims: cp.ParallelDims, mcfg, device: torch.device) -> nn.Module:
    models.apply_cp(model, dims, attn=mcfg.attn, chunks=mcfg.ulysses_chunks, mixer_cp=mcfg.mixer_cp)
    if mcfg.lora.rank is not None:  # after apply_cp (HF names kept by its wrappers), before the memory wrappers
        apply_lora(model, mcfg.lora, decoder_layers(model), compute_dtype(mcfg))
    install_long_context(model, mcfg)
    model.to(device)
    mesh = dims.dp_cp_mesh
    # fp32 master shards; forward/backward in the compute dtype; gradients reduced and kept in fp32
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype(mcfg), reduce_dtype=MASTER_DTYPE)
    for module in decoder_layers(model) + [model]:
        fully_shard(module, mesh=mesh, mp_policy=policy)
        # Every FSDP unit SUMS gradients over dp_cp (losses are normalised by the global token count),
        # with a plain SUM collective (gloo has no PREMUL_SUM).
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return model
