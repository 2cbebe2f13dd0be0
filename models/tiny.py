"""Tiny random-init configs of the supported families, for tests, demos and the default runs.

Small enough to run fwd+bwd on CPU in well under a second at a few hundred tokens; big enough to
have GQA, several heads per rank at cp=2 and 4, sliding windows, sinks, MoE and hybrid layer stacks.
"""

from __future__ import annotations

from transformers import (AutoModelForCausalLM, Glm4MoeConfig, GptOssConfig, NemotronHConfig, Qwen3_5TextConfig,
                          Qwen3Config, Qwen3NextConfig)

VOCAB = 256


def _layer_types(num_layers: int, mixer: str, attention: str = "full_attention") -> list[str]:
    """Three mixer layers to one attention layer (Qwen3.5 / Qwen3-Next style); the last is attention."""
    return [attention if (i + 1) % 4 == 0 or i == num_layers - 1 else mixer for i in range(num_layers)]


def tiny_config(family: str, *, vocab_size: int = VOCAB, hidden_size: int = 64, num_layers: int = 2):
    """A tiny PretrainedConfig of `family` (qwen3, glm4_moe, gpt_oss, qwen3_5, qwen3_next, nemotron_h).

    4 attention heads of 16 dims (2 KV heads) whatever the hidden size, so cp=2 and 4 always fit.
    """
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False)
    ffn = 2 * hidden_size
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    linear = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                  linear_conv_kernel_dim=4)
    if family == "qwen3":
        return Qwen3Config(**common, intermediate_size=ffn, num_hidden_layers=num_layers, layer_types=alternating,
                           sliding_window=24, use_sliding_window=True)
    if family == "glm4_moe":
        return Glm4MoeConfig(**common, intermediate_size=ffn, moe_intermediate_size=hidden_size // 2,
                             num_hidden_layers=num_layers, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                             first_k_dense_replace=1, n_group=1, topk_group=1)
    if family == "gpt_oss":
        return GptOssConfig(**common, intermediate_size=hidden_size, num_hidden_layers=num_layers, num_local_experts=4,
                            num_experts_per_tok=2, sliding_window=16, layer_types=alternating)
    if family == "qwen3_5":
        return Qwen3_5TextConfig(**common, **linear, intermediate_size=ffn, num_hidden_layers=num_layers,
                                 layer_types=_layer_types(num_layers, "linear_attention"))
    if family == "qwen3_next":
        return Qwen3NextConfig(**common, **linear, intermediate_size=ffn, moe_intermediate_size=hidden_size // 2,
                               shared_expert_intermediate_size=hidden_size // 2, num_hidden_layers=num_layers,
                               layer_types=_layer_types(num_layers, "linear_attention"), num_experts=4,
                               num_experts_per_tok=2)
    if family == "nemotron_h":
        common.pop("max_position_embeddings")
        blocks = [t.replace("full_attention", "attention").replace("linear_attention", "mamba")
                  for t in _layer_types(num_layers, "linear_attention")]
        return NemotronHConfig(**common, layers_block_type=blocks + ["mlp"], mamba_num_heads=4, mamba_head_dim=16,
                               n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=16, intermediate_size=96)
    raise ValueError(f"no tiny config for {family!r}; known: {', '.join(TINY_FAMILIES)}")


TINY_FAMILIES = ("qwen3", "glm4_moe", "gpt_oss", "qwen3_5", "qwen3_next", "nemotron_h")


def tiny_model(family: str, *, attn: str | None = None, seed: int = 0, **config_kw):
    """A random-init tiny model of `family` (fp32, train mode); attn: HF attn_implementation (None: its default)."""
    import torch

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_kw), attn_implementation=attn)
    return model.float().train()
