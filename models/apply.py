"""models.apply_cp: make an HF transformers model run under context parallelism, from the outside.

    apply_cp(model, dims, attn=None)
      1. cp.assert_cp_style_supports_model(dims.cp_style, model)   refuse what would run wrong
      2. check the attention heads against the Ulysses degree and chunks (fail at startup, not step 900)
         and the attention traits (models.traits: RoPE, chunking, softcap vs kernel); HF's own mask per
         layer, probed on a tiny twin (models.mask_probe): a window only the mask carries is learned,
         any other restriction CP attention would not reproduce is refused; a forward pre-hook refuses
         the inputs that would reshape HF's mask at call time (models.mask_inputs: token_type_ids, masks)
      3. register "cptrain_cp_<attn>" with AttentionInterface and switch the model to it (style
         options such as Ulysses' chunks go with the registration: "cptrain_cp_<attn>_chunks2")
      4. for every registered mixer family (models.mixers.registry: Gated DeltaNet, NemotronH Mamba2,
         Bamba Mamba2), wrap each module its spec matches: spec.wrap(module, dims, mixer_cp) (mixer_cp=ulysses:
         the head split checked; mixer_cp=state: the recurrent state passed between shards, cp.state_passing)
      5. config.use_cache = False                                    (CP is for training passes)

Call it before FSDP's fully_shard. Nothing is renamed: the wrappers adopt each mixer's children and
parameters under their own names, so state_dict keys, parameter names, HF checkpoints and PEFT
target_modules are those of the untouched transformers model. Then call the model with
`model(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=batch.params)`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import cp
from cp.ulysses import check_ulysses_heads
from models.attention import check_inner_kernel, inner_kernel_of, register_cp_attention
from models.mask_inputs import install_mask_input_guard
from models.mask_probe import check_masks_match
from models.mixers.registry import MIXER_FAMILIES
from models.traits import check_attention_traits


def _configured_attn(model: nn.Module) -> str:
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    return inner_kernel_of(attn) or attn  # apply_cp ran before: keep its inner kernel


def _check_heads(model: nn.Module, dims: cp.ParallelDims, chunks: int) -> None:
    """The attention heads against the Ulysses degree and the head chunks (cp.CPConfigError naming the fix)."""
    config = getattr(model.config, "text_config", None) or model.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads is None:
        return
    if heads % kv_heads:
        raise ValueError(f"{heads} attention heads are not a multiple of {kv_heads} KV heads")
    check_ulysses_heads(heads, kv_heads, dims.ulysses, chunks)


def _style_options(dims: cp.ParallelDims, chunks: int) -> dict:
    """The style options apply_cp was given, refused for a style that does not take them."""
    if chunks != 1 and "chunks" not in dims.style.options:
        takes = [name for name, style in cp.CP_STYLES.items() if "chunks" in style.options]
        raise cp.CPConfigError(f"chunks={chunks} pipelines Ulysses' all-to-alls by head groups; cp_style="
                               f"{dims.cp_style} does not take it: use chunks=1 or cp_style={' or '.join(takes)}",
                               "chunks", "cp_style")
    return {"chunks": chunks}


def _replace_modules(model: nn.Module, predicate, wrap) -> int:
    targets = [path for path, module in model.named_modules() if path and predicate(module)]
    for path in targets:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, wrap(getattr(parent, child)))
    return len(targets)


MIXER_CP = ("ulysses", "state")


def _check_mixer_cp(model: nn.Module, mixer_cp: str) -> None:
    """model.mixer_cp names a known mode, and `state` a model with a mixer that has a state-passing path."""
    if mixer_cp not in MIXER_CP:
        raise cp.CPConfigError(f"mixer_cp={mixer_cp!r}: use one of {list(MIXER_CP)}", "mixer_cp")
    if mixer_cp == "ulysses":
        return
    families = [spec for spec in MIXER_FAMILIES if any(spec.matches(m) or isinstance(m, spec.wrapper)
                                                       for m in model.modules())]
    if not families:
        raise cp.CPConfigError(f"mixer_cp=state passes recurrent states between shards, but "
                               f"{type(model).__name__} has no Gated DeltaNet or Mamba2 mixer: use mixer_cp=ulysses",
                               "mixer_cp")
    without = [spec.name for spec in families if "state" not in spec.mixer_cp]
    if without:
        raise cp.CPConfigError(f"mixer_cp=state: the mixer families {without} have no state-passing path: use "
                               "mixer_cp=ulysses", "mixer_cp")


def apply_cp(model: nn.Module, dims: cp.ParallelDims, *, attn: str | None = None, chunks: int = 1,
             mixer_cp: str = "ulysses") -> nn.Module:
    """Install CP on `model` in place (and return it). attn: the inner attention kernel (model.attn;
    default: what the model was configured with, e.g. "sdpa"). chunks: Ulysses' head-chunked pipelined
    all-to-alls (model.ulysses_chunks; cp.ulysses_attention(chunks=)), 1 = one all-to-all per tensor.
    mixer_cp (model.mixer_cp): how recurrent mixers split the sequence: "ulysses" (their heads, all-to-all) or
    "state" (contiguous shards of every head, the state passed between ranks: cp.state_passing)."""
    _check_mixer_cp(model, mixer_cp)
    cp.assert_cp_style_supports_model(dims.cp_style, model)
    attn = attn or _configured_attn(model)
    check_inner_kernel(attn, dims.cp_style)
    options = _style_options(dims, chunks)
    _check_heads(model, dims, chunks)
    check_attention_traits(model, attn)
    check_masks_match(model)  # HF's own mask per layer vs what CP applies: learned or refused
    install_mask_input_guard(model)  # inputs that would reshape HF's mask: refused per call
    # The wrappers check each mixer's head split against the Ulysses degree as they are installed.
    for spec in MIXER_FAMILIES:
        _replace_modules(model, spec.matches, lambda m, spec=spec: spec.wrap(m, dims, mixer_cp))
    model.set_attn_implementation(register_cp_attention(attn, options))
    model.config.use_cache = False
    return model


# Inner kernels that are transformers implementation names too; cptrain's own ("math", "lse") map to sdpa.
_HF_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def plain_model(model: nn.Module) -> nn.Module:
    """A plain transformers model of `model`'s config without CP (random init, fp32; load the weights with
    load_state_dict: apply_cp renames nothing): attention as before apply_cp (sdpa for cptrain-only inner
    kernels), use_cache on. What the GRPO rollout copy and the HF export are built from."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    inner = inner_kernel_of(str(config._attn_implementation))
    if inner is not None:
        config._attn_implementation = inner if inner in _HF_IMPLEMENTATIONS else "sdpa"
    config.use_cache = True
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
