"""Fused GPU kernels for the packed-document mixers, picked per device and checked before use.

Each mixer op has an exact torch twin that runs anywhere (CPU tests prove it per document) and,
on CUDA, an optional fused kernel from a package of the `[gpu]` extra, given the documents as
its own varlen argument:

    op                 torch twin (exact, any device)           fused (CUDA, when importable)
    causal conv1d      varlen_ops.varlen_causal_conv1d           causal_conv1d.causal_conv1d_fn(x [B, C, S]
                       (doc_ids [B, S])                            channel-last, seq_idx [B, S] int32)
    gated delta rule   varlen_scans.varlen_gated_delta_rule     fla.ops.gated_delta_rule.chunk_gated_delta_rule
                                                                   (rows flattened to THD, cu_seqlens)
    SSD scan           varlen_scans.ssd_scan_varlen              mamba_ssm ... mamba_chunk_scan_combined
                                                                   (seq_idx [B, S] int32)

`pick(op, device, dtype)` returns the fused kernel only on CUDA, only when its package imports,
and only after it matched the twin there on a packed probe (documents of 1, 7 and many tokens,
forward and input gradients; cp.kernel_check). Otherwise, with a warning when a check failed, the
twin. Both take the twin's arguments and return its layout, so the mixers never branch.

Imports only downward: cp (kernel_check, documents), models.mixers.varlen_ops, models.mixers.varlen_scans; never a wrapper.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cp import kernel_check
from cp.documents import cu_seqlens_from_doc_ids, seq_idx_from_doc_ids
from models.mixers.varlen_ops import varlen_causal_conv1d
from models.mixers.varlen_scans import ssd_scan_varlen, varlen_gated_delta_rule

# -- fused adapters: the twin's signature in, the twin's layout out --------------------------------


def fused_causal_conv1d(x, weight, bias, doc_ids, *, activation=None):
    """x [B, S, C] -> causal_conv1d_fn on the channel-last view [B, C, S] with seq_idx."""
    from causal_conv1d import causal_conv1d_fn

    if weight.dim() == 3:
        weight = weight.squeeze(1)  # [C, 1, K] -> [C, K]
    out = causal_conv1d_fn(x.transpose(1, 2), weight, bias, seq_idx=seq_idx_from_doc_ids(doc_ids),
                           activation=activation)  # [B, S, C] -> channel-last [B, C, S] (stride 1 on C)
    return out.transpose(1, 2)  # [B, C, S] -> [B, S, C]


def fused_gated_delta_rule(q, k, v, g, beta, doc_ids, *, use_qk_l2norm: bool = True, scale=None, chunk_size: int = 64):
    """fla's chunked gated delta rule over the rows flattened into one THD sequence with cu_seqlens."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    batch, seq_len, num_k, _ = k.shape
    num_v = v.shape[2]
    if num_v != num_k:  # value head j reads key head j // (Hv / Hk), like the twin
        q = q.repeat_interleave(num_v // num_k, dim=2)  # [B, S, Hk, Dk] -> [B, S, Hv, Dk]
        k = k.repeat_interleave(num_v // num_k, dim=2)  # [B, S, Hk, Dk] -> [B, S, Hv, Dk]
    thd = lambda t: t.reshape(1, batch * seq_len, *t.shape[2:])  # [B, S, ...] -> [1, B * S, ...]
    out, _ = chunk_gated_delta_rule(thd(q), thd(k), thd(v), g=thd(g.float()), beta=thd(beta), scale=scale,
                                    initial_state=None, output_final_state=False,
                                    cu_seqlens=cu_seqlens_from_doc_ids(doc_ids), use_qk_l2norm_in_kernel=use_qk_l2norm)
    return out.reshape(batch, seq_len, num_v, -1).to(v.dtype)  # [1, B * S, Hv, Dv] -> [B, S, Hv, Dv]


def fused_ssd_scan(x, dt, A, B, C, doc_ids, *, D=None, dt_bias=None, dt_softplus: bool = True,
                   dt_limit=(0.0, float("inf")), chunk_size: int = 64):
    """mamba-ssm's chunked SSD scan with seq_idx (state reset at every document start); float32 out."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    y = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                                  seq_idx=seq_idx_from_doc_ids(doc_ids), dt_softplus=dt_softplus,
                                  dt_limit=tuple(dt_limit))
    return y.float()


# -- probes: the same small packed case through fused and twin ------------------------------------


def _probe_docs(device, length: int = 72) -> torch.Tensor:
    return torch.tensor([[0] * 7 + [1] + [2] * (length - 8)], device=device)  # [1, S]: 7, 1, 64 tokens


def _randn(*shape, device, dtype, seed: int):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def probe_causal_conv1d(fused, twin, device, dtype) -> str | None:
    docs = _probe_docs(device)
    x = _randn(1, docs.shape[1], 48, device=device, dtype=dtype, seed=0)
    weight, bias = _randn(48, 4, device=device, dtype=dtype, seed=1), _randn(48, device=device, dtype=dtype, seed=2)
    return kernel_check.probe_function(fused, twin, [x, weight, bias], dtype, doc_ids=docs, activation="silu")


def probe_gated_delta_rule(fused, twin, device, dtype) -> str | None:
    docs = _probe_docs(device)
    S = docs.shape[1]
    q, k = (_randn(1, S, 2, 32, device=device, dtype=dtype, seed=s) for s in (0, 1))
    v = _randn(1, S, 4, 32, device=device, dtype=dtype, seed=2)
    g = -torch.rand(1, S, 4, generator=torch.Generator().manual_seed(3)).to(device)  # log decay in (-1, 0]
    beta = torch.rand(1, S, 4, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    return kernel_check.probe_function(fused, twin, [q, k, v, g, beta], dtype, doc_ids=docs, use_qk_l2norm=True)


def probe_ssd_scan(fused, twin, device, dtype) -> str | None:
    docs = _probe_docs(device)
    S = docs.shape[1]
    x = _randn(1, S, 4, 16, device=device, dtype=dtype, seed=0)
    dt = _randn(1, S, 4, device=device, dtype=dtype, seed=1)
    A = -torch.rand(4, generator=torch.Generator().manual_seed(2)).to(device) - 0.5
    B, C = (_randn(1, S, 2, 8, device=device, dtype=dtype, seed=s) for s in (3, 4))
    D, dt_bias = torch.ones(4, device=device), torch.zeros(4, device=device)
    run = lambda scan: lambda x_, dt_, B_, C_: scan(x_, dt_, A, B_, C_, docs, D=D, dt_bias=dt_bias, chunk_size=32)
    return kernel_check.probe_function(run(fused), run(twin), [x, dt, B, C], dtype,
                                       names=["y", "dx", "ddt", "dB", "dC"])


@dataclass(frozen=True)
class MixerOp:
    name: str
    package: str  # the module that must import for the fused kernel
    fused: Callable
    twin: Callable
    probe: Callable  # probe(fused, twin, device, dtype) -> None | failure


MIXER_OPS = ("causal_conv1d", "gated_delta_rule", "ssd_scan")  # the ops a models.mixers.spec.MixerSpec can name


@functools.cache
def _twins() -> dict[str, MixerOp]:
    ops = [MixerOp("causal_conv1d", "causal_conv1d", fused_causal_conv1d, varlen_causal_conv1d, probe_causal_conv1d),
           MixerOp("gated_delta_rule", "fla.ops.gated_delta_rule", fused_gated_delta_rule, varlen_gated_delta_rule,
                   probe_gated_delta_rule),
           MixerOp("ssd_scan", "mamba_ssm.ops.triton.ssd_combined", fused_ssd_scan, ssd_scan_varlen, probe_ssd_scan)]
    return {op.name: op for op in ops}


def pick(op: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The kernel for mixer op `op` on (device, dtype): fused when on CUDA, importable and checked; else the twin."""
    spec = _twins()[op]
    if torch.device(device).type != "cuda" or not kernel_check.importable(spec.package):
        return spec.twin
    probe = lambda: spec.probe(spec.fused, spec.twin, device, dtype)
    return spec.fused if kernel_check.prefer(f"{op}:{spec.package}", device, dtype, probe) else spec.twin
