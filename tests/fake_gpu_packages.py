"""CPU stand-ins for the GPU packages' kernels, written from their documented contracts.

They let CPU tests drive cptrain's adapters (models.mixers.fused_kernels, cp.cuda_kernels) end to end:
layouts, cu_seqlens / seq_idx, window conventions, head grouping. Each is a slow, direct
implementation of what the package's docstring promises, independent of cptrain's own kernels
(per-document loops, sequential recurrences), so an adapter that passes the wrong documents or
conventions fails the same checks it would fail on a GPU.

    flash_attn.flash_attn_varlen_func      THD q/k/v, cu_seqlens, causal aligned bottom-right,
                                           window_size=(left, right): query i sees keys
                                           [i + Lk - Lq - left, i + Lk - Lq + right], -1 = unbounded
    flash_attn.flash_attn_func             BSHD, GQA, return_attn_probs -> (out, lse [B, H, Sq], _)
    flash_attn.flash_attn_interface._flash_attn_backward
                                           fills dq/dk/dv from the given out / LSE; the 2.5 and the
                                           2.7 signatures (window_size tuple vs _left/_right, softcap)
    causal_conv1d.causal_conv1d_fn         x [B, C, S], weight [C, K], seq_idx [B, S]: no tap
                                           crosses a change of seq_idx
    fla.ops.gated_delta_rule.chunk_gated_delta_rule
                                           B = 1 THD with cu_seqlens: transformers' own torch
                                           reference run on each sequence alone (initial_state
                                           [N, H, K, V] per sequence, output_final_state)
    mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined
                                           sequential SSM recurrence, state zeroed where seq_idx changes
                                           (return_final_states: the state at each row's end)
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), window_shift: int = 0, **_):
    """window_shift != 0 simulates a wrong window convention (for tests that must catch it)."""
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    scale = softmax_scale or 1.0 / math.sqrt(q.shape[-1])
    groups = q.shape[1] // k.shape[1]
    outs = []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (qa, qb), (ka, kb) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        assert qb - qa <= max_seqlen_q and kb - ka <= max_seqlen_k
        qd = q[qa:qb].transpose(0, 1).float()  # [L, H, D] -> [H, L, D]
        kd = k[ka:kb].repeat_interleave(groups, 1).transpose(0, 1).float()
        vd = v[ka:kb].repeat_interleave(groups, 1).transpose(0, 1).float()
        lq, lk = qb - qa, kb - ka
        i = torch.arange(lq)[:, None] + lk - lq  # bottom-right aligned query index in key coordinates
        j = torch.arange(lk)[None, :]
        allowed = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        left, right = window_size
        if left >= 0:
            allowed &= j >= i - left + window_shift
        if right >= 0:
            allowed &= j <= i + right
        scores = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
        outs.append((scores.softmax(-1) @ vd).transpose(0, 1).to(q.dtype))  # [H, L, D] -> [L, H, D]
    return torch.cat(outs)


def _block_mask(q, k, causal: bool):
    from cp.masks import BlockMask

    B, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    assert not causal or sq == sk, "the stand-in covers square causal blocks (what cptrain sends)"
    return BlockMask("causal" if causal else "full", (B, sq, sk))


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """BSHD, native GQA; with return_attn_probs: (out, softmax_lse [B, H, Sq] fp32, S_dmask)."""
    from cp.block_kernels import MathBlockKernel

    assert window_size == (-1, -1) and dropout_p == 0.0
    out, lse = MathBlockKernel().forward(q, k, v, _block_mask(q, k, causal), softmax_scale)
    out = out.to(q.dtype)
    return (out, lse.float(), None) if return_attn_probs else out


def _flash_attn_backward_v27(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state=None):
    """flash-attn >= 2.7's block backward: fills dq, dk, dv from the given out and LSE."""
    from cp.block_kernels import MathBlockKernel

    assert (window_size_left, window_size_right) == (-1, -1) and softcap == 0.0 and dropout_p == 0.0
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # [B, S, H] -> [B, H, S]
    grads = MathBlockKernel().backward(q, k, v, out.float(), dout.float(), softmax_lse, delta,
                                       _block_mask(q, k, causal), softmax_scale)
    for buffer, grad in zip((dq, dk, dv), grads):
        buffer.copy_(grad)
    return softmax_lse


