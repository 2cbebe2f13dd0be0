"""CP attention for HF transformers models, installed through transformers' AttentionInterface.

    model(input_ids=shard, position_ids=global shard, cp_params=params)
      └─ decoder layer ─ attention module: q, k, v = proj(x); RoPE(global positions)
           └─ ALL_ATTENTION_FUNCTIONS["cptrain_cp_<inner>"](module, q, k, v, mask=None, scaling,
                                                             sliding_window, softcap, s_aux, cp_params=...)
                ├─ window, softcap: kwarg, else module attribute, else config (models.traits)
                └─ cp.{ulysses,ring,hybrid}_attention(BSHD shards, params, causal, scale, window, sinks)

A layer with a logit softcap runs on the explicit-softmax kernels that apply it (cp.kernels.
softcap_kernels: math under Ulysses, the math block kernel in the ring), whatever the inner kernel;
inner kernels that cannot take that path are refused at startup (models.traits). A value head dim
other than the query/key one (MLA: DeepSeek-V3, MiniCPM3) runs the ring on the math block kernel.

The registered function reads CPParams from the call's kwargs (transformers passes a model
forward's extra kwargs down to every attention function), so the style, the groups and the
documents of THIS micro-batch are used: no global state. No mask function is registered for the
name, so transformers builds no [S, S] mask: documents, causality and windows come from CPParams.

Inner kernels (`model.attn`): "sdpa", "eager" (run as cptrain's explicit softmax "math": the same
computation as HF's eager function, with masks from CPParams instead of a [B, 1, S, S] tensor, so
HF's eager mask is never built), "math", "lse", "flash_attention_2" / "flash_attention_3" (CUDA:
the flash-attn package's varlen kernel over the packed documents under Ulysses, flash-attn's block
kernel with LSE for ring / hybrid (window-cut pieces on torch's memory-efficient kernel); each
passes cptrain's exactness check on the device first, see cp.cuda_kernels); any other function registered with
transformers' AttentionInterface runs under Ulysses through cp.hf_kernel (given the mask it
needs); an HF hub kernel ("kernels-community/flash-attn2") is loaded and registered through
transformers' own loader at startup and then wrapped the same way (models.hub_kernels; a flash
one as the varlen kernel on that module). Known-bad kernels are a deny-list with reasons, refused
at startup.

The registered name is "cptrain_cp_<inner>", except that flash kernels register as
"cptrain_cp_fa2" / "_fa3": transformers treats any implementation whose name contains "flash" as
its own flash-attn path (padding-free kwargs, installation checks), which the CP wrapper is not.
"""

from __future__ import annotations

import importlib
import re

import torch
from transformers import AttentionInterface

import cp
from cp.cuda_kernels import FLASH_MODULES, flash_varlen_kernel
from cp.kernels import softcap_kernels
from cp.params import CPParams
from models.hub_kernels import hub_local_kernel, is_hub_kernel, load_hub_kernel, registered_suffix
from models.traits import NOT_PASSED, SOFTCAP_KERNELS, layer_softcap, layer_window

CP_ATTENTION_PREFIX = "cptrain_cp"

# model.attn -> (Ulysses local kernel, ring/hybrid block kernel)
INNER_KERNELS = {
    "sdpa": ("auto", "auto"),  # torch SDPA with the CP document/window mask; LSE path for sinks
    "eager": ("math", "math"),  # HF's eager math (explicit softmax), masks from CPParams
    "math": ("math", "math"),  # explicit fp32 softmax: the exact reference path
    "lse": ("lse", "auto"),  # fused block kernel with LSE (cpu_flash on CPU)
}
DENIED_KERNELS = {
    "flex_attention": "its BlockMask is built for the local shard length, and flex_attention has no CPU backward; "
                      "use model.attn=sdpa",
    "paged_attention": "inference-only (paged KV cache); use model.attn=sdpa",
    "sdpa_paged": "inference-only (paged KV cache); use model.attn=sdpa",
}
# no "flash" in the name (see above); hub kernels ("<org>/<repo>") are added as registered (models.hub_kernels)
_REGISTERED_SUFFIX = {"flash_attention_2": "fa2", "flash_attention_3": "fa3"}
STYLE_OPTION_DEFAULTS = {"chunks": 1}  # CPStyle.options cptrain exposes (model.ulysses_chunks), at their defaults
_OPTION_TAIL = re.compile("(?:" + "|".join(f"_{key}\\d+" for key in STYLE_OPTION_DEFAULTS) + ")+$")


