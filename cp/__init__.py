"""cptrain's model-agnostic context-parallel core.

    ParallelDims ──build()──> DeviceMesh (dp, cp_ring, cp_ulysses; flattened cp, dp_cp)
    setup_cp_params(full batch) ──> CPBatch(local shards, CPParams)
    ulysses_attention(q, k, v, params)    all-to-all seq<->head around any local kernel
    ring_attention(q, k, v, params)       K/V ring with online-softmax merge (zigzag balanced)
    hybrid_attention(q, k, v, params)     Ulysses inside cp_ulysses groups x ring across cp_ring
    shard / unshard                       full tensor <-> this rank's shard (layouts registry)
    state_passing.ShardChain              recurrent mixers' state across contiguous shards (model.mixer_cp=state)
    CP_STYLES                             the style registry (cp.styles): levels, layout, attention function,
                                          kernel kind, whether recurrent mixers may run; read by all the above

Everything takes its groups and per-batch metadata explicitly (CPParams); nothing is global.
"""

from cp.block_kernels import BLOCK_KERNELS, merge_attention
from cp.collectives import RingExchange, gather_seq, head_to_seq, seq_to_head
from cp.dims import CPSubgroup, ParallelDims
from cp.hybrid import hybrid_attention
from cp.kernels import KERNELS, hf_kernel, resolve_kernel
from cp.layouts import LAYOUTS, get_layout, shard_indices
from cp.masks import AttnMask
from cp.params import CPBatch, CPParams, setup_cp_params, shard, unshard
from cp.ring import ring_attention
from cp.styles import CP_STYLES, CPConfigError, CPStyle, get_style, register_cp_style
from cp.ulysses import ulysses_attention
from cp.validation import assert_cp_style_supports_model

__all__ = [
    "AttnMask", "BLOCK_KERNELS", "CPBatch", "CPConfigError", "CPParams", "CPStyle", "CPSubgroup", "CP_STYLES", "KERNELS",
    "LAYOUTS", "ParallelDims", "RingExchange", "assert_cp_style_supports_model", "gather_seq", "get_layout", "get_style",
    "head_to_seq", "hf_kernel", "hybrid_attention", "merge_attention", "register_cp_style", "resolve_kernel",
    "ring_attention", "seq_to_head", "setup_cp_params", "shard", "shard_indices", "ulysses_attention", "unshard",
]
