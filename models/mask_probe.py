"""What mask HF would give each attention layer, probed on a tiny twin, against what CP attention will apply.

CP attention builds no mask (models/attention.py): causality, documents and windows come from CPParams and
the layer's traits (models/traits.py). A family that restricts attention ONLY through HF's mask function
(PhiMoE: config.sliding_window, applied by create_sliding_window_causal_mask, no kwarg, no module
attribute, no layer_types) would silently run unrestricted. This probe asks HF itself:

    the model's config ──every size shrunk (layers and layer types kept), every window / chunk field set to
                         its own small probe value (3, 5, 7, ...)──> twin config ──type(model)──> tiny twin
    twin(one document of PROBE_LEN tokens), attention = a recording function whose mask function is HF's
        own sdpa_mask, always materialised ──> per attention module: HF's boolean mask [PROBE_LEN, PROBE_LEN],
                                                the sliding_window kwarg, module.is_causal
    per module: HF's mask ──band_of──> (causal, window) or "not expressible" (chunked, bidirectional spans, ...)
                what CP applies: (module.is_causal, traits.layer_window(module, kwarg)), in the twin
    probe values map back to the real config's values (window 3 in the twin = the field that held 3)

    agree                            nothing to do
    HF has a window, traits none     the window lives only in the mask: learned, set on the REAL module
                                     (traits.MASK_WINDOW_ATTR, read first by traits.layer_window)
    anything else                    refused at startup naming the layer, HF's mask and CP's

Cached per (model class, config); the twin runs on CPU in a fraction of a second whatever the real model's
size or device (a meta-device model in the memory planner too). A config that cannot be shrunk into a twin
is refused when it holds a window or chunk field (the mask cannot be verified), else passes: with no such
field HF's decoder masks are plain causal.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from models.tiny.family_configs import shrink_config_dict
from models.traits import MASK_WINDOW_ATTR, NOT_PASSED, WINDOW_FIELDS, layer_window

PROBE_LEN = 24
PROBE_ATTENTION = "cptrain_mask_probe"
# each window / chunk field the config sets gets its own probe value: a window seen in the twin names its field
_PROBE_VALUES = (3, 5, 7, 9, 11, 13, 15)


@dataclass(frozen=True)
class LayerMask:
    """One attention module's mask as (causal, window); window None = unlimited; expressible False = neither."""
    causal: bool
    window: int | None
    expressible: bool = True

    def describe(self) -> str:
        if not self.expressible:
            return "neither plain causal, causal with a sliding window, nor fully bidirectional (chunks, spans)"
        kind = "causal" if self.causal else "bidirectional"
        return f"{kind} with a sliding window of {self.window}" if self.window else f"plain {kind}"


def band_of(mask: torch.Tensor) -> LayerMask:
    """(causal, window) of a boolean [L, L] mask (True = query row may see key column), when it is one of the
    masks CP attention applies: causal with or without a sliding window, or full bidirectional."""
    length = mask.shape[-1]
    if bool(mask.all()):
        return LayerMask(False, None)
    seen = int(mask[length - 1].sum())  # the last query: min(window, L) keys in a causal band
    window = seen if seen < length else None
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    band = (k <= q) & ((q - k < window) if window else True)  # HF: kv_idx > q_idx - sliding_window
    return LayerMask(True, window) if torch.equal(mask, band) else LayerMask(True, None, expressible=False)


def _probe_fields(config) -> dict[str, int]:
    """field -> probe value, for the window / chunk fields the config sets."""
    fields = [f for f in WINDOW_FIELDS if isinstance(getattr(config, f, None), int)
              and not isinstance(getattr(config, f), bool) and getattr(config, f) > 0]
    return dict(zip(fields, _PROBE_VALUES))


def _twin_config(config):
    """The config with every size shrunk, layers kept, window fields at their probe values."""
    values = config.to_dict()
    overrides = shrink_config_dict(values, keep_layers=True)
    overrides.update(_probe_fields(config))
    twin = type(config).from_dict({**values, **overrides})
    twin.use_cache = False
    return twin


