"""Local attention kernels: attention over tokens this rank holds, judged on GLOBAL positions.

A kernel is a callable `kernel(q, k, v, mask, *, scale, sinks) -> out` with BSHD tensors
q [B, Sq, H, D], k/v [B, Sk, Hkv, D] (H % Hkv == 0, query head h uses KV head h // (H/Hkv)) and an
`AttnMask` describing which keys each query may see. The mask is defined by global sequence
positions and document ids, so the same kernel is exact for a full sequence (Ulysses), a
gathered permuted sequence (hybrid) or one block of a ring.

    query i may see key j  <=>  doc[i] == doc[j]
                                and (not causal or pos[j] <= pos[i])
                                and (window is None or |pos[i] - pos[j]| < window)

`window` has HF's `sliding_window` meaning: a causal query sees at most `window` keys, itself
included. `sinks` are per-head logits (GPT-OSS `s_aux`) that join every query's softmax
denominator once, with a zero value vector.

Kernels (`KERNELS`, chosen by name; `resolve_kernel` is the one entry point):
    "math"  explicit softmax in fp32 (or fp64 for fp64 inputs): exact, supports everything,
            also returns the log-sum-exp (`attention_with_lse`). Memory O(B*H*Sq*Sk).
    "sdpa"  torch scaled_dot_product_attention with a boolean mask (plain causal without one);
            sinks fall back to "math".
    "auto"  "sdpa" (the default).
Any HF AttentionInterface function (sdpa, eager, ...) becomes a kernel through `hf_kernel(fn)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F


@dataclass(frozen=True, eq=False)
class AttnMask:
    """Which keys each query may see, from global positions and document ids."""

    q_pos: torch.Tensor  # [Sq] global sequence positions of the queries
    k_pos: torch.Tensor  # [Sk] global sequence positions of the keys
    q_doc: torch.Tensor  # [B, Sq] document id of each query
    k_doc: torch.Tensor  # [B, Sk] document id of each key
    causal: bool = True
    window: int | None = None

    def dense(self) -> torch.Tensor:
        """Boolean mask [B, Sq, Sk], True where the query may attend to the key."""
        allowed = self.q_doc[:, :, None] == self.k_doc[:, None, :]  # [B, Sq, Sk]
        diff = self.q_pos[:, None] - self.k_pos[None, :]  # [Sq, Sk]
        if self.causal:
            allowed = allowed & (diff >= 0)
        if self.window is not None:
            allowed = allowed & ((diff if self.causal else diff.abs()) < self.window)
        return allowed

    def is_plain_causal(self) -> bool:
        """True when the mask is exactly 'causal over one document, no window' on aligned q/k."""
        if not self.causal or self.q_pos.shape != self.k_pos.shape or not torch.equal(self.q_pos, self.k_pos):
            return False
        if not bool((self.q_pos[1:] > self.q_pos[:-1]).all()):
            return False
        single_doc = bool((self.q_doc == self.q_doc[:, :1]).all()) and torch.equal(self.q_doc, self.k_doc)
        return single_doc and (self.window is None or self.window >= len(self.q_pos))


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _check_gqa(q: torch.Tensor, k: torch.Tensor) -> int:
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
    return q.shape[2] // k.shape[2]


def attention_with_lse(q, k, v, mask: AttnMask, *, scale: float | None = None,
                       sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention, differentiable by autograd. Returns (out [B, Sq, H, D], lse [B, H, Sq]).

    Computed in fp32 (fp64 stays fp64); the LSE includes the sink. Rows with no visible key give
    out = 0 and lse = -inf.
    """
    groups = _check_gqa(q, k)
    dtype = torch.promote_types(q.dtype, torch.float32)
    qh = q.transpose(1, 2).to(dtype)  # [B, Sq, H, D] -> [B, H, Sq, D]
    kh = k.transpose(1, 2).to(dtype).repeat_interleave(groups, dim=1)  # [B, Sk, Hkv, D] -> [B, H, Sk, D]
    vh = v.transpose(1, 2).to(dtype).repeat_interleave(groups, dim=1)  # [B, Sk, Hkv, D] -> [B, H, Sk, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * _default_scale(q, scale)  # [B, H, Sq, Sk]
    scores = scores.masked_fill(~mask.dense()[:, None], float("-inf"))
    if sinks is not None:
        sink = sinks.to(dtype)[None, :, None, None].expand(*scores.shape[:3], 1)  # [H] -> [B, H, Sq, 1]
        lse = torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1)  # [B, H, Sq]
    else:
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, Sq]
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse[..., None])  # [B, H, Sq, Sk]
    out = torch.matmul(probs, vh).transpose(1, 2)  # [B, H, Sq, D] -> [B, Sq, H, D]
    return out.to(q.dtype), lse


def math_attention(q, k, v, mask: AttnMask, *, scale: float | None = None, sinks: torch.Tensor | None = None):
    return attention_with_lse(q, k, v, mask, scale=scale, sinks=sinks)[0]


def sdpa_attention(q, k, v, mask: AttnMask, *, scale: float | None = None, sinks: torch.Tensor | None = None):
    if sinks is not None:  # SDPA has no sink term
        return math_attention(q, k, v, mask, scale=scale, sinks=sinks)
    _check_gqa(q, k)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, S, H, D] -> [B, H, S, D]
    if mask.is_plain_causal():
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=_default_scale(q, scale),
                                             enable_gqa=kh.shape[1] != qh.shape[1])
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.dense()[:, None],
                                             scale=_default_scale(q, scale), enable_gqa=kh.shape[1] != qh.shape[1])
    return out.transpose(1, 2)  # [B, H, Sq, D] -> [B, Sq, H, D]


Kernel = Callable[..., torch.Tensor]

KERNELS: dict[str, Kernel] = {"math": math_attention, "sdpa": sdpa_attention, "auto": sdpa_attention}


def resolve_kernel(kernel: str | Kernel | None) -> Kernel:
    """The one entry point for picking a local kernel: a name from KERNELS, a callable, or None (auto)."""
    if kernel is None:
        return KERNELS["auto"]
    if callable(kernel):
        return kernel
    try:
        return KERNELS[kernel]
    except KeyError:
        raise ValueError(f"unknown attention kernel {kernel!r}; known: {sorted(KERNELS)}") from None


def hf_kernel(fn: Callable, module: torch.nn.Module | None = None) -> Kernel:
    """Adapt an HF AttentionInterface function `fn(module, q, k, v, attention_mask, ...)` to a kernel.

    The mask (documents, causality, window) is handed over as an additive float mask [B, 1, Sq, Sk],
    which HF's sdpa and eager functions apply as given. `module` supplies `num_key_value_groups`,
    `is_causal` and `training` when the function reads them (a stand-in is made when omitted).
    """

    def kernel(q, k, v, mask: AttnMask, *, scale=None, sinks=None):
        groups = _check_gqa(q, k)
        owner = module if module is not None else SimpleNamespace(num_key_value_groups=groups, is_causal=mask.causal,
                                                                  training=False)
        additive = torch.zeros(mask.dense().shape, dtype=q.dtype, device=q.device)  # [B, Sq, Sk]
        additive = additive.masked_fill(~mask.dense(), torch.finfo(q.dtype).min)[:, None]  # -> [B, 1, Sq, Sk]
        extra = {} if sinks is None else {"s_aux": sinks}
        out, _ = fn(owner, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), additive,  # BSHD -> BHSD
                    scaling=_default_scale(q, scale), dropout=0.0, is_causal=False, **extra)
        return out  # HF attention functions return BSHD

    return kernel
