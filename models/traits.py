"""Attention traits of an HF model: each one honoured by the CP attention function or refused at startup.

    models.apply_cp(model, dims, attn)
      └─ check_attention_traits(model, attn)                     refuse what CP cannot honour (startup)
    cp_attention_forward(module, q, k, v, ..., sliding_window=kw, softcap=kw, ...)
      ├─ layer_window(module, kw)    kwarg, else the module's `sliding_window`, else the config's
      │                              window for this layer's type         -> cp.*_attention(window=)
      └─ layer_softcap(module, kw)   kwarg, else module attribute, else config  -> softcap kernels

A trait can come from a call kwarg, a module attribute or the config (DESIGN rule 12): all three
are read, in that order. A `sliding_window` kwarg, None included, is the family's per-layer
decision (Exaone4 keeps `module.sliding_window` on its full layers and passes None there); without
one (Qwen2-MoE keeps the window on the module and config only) a layer the config's
`layer_types[layer_idx]` (or `module.is_sliding`) marks full gets none, else the module's
`sliding_window`, else the config's window on a layer marked "sliding_attention". Which families
need which source is found by the family sweep (tests/family_sweep.py), not assumed.

Honoured:
    sliding windows (kwarg / module / config)     every style, judged on global positions
    logit softcap (tanh capping, Gemma2-style)    every style: the explicit-softmax kernels apply
                                                  it (Ulysses: math; ring / hybrid: the math block
                                                  kernel, its backward through the tanh)
Refused (ValueError naming the fix):
    attention classes listed in REFUSED_ATTENTION (found by the family sweep: a mask built inside
        attention, kwargs not passed down to attention), and position ids derived from input_ids
        (RoBERTa-style padding offsets) instead of the document positions CP passes.
    RoPE whose frequencies depend on the sequence length (rope_type dynamic / longrope): HF picks
        them from the largest position the rotary module sees, under packing or CP a shard of
        several documents, not each document: a document would not get what it gets alone.
    chunked attention (attention_chunk_size, Llama4-style): not a sliding window; no CP mask for it.
    softcap with an inner kernel that cannot cap (flash, a registered HF function).
Attention dropout is refused at the first training forward (models/attention.py), not here: a
model in eval use (an RL reference model) with a nonzero dropout config runs exactly.
"""

from __future__ import annotations

from torch import nn

# Attention classes the family sweep found running wrong or unreachable under CP, with no generic
# trait to detect them by: refused by name, the reason says why.
REFUSED_ATTENTION = {
    "DogeAttention": "it builds its own dynamic mask inside attention and passes it as attention_mask (a bias over "
                     "the local shard that CP cannot rebuild per document)",
    "StableLmAttention": "its decoder layer does not pass the forward's kwargs on to attention, so cp_params "
                         "(and the documents of the batch) never reach it",
    "NemotronAttention": "its decoder layer does not pass the forward's kwargs on to attention, so cp_params "
                         "(and the documents of the batch) never reach it",
}
SOFTCAP_KERNELS = ("sdpa", "eager", "math", "lse")  # inner kernels whose CP path can apply a softcap (math)
_SOFTCAP_FIELDS = ("softcap", "attn_logit_softcapping", "logit_softcapping", "attention_logit_softcapping")
_CHUNK_FIELDS = ("attention_chunk_size",)
# config fields that size a window or a chunk of attention (HF's masks or attention calls may apply them)
WINDOW_FIELDS = ("sliding_window", "sliding_window_size", "attention_window_size", "window_size",
                 "local_attention_window_len", "attention_chunk_size", "local_attention")
_SEQ_DEPENDENT_ROPE = ("dynamic", "longrope")


def _config_of(module: nn.Module):
    config = getattr(module, "config", None)
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


NOT_PASSED = object()  # the attention call had no sliding_window kwarg (not even None)
# a window only HF's mask function applies (PhiMoE), learned per module by models.mask_probe at apply_cp
MASK_WINDOW_ATTR = "cptrain_mask_window"


