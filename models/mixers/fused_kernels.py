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
twin. Both take the twin's arguments and return its layout, so the mixers never branch. The
state-passing path (`entering_state=`: fla's initial_state / output_final_state, mamba-ssm's
return_final_states) is checked on its own probe (`pick(..., entering_state=True)`).

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
from models.mixers.varlen_scans import (
    discretise_dt,
    ssd_from_entering_state,
    ssd_scan_varlen,
    varlen_gated_delta_rule,
)

# -- fused adapters: the twin's signature in, the twin's layout out --------------------------------


def fused_causal_conv1d(x, weight, bias, doc_ids, *, activation=None):
    """x [B, S, C] -> causal_conv1d_fn on the channel-last view [B, C, S] with seq_idx."""
    from causal_conv1d import causal_conv1d_fn

    if weight.dim() == 3:
        weight = weight.squeeze(1)  # [C, 1, K] -> [C, K]
    out = causal_conv1d_fn(x.transpose(1, 2), weight, bias, seq_idx=seq_idx_from_doc_ids(doc_ids),
                           activation=activation)  # [B, S, C] -> channel-last [B, C, S] (stride 1 on C)
    return out.transpose(1, 2)  # [B, C, S] -> [B, S, C]


def fused_gated_delta_rule(q, k, v, g, beta, doc_ids, *, use_qk_l2norm: bool = True, scale=None, chunk_size: int = 64,
                           entering_state=None):
    """fla's chunked gated delta rule over the rows flattened into one THD sequence with cu_seqlens.

    entering_state (state-passing CP, the twin's contract): the outputs from a zero state as above, then one more
    fla call over each row's first and last documents only (one sequence where they are the same), with the values
    widened to [v | 0 (Dk)] and the initial state [0 | I]: by linearity, the last document's final state is then
    [its final state from zero | its transition], and the first document's extra output columns are Phi_t^T q_t
    (Phi_t: the transition from the document's start to t), so a state S entering the row adds S^T Phi_t^T q_t
    to its outputs. States are per row, never per document."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    batch, seq_len, num_k, head_k = k.shape
    num_v, head_v = v.shape[2], v.shape[3]
    if num_v != num_k:  # value head j reads key head j // (Hv / Hk), like the twin
        q = q.repeat_interleave(num_v // num_k, dim=2)  # [B, S, Hk, Dk] -> [B, S, Hv, Dk]
        k = k.repeat_interleave(num_v // num_k, dim=2)  # [B, S, Hk, Dk] -> [B, S, Hv, Dk]
    thd = lambda t: t.reshape(1, batch * seq_len, *t.shape[2:])  # [B, S, ...] -> [1, B * S, ...]
    q, k, v, g, beta = thd(q), thd(k), thd(v), thd(g.float()), thd(beta)
    cu_seqlens = cu_seqlens_from_doc_ids(doc_ids)
    out, _ = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, scale=scale, initial_state=None, output_final_state=False,
                                    cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm)
    if entering_state is not None:
        out = out + _entering_state_share(q, k, v, g, beta, cu_seqlens, batch, seq_len, entering_state,
                                          scale=scale, use_qk_l2norm=use_qk_l2norm).to(out.dtype)
    return out.reshape(batch, seq_len, num_v, -1).to(v.dtype)  # [1, B * S, Hv, Dv] -> [B, S, Hv, Dv]


def _entering_state_share(q, k, v, g, beta, cu_seqlens, batch: int, seq_len: int, entering_state, *, scale,
                          use_qk_l2norm: bool) -> torch.Tensor:
    """fused_gated_delta_rule's state-passing call (q, k, v, g, beta in THD [1, T, Hv, .]): what the states entering
    the rows add to the outputs [1, T, Hv, Dv] (zero outside each row's first document)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    num_v, head_k, head_v = v.shape[2], k.shape[3], v.shape[3]
    bounds = cu_seqlens.tolist()
    starts = bounds[:-1]
    first = [starts.index(row * seq_len) for row in range(batch)]  # every row start opens a document
    last = [f - 1 for f in first[1:]] + [len(starts) - 1]
    docs = sorted(set(first) | set(last))  # each row's first and last document (one where they are the same)
    tokens = torch.cat([torch.arange(bounds[d], bounds[d + 1], device=v.device) for d in docs])  # [T2]
    lengths = torch.tensor([bounds[d + 1] - bounds[d] for d in docs])
    sub_cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(cu_seqlens)
    pick = lambda t: t.index_select(1, tokens)  # [1, T, ...] -> [1, T2, ...]
    widened = torch.cat([pick(v), v.new_zeros(1, tokens.numel(), num_v, head_k)], dim=-1)  # [v | 0]: Dv + Dk
    eye = torch.eye(head_k, device=v.device, dtype=torch.float32)
    initial = torch.cat([eye.new_zeros(head_k, head_v), eye], dim=-1)  # [0 | I]: [Dk, Dv + Dk]
    initial = initial.expand(len(docs), num_v, head_k, head_v + head_k).contiguous()
    wide_out, final = chunk_gated_delta_rule(pick(q), pick(k), widened, g=pick(g), beta=pick(beta), scale=scale,
                                             initial_state=initial, output_final_state=True, cu_seqlens=sub_cu,
                                             use_qk_l2norm_in_kernel=use_qk_l2norm)  # final [D2, Hv, Dk, Dv + Dk]
    summary = final[[docs.index(d) for d in last]].float()  # each row's last document: [B, Hv, Dk, Dv + Dk]
    entering = entering_state(summary[..., :head_v], summary[..., head_v:])  # [B, Hv, Dk, Dv]
    share = torch.zeros(1, v.shape[1], num_v, head_v, device=v.device, dtype=torch.float32)
    offsets = [0, *lengths.cumsum(0).tolist()]
    for row, d in enumerate(first):
        i = docs.index(d)
        reads = wide_out[0, offsets[i]:offsets[i + 1], :, head_v:].float()  # Phi_t^T q_t: [n, Hv, Dk]
        added = torch.einsum("nhk,hkv->nhv", reads, entering[row].float())  # S^T Phi_t^T q_t: [n, Hv, Dv]
        share = share.index_add(1, torch.arange(bounds[d], bounds[d + 1], device=v.device), added.unsqueeze(0))
    return share


def fused_ssd_scan(x, dt, A, B, C, doc_ids, *, D=None, dt_bias=None, dt_softplus: bool = True,
                   dt_limit=(0.0, float("inf")), chunk_size: int = 64, entering_state=None):
    """mamba-ssm's chunked SSD scan with seq_idx (state reset at every document start); float32 out.

    entering_state (state-passing CP, the twin's contract): the scan returns each row's final state
    (return_final_states: its last document's, from zero); the decay across the row and the entering state's
    share of the first document's outputs are the twin's elementwise formulas (models.mixers.varlen_scans)."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    out = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                                    seq_idx=seq_idx_from_doc_ids(doc_ids), dt_softplus=dt_softplus,
                                    dt_limit=tuple(dt_limit), return_final_states=entering_state is not None)
    if entering_state is None:
        return out.float()
    y, final = out
    log_decay = A.float() * discretise_dt(dt, dt_bias, softplus=dt_softplus, limit=tuple(dt_limit))  # [b, S, h]
    entering = entering_state(final.float(), log_decay.sum(1).exp())  # [b, h, p, n]
    C_heads = C.repeat_interleave(x.shape[2] // C.shape[2], dim=2)  # [b, S, g, n] -> [b, S, h, n]
    return y.float() + ssd_from_entering_state(entering, C_heads, log_decay, doc_ids)


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


def _probe_entering(seed: int, shape, apply):
    """A fixed entering-state function for the state-passing probes: it reads the final state and the transition
    it is given (so their gradients are compared too) and returns a state of `shape`."""
    base = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return lambda final, transition: base.to(final.device) + 0.5 * final + 0.5 * apply(transition, base.to(final.device))


def _two_row_docs(device) -> torch.Tensor:
    """Two rows: 7 | 1 | 64 tokens, and one document of 72 (its first document is its last)."""
    return torch.cat([_probe_docs(device), torch.full((1, 72), 3, device=device)])  # [2, 72]


def probe_gated_delta_rule_state(fused, twin, device, dtype) -> str | None:
    """Each row's first document continues an earlier shard (an entering state), its last one leaves one; two rows,
    Dv != Dk, small decays so a state crossing 64 tokens survives."""
    docs = _two_row_docs(device)
    S = docs.shape[1]
    q, k = (_randn(2, S, 2, 32, device=device, dtype=dtype, seed=s) for s in (0, 1))
    v = _randn(2, S, 4, 16, device=device, dtype=dtype, seed=2)
    g = -0.05 * torch.rand(2, S, 4, generator=torch.Generator().manual_seed(3)).to(device)
    beta = 0.05 * torch.rand(2, S, 4, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    entering = _probe_entering(5, (2, 4, 32, 16), lambda transition, state: transition @ state)
    return kernel_check.probe_function(lambda *a, **kw: fused(*a, entering_state=entering, **kw),
                                       lambda *a, **kw: twin(*a, entering_state=entering, **kw),
                                       [q, k, v, g, beta], dtype, doc_ids=docs, use_qk_l2norm=True)


def probe_ssd_scan_state(fused, twin, device, dtype) -> str | None:
    """As probe_ssd_scan on two rows (see _two_row_docs), time steps shifted down (softplus(dt - 4) ~ 0.02)."""
    docs = _two_row_docs(device)
    S = docs.shape[1]
    x = _randn(2, S, 4, 16, device=device, dtype=dtype, seed=0)
    dt = _randn(2, S, 4, device=device, dtype=dtype, seed=1) - 4.0
    A = -torch.rand(4, generator=torch.Generator().manual_seed(2)).to(device) - 0.5
    B, C = (_randn(2, S, 2, 8, device=device, dtype=dtype, seed=s) for s in (3, 4))
    D, dt_bias = torch.ones(4, device=device), torch.zeros(4, device=device)
    entering = _probe_entering(5, (2, 4, 16, 8), lambda decay, state: decay[..., None, None] * state)
    run = lambda scan: lambda x_, dt_, B_, C_: scan(x_, dt_, A, B_, C_, docs, D=D, dt_bias=dt_bias, chunk_size=32,
                                                      entering_state=entering)
    return kernel_check.probe_function(run(fused), run(twin), [x, dt, B, C], dtype,
                                       names=["y", "dx", "ddt", "dB", "dC"])


@dataclass(frozen=True)
class MixerOp:
    name: str
    package: str  # the module that must import for the fused kernel
    fused: Callable
    twin: Callable
    probe: Callable  # probe(fused, twin, device, dtype) -> None | failure
    state_probe: Callable | None = None  # the same with entering_state (state-passing CP), where the op takes it


MIXER_OPS = ("causal_conv1d", "gated_delta_rule", "ssd_scan")  # the ops a models.mixers.spec.MixerSpec can name


@functools.cache
def _twins() -> dict[str, MixerOp]:
    ops = [MixerOp("causal_conv1d", "causal_conv1d", fused_causal_conv1d, varlen_causal_conv1d, probe_causal_conv1d),
           MixerOp("gated_delta_rule", "fla.ops.gated_delta_rule", fused_gated_delta_rule, varlen_gated_delta_rule,
                   probe_gated_delta_rule, probe_gated_delta_rule_state),
           MixerOp("ssd_scan", "mamba_ssm.ops.triton.ssd_combined", fused_ssd_scan, ssd_scan_varlen, probe_ssd_scan,
                   probe_ssd_scan_state)]
    return {op.name: op for op in ops}


def pick(op: str, device: torch.device, dtype: torch.dtype, *, entering_state: bool = False) -> Callable:
    """The kernel for mixer op `op` on (device, dtype): fused when on CUDA, importable and checked; else the twin.
    entering_state: the caller passes entering_state= (state-passing CP): the fused kernel's state path is checked
    on its own probe."""
    spec = _twins()[op]
    if torch.device(device).type != "cuda" or not kernel_check.importable(spec.package):
        return spec.twin
    if entering_state and spec.state_probe is None:
        raise ValueError(f"mixer op {op} has no state-passing path")
    probe_fn = spec.state_probe if entering_state else spec.probe
    key = f"{op}:state:{spec.package}" if entering_state else f"{op}:{spec.package}"
    probe = lambda: probe_fn(spec.fused, spec.twin, device, dtype)
    return spec.fused if kernel_check.prefer(key, device, dtype, probe) else spec.twin
