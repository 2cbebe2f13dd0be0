"""Glue between HF transformers models and the cp core.

    models.apply_cp(model, dims)      validate, register CP attention, wrap DeltaNet / Mamba2 mixers
    attention.py                      the AttentionInterface function (ulysses / ring / hybrid)
    gated_deltanet.py, mamba2.py      Ulysses wrappers and exact varlen CPU kernels, one per family
"""

from models.apply import apply_cp

__all__ = ["apply_cp"]
