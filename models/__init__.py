"""Glue between HF transformers models and the cp core.

    models.apply_cp(model, dims)      validate, register CP attention, wrap every registered mixer
    attention.py                      the AttentionInterface function (ulysses / ring / hybrid)
    mixer_spec.py, mixer_families.py  MixerSpec (a mixer family described once) and the registry of them
    gated_deltanet.py, mamba2.py,     one file per mixer family: its Ulysses wrapper and SPEC
      bamba.py                          (bamba.py: the worked example, reusing mamba2's wrapper)
    varlen_ops.py, varlen_scans.py    exact varlen torch kernels (conv; delta rule, SSD scan)
    mixer_kernels.py                  fused CUDA twins, checked against them; imports only downward
"""

from models.apply import apply_cp

__all__ = ["apply_cp"]
