"""Tiny random-init configs of the supported families, for tests, demos and the default runs.

    TINY_BUILDERS = {family: builder(common, ffn, num_layers) -> PretrainedConfig}     one row per family
    tiny_config(family, ...) ── the builder, given the shared sizes ──> config
    tiny_model(family, ...)  ── AutoModelForCausalLM.from_config(tiny_config(...)) ──> fp32 model, train mode

Small enough to run fwd+bwd on CPU in well under a second at a few hundred tokens; big enough to
have GQA, several heads per rank at cp=2 and 4, sliding windows, sinks, MoE and hybrid layer stacks.
Adding a family is one builder and one row.
"""

from __future__ import annotations

from transformers import (
    AutoModelForCausalLM,
    BambaConfig,
    Glm4MoeConfig,
    GptOssConfig,
    LlamaConfig,
    NemotronHConfig,
    Qwen3_5TextConfig,
    Qwen3Config,
    Qwen3NextConfig,
)

VOCAB = 256
_LINEAR = {"linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
           "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4}  # Gated DeltaNet: 4 value, 2 key heads


def _layer_types(num_layers: int, mixer: str, attention: str = "full_attention") -> list[str]:
    """Three mixer layers to one attention layer (Qwen3.5 / Qwen3-Next style); the last is attention."""
    return [attention if (i + 1) % 4 == 0 or i == num_layers - 1 else mixer for i in range(num_layers)]


def _alternating(num_layers: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


def _llama(common: dict, ffn: int, num_layers: int):
    """Llama (SmolLM2's architecture): plain RoPE attention, no window; what any inference engine runs (the vLLM
    engine's tests). Heads of 32 dims: vLLM's CPU attention kernels take 32, 64, 80, ... but not 16."""
    return LlamaConfig(**{**common, "head_dim": 32}, intermediate_size=ffn, num_hidden_layers=num_layers)


def _qwen3(common: dict, ffn: int, num_layers: int):
    return Qwen3Config(**common, intermediate_size=ffn, num_hidden_layers=num_layers,
                       layer_types=_alternating(num_layers), sliding_window=24, use_sliding_window=True)


def _glm4_moe(common: dict, ffn: int, num_layers: int):
    hidden = common["hidden_size"]
    return Glm4MoeConfig(**common, intermediate_size=ffn, moe_intermediate_size=hidden // 2,
                         num_hidden_layers=num_layers, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                         first_k_dense_replace=1, n_group=1, topk_group=1)


def _gpt_oss(common: dict, ffn: int, num_layers: int):
    return GptOssConfig(**common, intermediate_size=common["hidden_size"], num_hidden_layers=num_layers,
                        num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                        layer_types=_alternating(num_layers))


def _qwen3_5(common: dict, ffn: int, num_layers: int):
    return Qwen3_5TextConfig(**common, **_LINEAR, intermediate_size=ffn, num_hidden_layers=num_layers,
                             layer_types=_layer_types(num_layers, "linear_attention"))


def _qwen3_next(common: dict, ffn: int, num_layers: int):
    hidden = common["hidden_size"]
    return Qwen3NextConfig(**common, **_LINEAR, intermediate_size=ffn, moe_intermediate_size=hidden // 2,
                           shared_expert_intermediate_size=hidden // 2, num_hidden_layers=num_layers,
                           layer_types=_layer_types(num_layers, "linear_attention"), num_experts=4,
                           num_experts_per_tok=2)


def _nemotron_h(common: dict, ffn: int, num_layers: int):
    common = {k: v for k, v in common.items() if k != "max_position_embeddings"}
    blocks = [t.replace("full_attention", "attention").replace("linear_attention", "mamba")
              for t in _layer_types(num_layers, "linear_attention")]
    return NemotronHConfig(**common, layers_block_type=[*blocks, "mlp"], mamba_num_heads=4, mamba_head_dim=16,
                           n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=16, intermediate_size=96)


def _bamba(common: dict, ffn: int, num_layers: int):
    """Mamba2 layers (4 SSM heads of 32 dims, 2 B/C groups, intermediate 2 * hidden) and attention layers, 3:1."""
    common = {k: v for k, v in common.items() if k not in ("head_dim", "max_position_embeddings")}
    hidden = common["hidden_size"]
    attention = [i for i, t in enumerate(_layer_types(num_layers, "mamba")) if t == "full_attention"]
    return BambaConfig(**common, intermediate_size=ffn, num_hidden_layers=num_layers, attn_layer_indices=attention,
                       mamba_n_heads=4, mamba_d_head=2 * hidden // 4, mamba_n_groups=2, mamba_d_state=8,
                       mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16)


TINY_BUILDERS = {
    "llama": _llama,
    "qwen3": _qwen3,
    "glm4_moe": _glm4_moe,
    "gpt_oss": _gpt_oss,
    "qwen3_5": _qwen3_5,
    "qwen3_next": _qwen3_next,
    "nemotron_h": _nemotron_h,
    "bamba": _bamba,
}
TINY_FAMILIES = tuple(TINY_BUILDERS)


def tiny_config(family: str, *, vocab_size: int = VOCAB, hidden_size: int = 64, num_layers: int = 2):
    """A tiny PretrainedConfig of `family` (one of TINY_FAMILIES).

    4 attention heads of 16 dims (2 KV heads) whatever the hidden size, so cp=2 and 4 always fit.
    """
    if family not in TINY_BUILDERS:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(TINY_FAMILIES)}")
    common = {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096, "tie_word_embeddings": False}
    return TINY_BUILDERS[family](common, 2 * hidden_size, num_layers)


def tiny_model(family: str, *, attn: str | None = None, seed: int = 0, **config_kw):
    """A random-init tiny model of `family` (fp32, train mode); attn: HF attn_implementation (None: its default)."""
    import torch

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_kw), attn_implementation=attn)
    return model.float().train()
