"""Tiny configs of every causal-LM family transformers ships, built programmatically (the family sweep).

    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES ─> family (model_type)
      └─ CONFIG_MAPPING[family]() defaults ─> shrink every size field that is present
           (hidden 64, 4 query / 2 KV heads of 16 dims, 2+ layers covering every layer type,
            4 experts / top-2, vocab 256, windows 8, softcaps small, ...) ─> cls(**overrides)
      └─ tiny_family_config(family) -> PretrainedConfig, or raises NotTiny(reason)

A family that cannot be built tiny (encoder-decoder, multimodal-only, a config that refuses the
shrunk values, a model over PARAM_LIMIT) is reported with the reason, never silently skipped.
Windows are small relative to the sweep's documents and softcaps small relative to the logits,
so a dropped window or softcap shows in the numbers.
"""

from __future__ import annotations

import warnings

from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from models.traits import WINDOW_FIELDS

VOCAB = 256
WINDOW = 8
PARAM_LIMIT = 16_000_000


class NotTiny(Exception):
    """The family cannot be built as a tiny text-only causal LM; str(exc) is the reason."""


# field -> tiny value, applied only where the family's default config has the field (and not None)
_SIZES = {
    **dict.fromkeys(["hidden_size", "d_model", "n_embd", "embedding_size", "word_embed_proj_dim",
                     "attention_hidden_size", "backbone_hidden_size", "dim_model_base"], 64),
    **dict.fromkeys(["num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "swa_num_attention_heads"], 4),
    **dict.fromkeys(["head_dim", "attention_head_dim", "kv_channels", "dim_head", "swa_head_dim",
                     "attention_head_size", "qk_head_dim", "v_head_dim", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_head_dim", "mamba_d_head", "mamba_head_dim",
                     "index_head_dim"], 16),
    **dict.fromkeys(["intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "ffn_hidden_size", "dff",
                     "dim_ff", "intermediate_size_mlp", "dense_intermediate_size"], 128),
    **dict.fromkeys(["moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
                     "moe_shared_expert_intermediate_size", "shared_intermediate_size",
                     "shared_experts_intermediate_size"], 32),
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token"], 2),
    **dict.fromkeys(["n_group", "num_expert_group", "topk_group", "first_k_dense_replace", "num_dense_layers"], 1),
    **dict.fromkeys(["kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "linear_conv_kernel_dim",
                     "mamba_d_conv", "conv_kernel", "conv_L_cache", "conv1d_width", "conv_kernel_size"], 8),
    **dict.fromkeys(["q_lora_rank", "lru_width"], 32),
    **dict.fromkeys(["linear_num_key_heads", "mamba_n_groups", "n_groups", "index_n_heads"], 2),
    **dict.fromkeys(["linear_num_value_heads", "linear_num_heads", "mamba_n_heads", "mamba_num_heads",
                     "n_mamba_heads"], 4),
    **dict.fromkeys(["mamba_d_state", "ssm_state_size", "state_size"], 8),
    **dict.fromkeys(["mamba_chunk_size", "chunk_size"], 16),
    **dict.fromkeys(["mamba_expand", "expand"], 1),  # SSM inner size = heads x head dim = 64
    **dict.fromkeys(WINDOW_FIELDS, WINDOW),
    "qk_rope_head_dim": 16,
    "rotary_dim": 16,
    "vocab_size": VOCAB,
    "query_pre_attn_scalar": 16,
    "attn_logit_softcapping": 5.0,  # Gemma2-style logit softcap: small enough to bend large logits
    "num_nextn_predict_layers": 0,
    "index_topk": 8,
}
# fields whose default None means "derive from a size we shrink"; derived wrongly, so set them
_WHEN_NONE = {"head_dim": 16, "num_experts_per_tok": 2, "num_key_value_heads": 2}
# families whose configs validate a combination the generic sizes break
_FAMILY_FIXES = {
    "zaya": {"num_experts_per_tok": 1},  # "ZAYA currently supports num_experts_per_tok=1 only"
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16},  # SSM inner size = heads x head dim
}
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads")
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
# per-layer type lists (one entry per layer): shrunk to the distinct types, every type kept
_LAYER_LISTS = ("layer_types", "mlp_layer_types", "layers_block_type", "block_types", "attention_layers",
                "attn_layers", "attention_types", "no_rope_layers", "indexer_types")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
              "cls_token_id", "eod_token_id", "forced_eos_token_id")
