"""Block attention with log-sum-exp: the ring's kernels, the one online-softmax merge, sinks, LseAttention.

A block kernel has `forward(q, k, v, allowed, scale) -> (out, lse)` for one (query block, key block)
pair and `backward(q, k, v, out, dout, lse, delta, allowed, scale) -> (dq, dk, dv)` that takes the
FINAL out/lse of the query rows (flash-attention style), so blocks can be done one at a time in any
order and merged with `merge_attention`:

    for each key block j:   out_j, lse_j = kernel.forward(q, k_j, v_j, mask_j)
                            out, lse = merge_attention(out, lse, out_j, lse_j)
    sinks:                  joined once at the end (merge_sinks); d sink from the final lse
    backward, per block:    dq += , dk_j, dv_j = kernel.backward(q, k_j, v_j, out, dout, lse, delta)

    "math"       MathBlockKernel: explicit fp32 (fp64 for fp64) softmax; exact on any device, any value
                 head dim, optional logit softcap (Gemma2)
    "cpu_flash"  CpuFlashBlockKernel: torch's fused CPU flash attention and its backward; scores never
                 materialised

`attention_with_lse` is the exact reference for everything (autograd-differentiable, any mask, sinks,
softcap); `LseAttention` turns any (forward, backward) pair of this kind into an autograd function.
CUDA block kernels live in cp.cuda_kernels; cp.kernels resolves a kernel name to one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cp.masks import AttnMask, BlockMask, acc_dtype, check_gqa, default_scale


def attention_with_lse(q, k, v, mask: AttnMask, *, scale: float | None = None, sinks: torch.Tensor | None = None,
                       softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention, differentiable by autograd. Returns (out [B, Sq, H, D], lse [B, H, Sq]).

    Computed in fp32 (fp64 stays fp64); the LSE includes the sink. Rows with no visible key give
    out = 0 and lse = -inf. softcap: logits capped to softcap * tanh(logit / softcap) (Gemma2).
    """
    groups, dtype = check_gqa(q, k), acc_dtype(q)
    qh = q.transpose(1, 2).to(dtype)  # [B, Sq, H, D] -> [B, H, Sq, D]
    kh = k.transpose(1, 2).to(dtype).repeat_interleave(groups, dim=1)  # [B, Sk, Hkv, D] -> [B, H, Sk, D]
    vh = v.transpose(1, 2).to(dtype).repeat_interleave(groups, dim=1)  # [B, Sk, Hkv, D] -> [B, H, Sk, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * default_scale(q, scale)  # [B, H, Sq, Sk]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
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


def merge_attention(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor):
    """The one online-softmax merge. out/block_out [B, S, H, D] fp32, lse/block_lse [B, H, S] fp32.

    Returns the attention over the union of both key sets. -inf LSEs (no visible key) are safe.
    """
    new_lse = torch.logaddexp(lse, block_lse)  # [B, H, S]
    finite = torch.isfinite(new_lse)
    safe = torch.where(finite, new_lse, torch.zeros_like(new_lse))
    w_old = torch.where(finite, torch.exp(lse - safe), torch.zeros_like(lse)).transpose(1, 2)[..., None]  # -> [B, S, H, 1]
    w_new = torch.where(finite, torch.exp(block_lse - safe), torch.zeros_like(lse)).transpose(1, 2)[..., None]
    return out * w_old + block_out * w_new, new_lse


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.transpose(1, 2).repeat_interleave(groups, dim=1)  # [B, Sk, Hkv, D] -> [B, H, Sk, D]


def _sum_kv_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    B, H, Sk, D = t.shape
    return t.view(B, H // groups, groups, Sk, D).sum(2).transpose(1, 2)  # [B, H, Sk, D] -> [B, Sk, Hkv, D]


@dataclass(frozen=True)
class MathBlockKernel:
    """Explicit fp32 (fp64 for fp64) block attention with LSE (exact on any device; memory O(B*H*Sq*Sk) per block).
    softcap: logits capped to softcap * tanh(logit / softcap) (Gemma2), the backward through the tanh."""

    name: str = "math"
    softcap: float | None = None

    def _scores(self, qh, kh, scale: float) -> torch.Tensor:
        """Scaled (and capped) logits [B, H, Sq, Sk] of qh [B, H, Sq, D], kh [B, H, Sk, D]."""
        scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, H, Sq, Sk]
        return scores if self.softcap is None else torch.tanh(scores / self.softcap) * self.softcap

    def forward(self, q, k, v, allowed, scale: float):
        """q [B, Sq, H, D], k/v [B, Sk, Hkv, D], allowed (BlockMask or bool [B, Sq, Sk]) -> out [B, Sq, H, D],
        lse [B, H, Sq] (acc_dtype)."""
        groups, dtype = check_gqa(q, k), acc_dtype(q)
        allowed = BlockMask.of(allowed).dense(q.device)
        qh = q.transpose(1, 2).to(dtype)  # [B, Sq, H, D] -> [B, H, Sq, D]
        scores = self._scores(qh, _expand_kv(k.to(dtype), groups), scale)  # [B, H, Sq, Sk]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, Sq]
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        out = torch.matmul(torch.exp(scores - safe[..., None]), _expand_kv(v.to(dtype), groups))  # [B, H, Sq, D]
        return out.transpose(1, 2), lse  # -> [B, Sq, H, D]

    def backward(self, q, k, v, out, dout, lse, delta, allowed, scale: float):
        """Gradients of one block given the query block's FINAL out [B, Sq, H, D], lse [B, H, Sq] and
        delta = rowsum(dout * out) [B, H, Sq]. Returns dq [B, Sq, H, D], dk/dv [B, Sk, Hkv, D] (acc_dtype)."""
        groups, dtype = check_gqa(q, k), acc_dtype(q)
        allowed = BlockMask.of(allowed).dense(q.device)
        qh = q.transpose(1, 2).to(dtype)  # [B, Sq, H, D] -> [B, H, Sq, D]
        kh, vh = _expand_kv(k.to(dtype), groups), _expand_kv(v.to(dtype), groups)  # [B, H, Sk, D]
        doh = dout.transpose(1, 2).to(dtype)  # [B, Sq, H, D] -> [B, H, Sq, D]
        scores = self._scores(qh, kh, scale)  # [B, H, Sq, Sk]
        probs = torch.exp(scores - lse[..., None]).masked_fill(~allowed[:, None], 0.0)
        dv = torch.matmul(probs.transpose(-1, -2), doh)  # [B, H, Sk, D]
        dscores = probs * (torch.matmul(doh, vh.transpose(-1, -2)) - delta[..., None]) * scale  # [B, H, Sq, Sk]
        if self.softcap is not None:  # d(c * tanh(s / c)) / ds = 1 - tanh^2 = 1 - (capped / c)^2
            dscores = dscores * (1 - (scores / self.softcap) ** 2)
        dq = torch.matmul(dscores, kh).transpose(1, 2)  # [B, H, Sq, D] -> [B, Sq, H, D]
        dk = torch.matmul(dscores.transpose(-1, -2), qh)  # [B, H, Sk, D]
        return dq, _sum_kv_groups(dk, groups), _sum_kv_groups(dv, groups)


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Sq, Sk] bool -> [B, 1, Sq, Sk] additive (0 / -inf) in the query dtype (fused kernels want that)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))[:, None]