def check_inner_kernel(attn: str, cp_style: str) -> None:
    """Refuse, at startup, an inner kernel that cannot run exactly under `cp_style`."""
    if attn.startswith(CP_ATTENTION_PREFIX):
        raise ValueError(f"model.attn={attn!r} is cptrain's own wrapper name; give the inner kernel (e.g. sdpa)")
    if attn in DENIED_KERNELS:
        raise ValueError(f"model.attn={attn} is refused under CP: {DENIED_KERNELS[attn]}")
    if attn in INNER_KERNELS:
        return
    if is_hub_kernel(attn):  # "<org>/<repo>": loaded and registered through transformers (models.hub_kernels)
        load_hub_kernel(attn, cp_style)
        return
    if attn in FLASH_MODULES:
        try:
            importlib.import_module(FLASH_MODULES[attn])
        except ImportError:
            raise ValueError(f"model.attn={attn} needs the {FLASH_MODULES[attn]} package and CUDA (pip install "
                             "'cptrain[gpu]' on a GPU machine); or use model.attn=sdpa") from None
        return
    if attn not in AttentionInterface._global_mapping:
        raise ValueError(f"model.attn={attn!r} is neither a cptrain kernel ({sorted(INNER_KERNELS)}) nor registered "
                         "with transformers' AttentionInterface")
    if cp.get_style(cp_style).kernel_kind != "local":
        local = [name for name, style in cp.CP_STYLES.items() if style.kernel_kind == "local"]
        raise ValueError(f"model.attn={attn!r} is a plain attention function without log-sum-exp; {cp_style} CP merges "
                         f"blocks by LSE: use model.attn=sdpa (or math), or model.cp_style={' or '.join(local)}")


def _kernels_for(attn: str, module: torch.nn.Module, q: torch.Tensor, sinks: torch.Tensor | None, style: cp.CPStyle):
    """(local kernel, block kernel) for inner kernel `attn` on q's device and dtype."""
    if attn in INNER_KERNELS:
        return INNER_KERNELS[attn]
    if attn in FLASH_MODULES:  # ring / hybrid and sink layers (they need the LSE): the fused block kernel
        varlen = style.kernel_kind == "local" and sinks is None
        return (flash_varlen_kernel(attn, q.device, q.dtype) if varlen else "lse"), "cuda_flash"
    if is_hub_kernel(attn):  # Ulysses only (checked at startup); sink layers need the LSE: the "lse" kernel
        return ("lse" if sinks is not None else hub_local_kernel(attn, module, q)), None
    return cp.hf_kernel(AttentionInterface._global_mapping[attn], module), None  # Ulysses only (checked at startup)


def make_cp_attention(attn: str, options: dict | None = None):
    """The AttentionInterface function for inner kernel `attn` (BHSD in, BSHD out, like HF's). options: the
    style's extra keywords (CPStyle.options, e.g. Ulysses' chunks), passed to the styles that take them."""
    options = dict(options or {})

    def cp_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             sliding_window: int | None = NOT_PASSED, s_aux: torch.Tensor | None = None,
                             cp_params: CPParams | None = None, **kwargs):
        if cp_params is None:
            raise ValueError(f"{type(module).__name__} runs CP attention but the model was called without cp_params: "
                             "pass cp_params=batch.params (from cp.setup_cp_params) to the model's forward")
        if attention_mask is not None:
            raise ValueError("CP attention got an attention_mask: packing and padding come from CPParams; "
                             "call the model without attention_mask")
        if dropout and module.training:
            raise ValueError("attention dropout is not supported under CP (set the config's attention_dropout=0)")
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, S_local, D] -> [B, S_local, H, D]
        style = cp.get_style(cp_params.style)
        softcap = layer_softcap(module, kwargs.get("softcap"))
        if softcap is None:
            local_kernel, block_kernel = _kernels_for(attn, module, q, s_aux, style)
        elif attn in SOFTCAP_KERNELS:
            local_kernel, block_kernel = softcap_kernels(softcap)
        else:  # refused at startup by models.traits; kept for functions called outside apply_cp
            raise ValueError(f"{type(module).__name__} caps attention logits (softcap={softcap}), which "
                             f"model.attn={attn} cannot do under CP: use model.attn=eager")
        if v.shape[-1] != q.shape[-1] and softcap is None:  # MLA-style value head dim: fused block kernels
            block_kernel = "math"  # want one head dim; the math block kernel takes any value head dim
        kernel = local_kernel if style.kernel_kind == "local" else block_kernel
        style_options = {key: value for key, value in options.items() if key in style.options}
        out = style.attention(q, k, v, cp_params, causal=getattr(module, "is_causal", True), scale=scaling,
                              window=layer_window(module, sliding_window), sinks=s_aux, kernel=kernel, **style_options)
        return out, None  # [B, S_local, H, D], no attention weights

    return cp_attention_forward


def register_cp_attention(attn: str, options: dict | None = None) -> str:
    """Register the CP attention function for inner kernel `attn` with the style options (e.g. {"chunks": 2});
    returns the implementation name (the options are part of it when not the defaults)."""
    if is_hub_kernel(attn):
        _REGISTERED_SUFFIX[attn] = registered_suffix(attn)
    chosen = {key: value for key, value in (options or {}).items() if value != STYLE_OPTION_DEFAULTS[key]}
    tail = "".join(f"_{key}{value}" for key, value in sorted(chosen.items()))  # e.g. "cptrain_cp_sdpa_chunks2"
    name = f"{CP_ATTENTION_PREFIX}_{_REGISTERED_SUFFIX.get(attn, attn)}{tail}"
    AttentionInterface.register(name, make_cp_attention(attn, chosen))
    return name


def inner_kernel_of(name: str) -> str | None:
    """The inner kernel of a registered CP attention name (None when `name` is not one)."""
    if not name.startswith(CP_ATTENTION_PREFIX + "_"):
        return None
    suffix = _OPTION_TAIL.sub("", name[len(CP_ATTENTION_PREFIX) + 1:])
    return {v: k for k, v in _REGISTERED_SUFFIX.items()}.get(suffix, suffix)