_RANDOM_PER_CALL = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "hidden_dropout",
                    "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "dropout", "activation_dropout",
                    "residual_dropout", "embedding_dropout", "router_jitter_noise", "input_jitter_noise")
_MULTIMODAL = ("vision_config", "audio_config", "vq_config", "audio_encoder_config", "depth_decoder_config",
               "patcher_config", "text_encoder", "audio_encoder", "encoder_config")


def _one_line(exc: Exception, limit: int = 240) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"


def causal_lm_families() -> list[str]:
    """Every model_type transformers maps to a causal-LM class, in its own order."""
    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _distinct(values: list) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def shrink_config_dict(defaults: dict, *, keep_layers: bool = False) -> dict:
    """The overrides that make one config dict tiny (recursing into a text sub-config). keep_layers: leave the
    layer count and the per-layer lists as they are (models.mask_probe's twin: the same layers, tiny)."""
    out = {}
    for key, tiny in _SIZES.items():
        if isinstance(defaults.get(key), (int, float)) and not isinstance(defaults.get(key), bool):
            out[key] = tiny
    for key, tiny in _WHEN_NONE.items():
        if key in defaults and defaults[key] is None:
            out[key] = tiny
    heads = defaults.get("num_attention_heads")
    for key in _KV_HEADS:
        if isinstance(defaults.get(key), int):
            out[key] = 4 if heads is not None and defaults[key] >= heads else 2  # keep MHA families MHA
    if not keep_layers:
        lists = {k: defaults[k] for k in _LAYER_LISTS if isinstance(defaults.get(k), list) and defaults[k]}
        n_layers = max([2] + [len(_distinct(v)) for v in lists.values()])
        for key in _LAYER_COUNTS:
            if isinstance(defaults.get(key), int):
                out[key] = n_layers
        for key, values in lists.items():
            kinds = _distinct(values)
            out[key] = [kinds[i % len(kinds)] for i in range(n_layers)]
        for key in ("mlp_only_layers", "moe_layers", "full_attn_idxs"):
            if isinstance(defaults.get(key), list):
                out[key] = [i for i in defaults[key] if isinstance(i, int) and i < n_layers]
    vocab = out.get("vocab_size", defaults.get("vocab_size"))
    for key in _TOKEN_IDS:
        value = defaults.get(key)
        if isinstance(value, int) and vocab is not None and value >= vocab:
            out[key] = vocab - 1
        elif isinstance(value, list) and vocab is not None:
            out[key] = [min(v, vocab - 1) for v in value]
    if isinstance(defaults.get("text_config"), dict):
        out["text_config"] = {**defaults["text_config"], **shrink_config_dict(defaults["text_config"], keep_layers=keep_layers)}
    return out


def tiny_family_config(family: str, **variant):
    """A tiny text-only causal-LM config of `family` (fp32-friendly, attention_dropout 0); NotTiny if impossible.
    variant: config fields set on top of the tiny sizes (a trait variant, e.g. use_sliding_window=True)."""
    cls = CONFIG_MAPPING[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            defaults = cls().to_dict()
        except Exception as exc:
            raise NotTiny(f"default config does not construct: {_one_line(exc)}") from None
        if defaults.get("is_encoder_decoder"):
            raise NotTiny("encoder-decoder model (CP covers decoder-only causal LMs)")
        multimodal = [k for k in _MULTIMODAL if defaults.get(k)]
        if multimodal:
            raise NotTiny(f"multimodal model ({', '.join(multimodal)}): the sweep builds text-only families")
        overrides = {**shrink_config_dict(defaults), **_FAMILY_FIXES.get(family, {}), **variant}
        for key in _RANDOM_PER_CALL:  # dropout and router jitter: no two runs agree, CP or not
            if isinstance(defaults.get(key), float) and key not in variant:
                overrides[key] = 0.0
        try:
            return cls(**overrides)
        except Exception as exc:
            raise NotTiny(f"config refuses the tiny sizes: {_one_line(exc)}") from None


def tiny_family_model(family: str, *, attn: str | None = "eager", seed: int = 0, **variant):
    """A random-init tiny fp32 train-mode model of `family`; NotTiny (with the reason) when it cannot be built."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_family_config(family, **variant)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        except Exception as exc:
            raise NotTiny(f"model does not build from the tiny config: {_one_line(exc)}") from None
    params = sum(p.numel() for p in model.parameters())
    if params > PARAM_LIMIT:
        raise NotTiny(f"{params / 1e6:.1f}M parameters at the tiny sizes (some size field is not shrinkable)")
    return model.float().train()
