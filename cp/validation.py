"""Checks that run before any collective: a bad input fails here, on every rank, with the fix named
(an uneven shard or a missing head would otherwise deadlock or silently corrupt a collective)."""

from __future__ import annotations

import re

import torch
from torch import nn

from cp.params import CPParams


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: CPParams, window, sinks) -> None:
    """Shape and argument checks shared by the CP attention paths; raise before any collective."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q/k/v must be BSHD [B, S_local, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree on batch, "
                         "sequence or KV heads")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q head dim {q.shape[3]} differs from k head dim {k.shape[3]} (q {tuple(q.shape)}, k "
                         f"{tuple(k.shape)}): the scores q.k need equal head dims; check the model's q/k projections")
    if q.shape[0] != params.batch_size or q.shape[1] != params.local_len:
        raise ValueError(f"q has [B, S_local] = {list(q.shape[:2])} but CPParams describe "
                         f"[{params.batch_size}, {params.local_len}] (S_pad={params.padded_len}, cp={params.cp_size})")
    if window is not None and window < 1:
        raise ValueError(f"window={window}: a sliding window must be >= 1 (or None for full attention)")
    if sinks is not None and sinks.shape != (q.shape[2],):
        raise ValueError(f"sinks must have one logit per query head ({q.shape[2]}); got shape {tuple(sinks.shape)}")


# Sequence mixers that are not softmax attention, by class name. cptrain runs the listed ones under
# Ulysses (models/ has their wrappers); any other mixer family is refused rather than run wrong.
SUPPORTED_SEQUENCE_MIXERS = {
    "Qwen3_5GatedDeltaNet": "Qwen3.5 GatedDeltaNet (linear attention)",
    "Qwen3_5MoeGatedDeltaNet": "Qwen3.5-MoE GatedDeltaNet (linear attention)",
    "Qwen3NextGatedDeltaNet": "Qwen3-Next GatedDeltaNet (linear attention)",
    "NemotronHMamba2Mixer": "NemotronH Mamba2 (SSM)",
    # cptrain's own wrappers (models/), seen when apply_cp runs on an already prepared model
    "UlyssesGatedDeltaNet": "GatedDeltaNet under Ulysses (linear attention)",
    "UlyssesMamba2Mixer": "Mamba2 under Ulysses (SSM)",
}
# Class-name words that mark a recurrent / linear-attention / SSM / long-conv sequence mixer. Matched
# case-sensitively at a CamelCase word start ("GptOssModel" holds no "Ssm" word).
_SEQUENCE_MIXER_MARKERS = re.compile(
    r"(?:^|(?<=[a-z0-9_]))(?:DeltaNet|DeltaAttention|Mamba|Mixer|Ssm|SSM|LinearAttention|Lightning|Rwkv|RWKV"
    r"|RetNet|Retention|Hyena|ShortConv|LSTM|Lstm|Hgrn|HGRN|GatedLinear|RecurrentBlock|Rglru)")
# HF config layer-type names we understand (config.layer_types / layers_block_type).
_KNOWN_LAYER_TYPES = {"full_attention", "sliding_attention", "attention", "linear_attention", "mamba", "mlp", "moe",
                      "dense", "sparse"}


def _sequence_mixers(model: nn.Module) -> dict[str, str]:
    """{module path: class name} of every non-softmax sequence mixer (outermost match only)."""
    found: dict[str, str] = {}
    for path, module in model.named_modules():
        name = type(module).__name__
        if not (name in SUPPORTED_SEQUENCE_MIXERS or _SEQUENCE_MIXER_MARKERS.search(name)):
            continue
        if any(path.startswith(parent + ".") for parent in found):
            continue
        found[path] = name
    return found


def assert_cp_style_supports_model(cp_style: str, model: nn.Module) -> None:
    """Raise at startup if `model` cannot run exactly under `cp_style`, naming the fix.

    - attention must go through transformers' AttentionInterface (that is how CP attention is routed);
    - linear-attention / SSM mixers run only under Ulysses (ring and hybrid split the sequence the
      mixers' recurrences run along);
    - a mixer family cptrain has no CP path for is refused under every style.
    """
    if cp_style not in ("ulysses", "ring", "hybrid"):
        raise ValueError(f"unknown model.cp_style={cp_style!r}; choose ulysses, ring or hybrid")
    routes_attention = getattr(type(model), "_can_set_attn_implementation", None)
    if not (routes_attention() if routes_attention else getattr(model, "_supports_attention_backend", False)):
        raise ValueError(f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
                         "so CP attention cannot be installed: use a model whose attention does (Llama-style HF models)")
    config = getattr(model, "config", None)
    layer_types = set(getattr(config, "layer_types", None) or []) | set(getattr(config, "layers_block_type", None) or [])
    unknown = sorted(layer_types - _KNOWN_LAYER_TYPES)
    if unknown:
        raise ValueError(f"{type(model).__name__} has layer types {unknown} that cptrain has no CP path for; "
                         "refusing to run them silently wrong")
    for path, name in _sequence_mixers(model).items():
        if name not in SUPPORTED_SEQUENCE_MIXERS:
            raise ValueError(f"layer {path} ({name}) is a sequence mixer cptrain has no CP path for; "
                             "it would run silently wrong under any CP style")
        if cp_style != "ulysses":
            raise ValueError(f"{cp_style} CP cannot run linear-attention or SSM layers ({SUPPORTED_SEQUENCE_MIXERS[name]} "
                             f"at {path}): use model.cp_style=ulysses")
