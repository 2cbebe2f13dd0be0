"""Tiny random-init configs of the supported families, for tests, demos and the default runs.

Small enough to run fwd+bwd on CPU in well under a second at a few hundred tokens; big enough to
have GQA, several heads per rank at cp=2 and 4, sliding windows, sinks, MoE and hybrid layer stacks.
"""

from __future__ import annotations

from transformers import (AutoModelForCausalLM, Glm4MoeConfig, GptOssConfig, NemotronHConfig, Qwen3_5TextConfig,
                          Qwen3Config, Qwen3NextConfig)

VOCAB = 256
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=4096, tie_word_embeddings=False)


def tiny_config(family: str):
    """A tiny PretrainedConfig of `family` (qwen3, glm4_moe, gpt_oss, qwen3_5, qwen3_next, nemotron_h)."""
    if family == "qwen3":
        return Qwen3Config(**_COMMON, intermediate_size=128, num_hidden_layers=2,
                           layer_types=["sliding_attention", "full_attention"], sliding_window=24, use_sliding_window=True)
    if family == "glm4_moe":
        return Glm4MoeConfig(**_COMMON, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                             n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                             n_group=1, topk_group=1)
    if family == "gpt_oss":
        return GptOssConfig(**_COMMON, intermediate_size=64, num_hidden_layers=2, num_local_experts=4,
                            num_experts_per_tok=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    if family == "qwen3_5":
        return Qwen3_5TextConfig(**_COMMON, intermediate_size=128, num_hidden_layers=2,
                                 layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                                 linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                                 linear_conv_kernel_dim=4)
    if family == "qwen3_next":
        return Qwen3NextConfig(**_COMMON, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                               num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], num_experts=4,
                               num_experts_per_tok=2, linear_num_value_heads=4, linear_num_key_heads=2,
                               linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4)
    if family == "nemotron_h":
        return NemotronHConfig(**{k: v for k, v in _COMMON.items() if k != "max_position_embeddings"},
                               layers_block_type=["mamba", "attention", "mlp"], mamba_num_heads=4, mamba_head_dim=16,
                               n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=16, intermediate_size=96)
    raise ValueError(f"no tiny config for {family!r}; known: {', '.join(TINY_FAMILIES)}")


TINY_FAMILIES = ("qwen3", "glm4_moe", "gpt_oss", "qwen3_5", "qwen3_next", "nemotron_h")


def tiny_model(family: str, *, attn: str | None = None, seed: int = 0):
    """A random-init tiny model of `family` (fp32, train mode); attn: HF attn_implementation (None: its default)."""
    import torch

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation=attn)
    return model.float().train()