def _record_attention(calls: dict):
    def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        sliding_window=NOT_PASSED, **kwargs):
        mask = None if attention_mask is None else attention_mask[0, 0].bool()  # [B, 1, L, L] -> [L, L]
        calls.setdefault(id(module), (module, mask, sliding_window))
        batch, heads, length, _ = query.shape
        return query.new_zeros(batch, length, heads, value.shape[-1]), None  # BSHD; the values do not matter

    return probe_attention


def _materialised_sdpa_mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False  # a plain causal mask too, never None
    return sdpa_mask(*args, **kwargs)


def _register_probe(calls: dict) -> None:
    """(Re-)register the probe attention, recording into `calls`, and its always-materialised mask function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PROBE_ATTENTION, _record_attention(calls))
    AttentionMaskInterface.register(PROBE_ATTENTION, _materialised_sdpa_mask)


_CACHE: dict = {}  # (model class, config json) -> probe result: a pure function of the two


def probe_layer_masks(model: nn.Module) -> dict[str, tuple[LayerMask, LayerMask]] | str:
    """module path -> (HF's mask, CP's mask) for every attention module the twin's forward calls, in the real
    config's terms; or the reason no twin could be built."""
    config = model.config
    key = (type(model).__qualname__, config.to_json_string(use_diff=False))
    if key in _CACHE:
        return _CACHE[key]
    probe_values = {v: getattr(config, f) for f, v in _probe_fields(config).items()}

    def real(window):
        return probe_values.get(window, window) if window is not None else None

    calls: dict = {}
    try:
        with warnings.catch_warnings(), torch.device("cpu"):  # CPU even inside a meta-device context
            warnings.simplefilter("ignore")
            twin_config = _twin_config(config)
            twin_config._attn_implementation = PROBE_ATTENTION
            _register_probe(calls)
            torch.manual_seed(0)
            twin = type(model)(twin_config).eval()
            twin.set_attn_implementation(PROBE_ATTENTION)
            vocab = int(getattr(twin_config.get_text_config(), "vocab_size", 0) or 32)
            ids = (torch.arange(PROBE_LEN) % max(vocab - 2, 1) + 1)[None]  # [1, L]
            with torch.no_grad():
                twin(input_ids=ids, position_ids=torch.arange(PROBE_LEN)[None], use_cache=False)
    except Exception as exc:  # any failure to build or run the twin: reported, never ignored
        _CACHE[key] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        return _CACHE[key]
    paths = {id(m): path for path, m in twin.named_modules()}
    found = {}
    for module, mask, kwarg in calls.values():
        causal = bool(getattr(module, "is_causal", True))
        hf = band_of(mask) if mask is not None else LayerMask(causal, None)
        ours = LayerMask(causal, layer_window(module, kwarg))
        found[paths[id(module)]] = (LayerMask(hf.causal, real(hf.window), hf.expressible),
                                    LayerMask(ours.causal, real(ours.window)))
    _CACHE[key] = found
    return found


def check_masks_match(model: nn.Module) -> None:
    """Refuse (ValueError) an attention layer whose HF mask CP attention would not reproduce; learn a window that
    only HF's mask carries (set on the real module). Call before the CP attention is installed."""
    name = type(model).__name__
    probed = probe_layer_masks(model)
    if isinstance(probed, str):
        fields = {f: getattr(model.config, f) for f in _probe_fields(model.config)}
        if fields:
            raise ValueError(f"{name} sets {fields}, but cptrain could not build the tiny twin that checks which "
                             f"layers HF's mask applies it to ({probed}), so CP cannot honour it for sure; "
                             "use a model without that window, or a family the support matrix lists as exact")
        return
    modules = dict(model.named_modules())
    for path, (hf, ours) in sorted(probed.items()):
        if hf == ours:
            continue
        if hf.expressible and hf.causal == ours.causal and hf.window is not None and ours.window is None:
            setattr(modules[path], MASK_WINDOW_ATTR, hf.window)
            continue
        raise ValueError(f"{name}: HF's mask for {path} is {hf.describe()}, CP attention would apply "
                         f"{ours.describe()}; cptrain cannot reproduce it: use another model family (see "
                         "docs/support_matrix.md)")


def learned_mask_windows(model: nn.Module) -> dict[str, int]:
    """The windows check_masks_match learned from HF's masks (module path -> window)."""
    return {path: getattr(m, MASK_WINDOW_ATTR) for path, m in model.named_modules() if hasattr(m, MASK_WINDOW_ATTR)}
