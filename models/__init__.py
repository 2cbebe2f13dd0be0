"""Glue between HF transformers models and the cp core: the model as transformers ships it, run under CP.

    models.apply_cp(model, dims)   validate, register CP attention, wrap every registered mixer (apply.py)

    apply.py        apply_cp; plain_model (the untouched HF model the rollout copy and the export are built from)
    attention.py    the AttentionInterface function (ulysses / ring / hybrid) and the kernel deny-list
    traits.py       attention traits (windows, softcaps, RoPE scaling, ...): honoured or refused at startup
    hub_kernels.py  HF hub attention kernels as CP inner kernels
    mixers/         recurrent mixers under Ulysses: one file + one registry line per family, their varlen
                    torch kernels and fused CUDA twins
    memory/         long-context memory techniques: chunked LM head, tiled MLP, activation offload
    tiny/           tiny random-init models: the trainers' tiny:<family> builders and every family's sweep config
    moved_modules.py  old import paths (models.chunked_head, ...) keep working, with a warning

Imports only go downward: cp <- models <- trainer <- scripts (tests/test_layout.py).
"""

from models.apply import apply_cp
from models.moved_modules import alias_moved_modules

__all__ = ["apply_cp"]

MOVED_MODULES = {
    "models.mixer_spec": "models.mixers.spec", "models.mixer_families": "models.mixers.registry",
    "models.gated_deltanet": "models.mixers.gated_deltanet", "models.mamba2": "models.mixers.mamba2",
    "models.bamba": "models.mixers.bamba", "models.varlen_ops": "models.mixers.varlen_ops",
    "models.varlen_scans": "models.mixers.varlen_scans", "models.hf_mixers": "models.mixers.hf_conventions",
    "models.mixer_kernels": "models.mixers.fused_kernels", "models.chunked_head": "models.memory.chunked_head",
    "models.tiled_mlp": "models.memory.tiled_mlp", "models.activation_offload": "models.memory.activation_offload",
    "models.family_configs": "models.tiny.family_configs",
}
alias_moved_modules(MOVED_MODULES)
