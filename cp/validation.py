"""Checks that run before any collective: a bad input fails here, on every rank, with the fix named
(an uneven shard or a missing head would otherwise deadlock or silently corrupt a collective).

    models/ (at import) ── register_sequence_mixer(class, description, cp_styles=)
                              └─> SUPPORTED_SEQUENCE_MIXERS, MIXER_CP_STYLES
    assert_cp_style_supports_model(style, model)   attention routed, layer types known,
                                                   every sequence mixer registered, mixers only under
                                                   styles that allow them (cp.styles: recurrent_mixers)

cp never imports models/: the mixer families it accepts are the ones models/ registered (or the
`supported_mixers` a caller passes).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from cp.params import CPParams
from cp.styles import CP_STYLES, CPConfigError, get_style


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


# Sequence mixers that are not softmax attention, by class name -> description. cp lists none itself:
# models/ registers every mixer family it has a Ulysses wrapper for (models.mixers.registry, at import, through
# register_sequence_mixer); any other mixer family is refused rather than run wrong.
SUPPORTED_SEQUENCE_MIXERS: dict[str, str] = {}
MIXER_CP_STYLES: dict[str, tuple[str, ...] | None] = {}  # class name -> its CP styles (None: every style that
# allows recurrent mixers, CPStyle.recurrent_mixers)


def register_sequence_mixer(class_name: str, description: str, *, cp_styles=None) -> None:
    """Declare `class_name` a sequence mixer cptrain runs under `cp_styles` (None: every style whose registry
    entry allows recurrent mixers). Called by models/ for each family."""
    SUPPORTED_SEQUENCE_MIXERS[class_name] = description
    MIXER_CP_STYLES[class_name] = None if cp_styles is None else tuple(cp_styles)


def mixer_styles(class_name: str) -> list[str]:
    """The CP styles a registered sequence mixer runs under: its own list, within the styles that allow
    recurrent mixers."""
    allowed = [name for name, style in CP_STYLES.items() if style.recurrent_mixers]
    own = MIXER_CP_STYLES.get(class_name)
    return allowed if own is None else [name for name in allowed if name in own]


# Class-name words that mark a recurrent / linear-attention / SSM / long-conv sequence mixer. Matched
# case-sensitively at a CamelCase word start ("GptOssModel" holds no "Ssm" word).
_SEQUENCE_MIXER_MARKERS = re.compile(
    r"(?:^|(?<=[a-z0-9_]))(?:DeltaNet|DeltaAttention|Mamba|Mixer|Ssm|SSM|LinearAttention|Lightning|Rwkv|RWKV"
    r"|RetNet|Retention|Hyena|ShortConv|LSTM|Lstm|Hgrn|HGRN|GatedLinear|RecurrentBlock|Rglru)")
# HF config layer-type names we understand (config.layer_types / layers_block_type).
_KNOWN_LAYER_TYPES = {"full_attention", "sliding_attention", "attention", "linear_attention", "mamba", "mlp", "moe",
                      "dense", "sparse"}


def _sequence_mixers(model: nn.Module, supported) -> dict[str, str]:
    """{module path: class name} of every non-softmax sequence mixer (outermost match only)."""
    found: dict[str, str] = {}
    for path, module in model.named_modules():
        name = type(module).__name__
        if not (name in supported or _SEQUENCE_MIXER_MARKERS.search(name)):
            continue
        if any(path.startswith(parent + ".") for parent in found):
            continue
        found[path] = name
    return found


def assert_cp_style_supports_model(cp_style: str, model: nn.Module, *, supported_mixers: dict[str, str] | None = None
                                   ) -> None:
    """Raise at startup if `model` cannot run exactly under `cp_style`, naming the fix.

    supported_mixers: {class name: description} of the mixers with a CP path (default: the ones models/
    registered, SUPPORTED_SEQUENCE_MIXERS).

    - attention must go through transformers' AttentionInterface (that is how CP attention is routed);
    - linear-attention / SSM mixers run only under styles whose registry entry allows them
      (CPStyle.recurrent_mixers: Ulysses; ring and hybrid split the sequence their recurrences run along);
    - a mixer family cptrain has no CP path for is refused under every style.
    """
    get_style(cp_style)  # an unknown style fails here
    supported = SUPPORTED_SEQUENCE_MIXERS if supported_mixers is None else supported_mixers
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
    for path, name in _sequence_mixers(model, supported).items():
        if name not in supported:
            raise ValueError(f"layer {path} ({name}) is a sequence mixer cptrain has no CP path for; "
                             "it would run silently wrong under any CP style")
        styles = mixer_styles(name)
        if cp_style not in styles:
            raise CPConfigError(f"{cp_style} CP cannot run linear-attention or SSM layers ({supported[name]} at {path}): "
                                f"their recurrences need every token of a head on one rank; use cp_style="
                                f"{' or '.join(styles)}", "cp_style")