def layer_window(module: nn.Module, kwarg=NOT_PASSED) -> int | None:
    """This layer's sliding window.

    A `sliding_window` kwarg, None included, is the family's own per-layer decision (Exaone4 keeps
    `module.sliding_window` on full layers and passes None there). Without one (Qwen2-MoE: the
    window lives on the module / config only): not a full layer by `module.is_sliding` or the
    config's `layer_types`, then the module's `sliding_window`, else the config's window on a layer
    the config's `layer_types` marks as sliding. A window models.mask_probe learned from HF's own mask
    (set on the module by apply_cp, where none of these gives one) comes first."""
    learned = getattr(module, MASK_WINDOW_ATTR, None)
    if learned is not None:
        return learned
    if kwarg is not NOT_PASSED:
        return kwarg
    config, layer = _config_of(module), getattr(module, "layer_idx", None)
    types = getattr(config, "layer_types", None)
    layer_type = types[layer] if types and isinstance(layer, int) and layer < len(types) else None
    if getattr(module, "is_sliding", None) is False or layer_type == "full_attention":
        return None
    attr = getattr(module, "sliding_window", None)
    if isinstance(attr, int) and not isinstance(attr, bool):
        return attr
    window = getattr(config, "sliding_window", None)
    return window if layer_type == "sliding_attention" else None


def layer_softcap(module: nn.Module, kwarg: float | None) -> float | None:
    """This layer's attention logit softcap: the kwarg, else a module attribute, else the config."""
    if kwarg is not None:
        return kwarg
    for source in (module, _config_of(module)):
        for field in _SOFTCAP_FIELDS:
            value = getattr(source, field, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
                return float(value)
    return None


def _rope_types(model: nn.Module) -> set[str]:
    """Every RoPE type the model's config or rotary modules declare (per-layer-type dicts included)."""
    found: set[str] = set()

    def add(value):
        if isinstance(value, str):
            found.add(value)
        elif isinstance(value, dict):
            add(value.get("rope_type") or value.get("type"))
            for sub in value.values():
                if isinstance(sub, dict):
                    add(sub)

    config = model.config.get_text_config()
    for field in ("rope_parameters", "rope_scaling"):
        add(getattr(config, field, None))
    for module in model.modules():
        add(getattr(module, "rope_type", None))
    return found


def _softcap_layers(model: nn.Module) -> list[str]:
    config = model.config.get_text_config()
    found = [f"config.{f}" for f in _SOFTCAP_FIELDS if getattr(config, f, None)]
    found += [f"{path}.{f}" for path, m in model.named_modules() if path for f in _SOFTCAP_FIELDS
              if isinstance(getattr(m, f, None), (int, float)) and getattr(m, f)]
    return found


def check_attention_traits(model: nn.Module, attn: str) -> None:
    """Refuse, at startup, an attention trait the CP attention function cannot honour exactly (any
    style: cp=1 packs documents too). attn: the inner kernel (model.attn)."""
    config = model.config.get_text_config()
    dependent = sorted(t for t in _rope_types(model) if any(d in t for d in _SEQ_DEPENDENT_ROPE))
    if dependent:
        raise ValueError(f"{type(model).__name__} uses RoPE type {dependent}, whose frequencies depend on the longest "
                         "position the rotary module sees: packed or under CP that is a shard of several documents, "
                         "not each document, so documents would not get what they get alone. Use a static RoPE "
                         "(e.g. rope_type default / linear / yarn / llama3 in the config's rope_parameters)")
    for field in _CHUNK_FIELDS:
        if getattr(config, field, None):
            raise ValueError(f"{type(model).__name__} uses chunked attention ({field}={getattr(config, field)}), "
                             "which cptrain's CP masks do not express (they know documents, causality and sliding "
                             "windows): use a model without chunked attention")
    for path, module in model.named_modules():
        name = type(module).__name__
        if name in REFUSED_ATTENTION:
            raise ValueError(f"{type(model).__name__} cannot run under CP: {path} ({name}): {REFUSED_ATTENTION[name]}; "
                             "use another model family")
        if callable(getattr(module, "create_position_ids_from_input_ids", None)):
            raise ValueError(f"{type(model).__name__} derives position ids from input_ids ({path}: padding_idx + 1 "
                             "onwards, RoBERTa-style), not from the document positions CP passes: packed documents "
                             "would be embedded at the wrong positions; use a model with RoPE or plain position ids")
    softcap = _softcap_layers(model)
    if softcap and attn not in SOFTCAP_KERNELS:
        raise ValueError(f"{type(model).__name__} caps attention logits ({softcap[0]}); under CP the cap is applied "
                         f"by cptrain's explicit-softmax kernels, not by model.attn={attn}: use model.attn=eager "
                         "(or sdpa / math)")