def _flash_attn_backward_v25(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size, alibi_slopes, deterministic, rng_state=None):
    """flash-attn 2.5's signature for the same backward (window_size a tuple, no softcap)."""
    return _flash_attn_backward_v27(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                    *window_size, 0.0, alibi_slopes, deterministic, rng_state)


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    assert seq_idx is not None and seq_idx.dtype == torch.int32 and x.stride(1) == 1, "channel-last x with seq_idx"
    kernel = weight.shape[1]
    out = torch.empty_like(x, dtype=torch.float32)
    for b in range(x.shape[0]):
        ids = seq_idx[b]
        starts = [0] + ((ids[1:] != ids[:-1]).nonzero().flatten() + 1).tolist() + [x.shape[2]]
        for a, e in zip(starts, starts[1:]):
            seg = x[b:b + 1, :, a:e].float()  # [1, C, L]
            taps = weight.float()[:, None]  # [C, K] -> [C, 1, K]
            bias_f = None if bias is None else bias.float()
            conv = F.conv1d(F.pad(seg, (kernel - 1, 0)), taps, bias_f, groups=x.shape[1])
            out[b, :, a:e] = conv[0]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out.to(x.dtype)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm_in_kernel=False, **_):
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    assert q.shape[0] == 1 and cu_seqlens is not None, "varlen mode: B = 1 and cu_seqlens"
    assert scale is None or abs(scale - q.shape[-1] ** -0.5) < 1e-12, "transformers' reference uses Dk^-1/2"
    bounds = cu_seqlens.tolist()
    reference = getattr(torch_chunk_gated_delta_rule, "__wrapped__", torch_chunk_gated_delta_rule)  # never a hub kernel
    runs = [reference(q[:, a:e], k[:, a:e], v[:, a:e], g[:, a:e], beta[:, a:e],
                      initial_state=None if initial_state is None else initial_state[i:i + 1],  # [N, H, K, V]
                      output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
            for i, (a, e) in enumerate(zip(bounds, bounds[1:]))]
    final = torch.cat([state for _, state in runs]) if output_final_state else None  # [N, H, K, V]
    return torch.cat([out for out, _ in runs], dim=1), final


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, **_):
    assert seq_idx is not None and seq_idx.dtype == torch.int32
    dt = dt.float() + (0 if dt_bias is None else dt_bias.float())
    dt = F.softplus(dt) if dt_softplus else dt
    dt = dt.clamp(*dt_limit)
    heads, groups = x.shape[2], B.shape[2]
    Bh, Ch = (t.float().repeat_interleave(heads // groups, dim=2) for t in (B, C))  # [b, S, h, n]
    state = torch.zeros(x.shape[0], heads, x.shape[3], B.shape[3])  # [b, h, p, n]
    ys = []
    for t in range(x.shape[1]):
        fresh = (seq_idx[:, t] != seq_idx[:, t - 1]) if t else torch.ones(x.shape[0], dtype=torch.bool)
        state = state * (~fresh).float()[:, None, None, None]
        decay = torch.exp(dt[:, t] * A.float())[:, :, None, None]  # [b, h, 1, 1]
        state = decay * state + (dt[:, t, :, None] * x[:, t].float())[..., None] * Bh[:, t, :, None, :]
        y = (state * Ch[:, t, :, None, :]).sum(-1)  # [b, h, p]
        if D is not None:
            y = y + D.float()[:, None] * x[:, t].float()
        ys.append(y)
    y = torch.stack(ys, dim=1).to(x.dtype)
    return (y, state) if return_final_states else y  # state: [b, h, p, n] at the end of each row


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


@contextmanager
def installed(*, flash_window_shift: int = 0, flash_backward_version: str = "2.7"):
    """Install the stand-ins as importable packages for the duration of the block."""
    flash = lambda *a, **kw: flash_attn_varlen_func(*a, window_shift=flash_window_shift, **kw)
    backward = {"2.7": _flash_attn_backward_v27, "2.5": _flash_attn_backward_v25}[flash_backward_version]
    interface = _module("flash_attn.flash_attn_interface", _flash_attn_backward=backward)
    modules = {
        "flash_attn": _module("flash_attn", flash_attn_varlen_func=flash, flash_attn_func=flash_attn_func,
                              flash_attn_interface=interface),
        "flash_attn.flash_attn_interface": interface,
        "causal_conv1d": _module("causal_conv1d", causal_conv1d_fn=causal_conv1d_fn),
        "fla": _module("fla"), "fla.ops": _module("fla.ops"),
        "fla.ops.gated_delta_rule": _module("fla.ops.gated_delta_rule", chunk_gated_delta_rule=chunk_gated_delta_rule),
        "mamba_ssm": _module("mamba_ssm"), "mamba_ssm.ops": _module("mamba_ssm.ops"),
        "mamba_ssm.ops.triton": _module("mamba_ssm.ops.triton"),
        "mamba_ssm.ops.triton.ssd_combined": _module("mamba_ssm.ops.triton.ssd_combined",
                                                     mamba_chunk_scan_combined=mamba_chunk_scan_combined),
    }
    # transformers binds its kernel fallbacks (fla, mamba-ssm, causal-conv1d) when a modeling module is
    # first imported: import them now, so they keep their torch paths after the stand-ins leave.
    for family in ("qwen3_5", "qwen3_next", "nemotron_h"):
        importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
