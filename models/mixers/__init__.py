"""Recurrent sequence mixers (linear attention, SSMs) under CP: Ulysses (each rank runs whole sequences for its
heads) or, with model.mixer_cp=state, state passing (each rank its shard of every head; cp.state_passing).

    spec.py            MixerSpec: a family described once (HF classes, wrapper, wrap(), CP styles, kernels)
    registry.py        MIXER_FAMILIES: one line per family; hands every class to cp.validation at import
    gated_deltanet.py  Qwen3.5 / Qwen3-Next Gated DeltaNet       } one file per family:
    mamba2.py          NemotronH's Mamba2                         } its Ulysses wrapper and SPEC
    bamba.py           Bamba (reuses mamba2's wrapper: the worked example of adding a family)
    hf_conventions.py  what the wrappers share about transformers' modules (cache keywords, adopting HF names)
    varlen_ops.py      document-aware causal conv1d, doc ids          } exact varlen torch kernels (CPU,
    varlen_scans.py    varlen delta rule and SSD scan (state reset)   } and the reference for CUDA)
    fused_kernels.py   fused CUDA twins (fla, mamba-ssm, causal-conv1d), checked against the torch kernels
"""
