"""Inputs that would reshape HF's attention mask: refused on a CP model's forward.

The mask probe (models/mask_probe.py) settles, at apply_cp, every mask restriction a family derives from its
CONFIG (windows, chunks, bidirectional layers). Some families also derive one from their INPUTS, through the
`or_mask_function` / `and_mask_function` of HF's mask builders:

    Gemma3 (token_type_ids), Gemma4 / DiffusionGemma (mm_token_type_ids)   image spans see each other both ways
    ESMC (sequence_id)                                                      packed sequences
    any family, attention_mask with zeros or a 4D mask                     padding / a custom mask

(found by reading every family's create_*_mask calls in transformers 5.24; the other or/and mask functions
come from the config, which the probe covers, or belong to audio / vision encoders).

Under CP attention transformers builds no mask at all (the CP function registers no mask function: documents,
causality and windows come from CPParams), so such an input would be dropped in silence. apply_cp installs
refuse_mask_inputs as a forward pre-hook on the model: a call that carries one of them raises before any
collective, naming the fix. A 2D attention_mask of ones restricts nothing and is accepted.
"""

from __future__ import annotations

import torch
from torch import nn

# forward kwargs HF's modeling code turns into or/and mask functions (see the docstring)
MASK_SHAPING_INPUTS = ("token_type_ids", "mm_token_type_ids", "sequence_id")


def _restricting_attention_mask(mask) -> bool:
    if mask is None:
        return False
    if isinstance(mask, dict) or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return True  # per-layer-type dicts, 4D masks, BlockMasks: a custom mask CP attention does not read
    return not bool(mask.bool().all())


def refuse_mask_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook (with_kwargs=True): ValueError for an input that would reshape HF's mask under CP."""
    shaping = [name for name in MASK_SHAPING_INPUTS if kwargs.get(name) is not None]
    if shaping:
        raise ValueError(f"{type(module).__name__} was called with {shaping} under CP: families turn them into "
                         "bidirectional spans or document cuts in HF's attention mask (Gemma3 image tokens), "
                         "which CP attention does not apply, and cptrain does not shard them; train text-only "
                         "(leave them out, documents through cp.setup_cp_params(seq_lens=...)) or use model.cp=1")
    if _restricting_attention_mask(kwargs.get("attention_mask")):
        raise ValueError(f"{type(module).__name__} was called with an attention_mask that masks tokens (or a "
                         "custom 4D / per-layer mask): CP attention builds its mask from CPParams and would "
                         "ignore it; pass documents and padding through cp.setup_cp_params(seq_lens=...) and "
                         "leave attention_mask out")


def install_mask_input_guard(model: nn.Module) -> None:
    """Register refuse_mask_inputs on the model once (apply_cp may run again on the same model)."""
    if not getattr(model, "_cptrain_mask_input_guard", False):
        model.register_forward_pre_hook(refuse_mask_inputs, with_kwargs=True)
        model._cptrain_mask_input_guard = True