def _mask_args(mask: BlockMask, q: torch.Tensor) -> dict:
    """Fused-kernel mask arguments for a block: plain causal, no mask (all visible), or additive."""
    if mask.kind == "causal":
        return {"is_causal": True, "attn_mask": None}
    if mask.kind == "full":
        return {"is_causal": False, "attn_mask": None}
    return {"is_causal": False, "attn_mask": _additive_mask(mask.dense(q.device), q.dtype)}


@dataclass(frozen=True)
class CpuFlashBlockKernel:
    """torch's fused CPU flash attention (aten::_scaled_dot_product_flash_attention_for_cpu), which
    returns the LSE, and its backward, which accepts the FINAL out/lse: scores never materialised."""

    name: str = "cpu_flash"

    def forward(self, q, k, v, allowed, scale: float):
        groups, mask = check_gqa(q, k), BlockMask.of(allowed)
        qh = q.transpose(1, 2)  # [B, Sq, H, D] -> [B, H, Sq, D]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qh, _expand_kv(k, groups), _expand_kv(v, groups), 0.0, scale=scale, **_mask_args(mask, q))
        lse = lse.to(acc_dtype(q))
        empty = mask.rows_without_keys()
        if empty is not None:  # no visible key: lse -inf, not 0
            lse = lse.masked_fill(empty[:, None].to(q.device), float("-inf"))
        return out.transpose(1, 2).to(acc_dtype(q)), lse  # [B, H, Sq, D] -> [B, Sq, H, D]

    def backward(self, q, k, v, out, dout, lse, delta, allowed, scale: float):
        groups, mask = check_gqa(q, k), BlockMask.of(allowed)
        bhsd = lambda t: t.transpose(1, 2).to(q.dtype)  # [B, S, H, D] -> [B, H, S, D]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            bhsd(dout), bhsd(q), _expand_kv(k, groups), _expand_kv(v, groups), bhsd(out), lse.to(acc_dtype(q)), 0.0,
            scale=scale, **_mask_args(mask, q))
        dtype = acc_dtype(q)
        return (dq.transpose(1, 2).to(dtype), _sum_kv_groups(dk.to(dtype), groups),  # [B, H, Sq, D] -> [B, Sq, H, D]
                _sum_kv_groups(dv.to(dtype), groups))


BLOCK_KERNELS = {"math": MathBlockKernel(), "cpu_flash": CpuFlashBlockKernel()}


def merge_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor):
    """Join the sink logits (one per head, zero value vector) to a finished softmax: exactly once."""
    return merge_attention(out, lse, torch.zeros_like(out), _sink_lse(sinks, lse))


def sinks_grad(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """d loss / d sink_h = -sum_{b,i} p_sink[b,h,i] * delta[b,h,i], with p_sink = exp(sink - lse)."""
    return -(torch.exp(_sink_lse(sinks, lse) - lse) * delta).sum(dim=(0, 2)).to(sinks.dtype)


def _sink_lse(sinks: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    return sinks.to(lse.dtype)[None, :, None].expand_as(lse)  # [H] -> [B, H, L]


class LseAttention(torch.autograd.Function):
    """Attention done as (out, lse) by `forward_fn(q, k, v)` (one block, or the whole ring) and
    differentiated flash style by `backward_fn(q, k, v, out, dout, lse, delta) -> dq, dk, dv` from the
    FINAL out/lse; sinks join each query's softmax exactly once, after everything else."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, forward_fn, backward_fn):
        out, lse = forward_fn(q, k, v)
        if sinks is not None:
            out, lse = merge_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.backward_fn = backward_fn
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dout = dout.to(out.dtype)
        delta = (dout * out).sum(-1).transpose(1, 2)  # [B, L, H] -> [B, H, L]
        dq, dk, dv = ctx.backward_fn(q, k, v, out, dout, lse, delta)
        dsinks = None if sinks is None else sinks_grad(sinks, lse, delta)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks, None, None
