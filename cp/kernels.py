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
denominator once, with a zero value vector. `softcap` (Gemma2's attn_logit_softcapping) caps each
scaled logit s to softcap * tanh(s / softcap) before the mask and softmax; only the explicit-softmax
kernels apply it (`softcap_kernels` gives the Ulysses kernel and the ring block kernel).

Kernels (`KERNELS`, chosen by name; `resolve_kernel` is the one entry point):
    "math"  explicit softmax in fp32 (or fp64 for fp64 inputs), differentiated by autograd:
            exact, supports everything (`attention_with_lse` also returns the LSE). O(B*H*Sq*Sk).
    "sdpa"  torch scaled_dot_product_attention with a boolean mask (plain causal without one);
            sinks go to "lse".
    "lse"   a block kernel with LSE (below; cpu_flash on CPU) with its own backward; sinks merged
            from the LSE exactly once.
    "auto"  "sdpa" (the default).

Block kernels (`BLOCK_KERNELS`, for the ring and "lse"): forward returns (out, lse) of one block;
backward takes the FINAL out/lse of the query rows (flash-attention style), so blocks can be done
one at a time in any order and merged with `merge_attention`, the one online-softmax merge. A
block's mask is a `BlockMask`: "causal" (one document's diagonal) and "full" run the fused
kernels' mask-free paths; only "dense" (a window cuts the block) carries a [B, Sq, Sk] tensor.
Packed documents never reach a kernel as one dense mask: Ulysses calls the kernel per document
(`per_document`), the ring plan cuts its pieces per document (cp.ring.RingPlan).
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
        return self._one_document_unwindowed()

    def is_unmasked(self) -> bool:
        """True when every query sees every key: non-causal, one document, no effective window."""
        return not self.causal and self._one_document_unwindowed()

    def _one_document_unwindowed(self) -> bool:
        """One document per row on both sides, and no query-key pair as far apart as the window."""
        one_doc = bool((self.q_doc == self.q_doc[:, :1]).all()) and bool((self.k_doc == self.q_doc[:, :1]).all())
        if not one_doc or self.window is None:
            return one_doc
        farthest = max(int(self.q_pos.max() - self.k_pos.min()), int(self.k_pos.max() - self.q_pos.min()))
        return farthest < self.window


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _check_gqa(q: torch.Tensor, k: torch.Tensor) -> int:
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
    return q.shape[2] // k.shape[2]


def attention_with_lse(q, k, v, mask: AttnMask, *, scale: float | None = None, sinks: torch.Tensor | None = None,
                       softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention, differentiable by autograd. Returns (out [B, Sq, H, D], lse [B, H, Sq]).

    Computed in fp32 (fp64 stays fp64); the LSE includes the sink. Rows with no visible key give
    out = 0 and lse = -inf. softcap: logits capped to softcap * tanh(logit / softcap) (Gemma2).
    """
    groups, dtype = _check_gqa(q, k), acc_dtype(q)
    qh = q.transpose(1, 2).to(dtype)  # [B, Sq, H, D] -> [B, H, Sq, D]
    kh = k.transpose(1, 2).to(dtype).repeat_interleave(groups, dim=1)  # [B, Sk, Hkv, D] -> [B, H, Sk, D]
    vh = v.transpose(1, 2).to(dtype).repeat_interleave(groups, dim=1)  # [B, Sk, Hkv, D] -> [B, H, Sk, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * _default_scale(q, scale)  # [B, H, Sq, Sk]
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


def math_attention(q, k, v, mask: AttnMask, *, scale: float | None = None, sinks: torch.Tensor | None = None,
                   softcap: float | None = None):
    return attention_with_lse(q, k, v, mask, scale=scale, sinks=sinks, softcap=softcap)[0]


def sdpa_attention(q, k, v, mask: AttnMask, *, scale: float | None = None, sinks: torch.Tensor | None = None):
    if sinks is not None:  # SDPA has no sink term: the LSE path merges it exactly
        return lse_attention(q, k, v, mask, scale=scale, sinks=sinks)
    _check_gqa(q, k)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, S, H, D] -> [B, H, S, D]
    if mask.is_plain_causal():
        mask_kw = {"is_causal": True}
    elif mask.is_unmasked():
        mask_kw = {}
    else:
        mask_kw = {"attn_mask": mask.dense()[:, None]}  # [B, Sq, Sk] -> [B, 1, Sq, Sk]
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=_default_scale(q, scale),
                                         enable_gqa=kh.shape[1] != qh.shape[1], **mask_kw)
    return out.transpose(1, 2)  # [B, H, Sq, D] -> [B, Sq, H, D]


Kernel = Callable[..., torch.Tensor]


def lse_attention(q, k, v, mask: AttnMask, *, scale: float | None = None, sinks: torch.Tensor | None = None,
                  block_kernel=None):
    """One block through a block kernel with LSE (cpu_flash on CPU): sinks merged exactly, fused memory use."""
    kernel = resolve_block_kernel(block_kernel, q.device, q.dtype)
    block, scale = BlockMask.from_attn_mask(mask), _default_scale(q, scale)
    return LseAttention.apply(q, k, v, sinks, lambda *qkv: kernel.forward(*qkv, block, scale),
                              lambda *args: kernel.backward(*args, block, scale))


KERNELS: dict[str, Kernel] = {"math": math_attention, "sdpa": sdpa_attention, "lse": lse_attention,
                              "auto": sdpa_attention}


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


def per_document(kernel: Kernel, q, k, v, mask: AttnMask, spans, *, scale=None, sinks=None) -> torch.Tensor:
    """The kernel once per document instead of once over a packed [S, S] mask.

    spans: (row, start, end) of every document of q/k/v [B, S, h, D] (q and k the same tokens,
    each document one contiguous run; CPParams.document_spans). Each call sees one document, so
    a causal document without an effective window takes the kernel's mask-free causal path, and
    the work is sum(L_doc^2) instead of S^2 with no [B, S, S] mask. Kernels that take packed
    documents themselves (attribute `packed_documents`, e.g. a varlen kernel) get the whole call.
    """
    if getattr(kernel, "packed_documents", False) or len(spans) <= q.shape[0]:
        return kernel(q, k, v, mask, scale=scale, sinks=sinks)
    lengths = [[] for _ in range(q.shape[0])]
    for row, start, end in spans:
        lengths[row].append(end - start)
    # split, not slices: the backward of a split is one cat, where every slice would allocate a full-size grad
    by_row = lambda t: [t] if t.shape[0] == 1 else t.split(1, dim=0)  # [B, S, h, D] -> B x [1, S, h, D]
    pieces = [[t_row.split(lengths[row], dim=1) for row, t_row in enumerate(by_row(t))] for t in (q, k, v)]
    rows = [[] for _ in range(q.shape[0])]
    for row, start, end in spans:  # spans run through each row in order: the n-th span is the n-th split
        n = len(rows[row])
        doc = AttnMask(mask.q_pos[start:end], mask.k_pos[start:end], mask.q_doc[row:row + 1, start:end],
                       mask.k_doc[row:row + 1, start:end], mask.causal, mask.window)
        rows[row].append(kernel(pieces[0][row][n], pieces[1][row][n], pieces[2][row][n], doc, scale=scale,
                                sinks=sinks))  # [1, L_doc, h, D]
    return torch.cat([torch.cat(docs, dim=1) for docs in rows], dim=0)  # documents, rows -> [B, S, h, D]


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


# ----------------------------------------------------------------------------------------------
# Block kernels with LSE, for the ring: forward returns (out, lse) of one (query block, key block)
# pair; backward takes the FINAL out/lse of the query block (flash-attention style), so blocks can
# be processed one at a time in any order and the result is exact.


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


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (tests prove exactness to rounding)."""
    return torch.promote_types(t.dtype, torch.float32)


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.transpose(1, 2).repeat_interleave(groups, dim=1)  # [B, Sk, Hkv, D] -> [B, H, Sk, D]


def _sum_kv_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    B, H, Sk, D = t.shape
    return t.view(B, H // groups, groups, Sk, D).sum(2).transpose(1, 2)  # [B, H, Sk, D] -> [B, Sk, Hkv, D]


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Which keys of one (query block, key block) each query sees, without building what is not needed:

        "causal"  square block of one document's diagonal: key j visible to query i iff j <= i
        "full"    every key visible to every query
        "dense"   anything else: the explicit bool tensor [B, Sq, Sk]

    Fused kernels run the first two as is_causal / no mask; only "dense" has a mask tensor. Block
    kernels accept a BlockMask or a bool tensor (classified by `BlockMask.of`).
    """

    kind: str
    shape: tuple[int, int, int]  # B, Sq, Sk
    tensor: torch.Tensor | None = None

    @staticmethod
    def of(allowed: BlockMask | torch.Tensor) -> BlockMask:
        if isinstance(allowed, BlockMask):
            return allowed
        B, sq, sk = allowed.shape
        if sq == sk and torch.equal(allowed, torch.ones(sq, sk, dtype=torch.bool, device=allowed.device).tril()
                                    .expand_as(allowed)):
            return BlockMask("causal", (B, sq, sk))
        if bool(allowed.all()):
            return BlockMask("full", (B, sq, sk))
        return BlockMask("dense", (B, sq, sk), allowed)

    @staticmethod
    def from_attn_mask(mask: AttnMask) -> BlockMask:
        shape = (mask.q_doc.shape[0], len(mask.q_pos), len(mask.k_pos))
        if mask.is_plain_causal():
            return BlockMask("causal", shape)
        if mask.is_unmasked():
            return BlockMask("full", shape)
        return BlockMask("dense", shape, mask.dense())

    def dense(self, device=None) -> torch.Tensor:
        """The bool mask [B, Sq, Sk] (built for causal / full blocks)."""
        if self.tensor is not None:
            return self.tensor if device is None else self.tensor.to(device)
        B, sq, sk = self.shape
        ones = torch.ones(sq, sk, dtype=torch.bool, device=device)
        return (ones.tril() if self.kind == "causal" else ones).expand(B, sq, sk)

    def rows_without_keys(self) -> torch.Tensor | None:
        """[B, Sq] True where a query sees no key of the block; None when every query sees one."""
        return None if self.tensor is None else ~self.tensor.any(-1)

    def visible_pairs(self) -> int:
        B, sq, sk = self.shape
        if self.kind == "causal":
            return B * sq * (sq + 1) // 2
        return B * sq * sk if self.kind == "full" else int(self.tensor.sum())


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
        groups, dtype = _check_gqa(q, k), acc_dtype(q)
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
        groups, dtype = _check_gqa(q, k), acc_dtype(q)
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
        groups, mask = _check_gqa(q, k), BlockMask.of(allowed)
        qh = q.transpose(1, 2)  # [B, Sq, H, D] -> [B, H, Sq, D]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qh, _expand_kv(k, groups), _expand_kv(v, groups), 0.0, scale=scale, **_mask_args(mask, q))
        lse = lse.to(acc_dtype(q))
        empty = mask.rows_without_keys()
        if empty is not None:  # no visible key: lse -inf, not 0
            lse = lse.masked_fill(empty[:, None].to(q.device), float("-inf"))
        return out.transpose(1, 2).to(acc_dtype(q)), lse  # [B, H, Sq, D] -> [B, Sq, H, D]

    def backward(self, q, k, v, out, dout, lse, delta, allowed, scale: float):
        groups, mask = _check_gqa(q, k), BlockMask.of(allowed)
        bhsd = lambda t: t.transpose(1, 2).to(q.dtype)  # [B, S, H, D] -> [B, H, S, D]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            bhsd(dout), bhsd(q), _expand_kv(k, groups), _expand_kv(v, groups), bhsd(out), lse.to(acc_dtype(q)), 0.0,
            scale=scale, **_mask_args(mask, q))
        dtype = acc_dtype(q)
        return (dq.transpose(1, 2).to(dtype), _sum_kv_groups(dk.to(dtype), groups),  # [B, H, Sq, D] -> [B, Sq, H, D]
                _sum_kv_groups(dv.to(dtype), groups))


BLOCK_KERNELS = {"math": MathBlockKernel(), "cpu_flash": CpuFlashBlockKernel()}


def softcap_kernels(softcap: float) -> tuple[Kernel, MathBlockKernel]:
    """(Ulysses local kernel, ring block kernel) that cap logits at `softcap`: the explicit-softmax ones."""

    def capped_math(q, k, v, mask: AttnMask, *, scale=None, sinks=None):
        return math_attention(q, k, v, mask, scale=scale, sinks=sinks, softcap=softcap)

    return capped_math, MathBlockKernel(name=f"math_softcap{softcap:g}", softcap=softcap)


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


def resolve_block_kernel(kernel, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """Block kernels (with LSE) for the ring: a name in BLOCK_KERNELS, "cuda_flash" / "cuda_efficient"
    (flash-attn / torch's memory-efficient kernel, cp.cuda_kernels), "auto"/None (cpu_flash on CPU; on
    CUDA the first fused kernel that passed its exactness check there, else math), or an object with
    the same forward/backward (the test override hook)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if kernel is None or kernel == "auto":
        if device.type == "cuda":
            from cp.cuda_kernels import cuda_block_kernel
            return cuda_block_kernel(device, dtype or torch.float32)
        kernel = "cpu_flash" if device.type == "cpu" else "math"
    if kernel in ("cuda_flash", "cuda_efficient"):
        from cp.cuda_kernels import cuda_block_kernel
        return cuda_block_kernel(device, dtype or torch.float32, kernel)
    if isinstance(kernel, str):
        try:
            return BLOCK_KERNELS[kernel]
        except KeyError:
            known = sorted([*BLOCK_KERNELS, "auto", "cuda_flash", "cuda_efficient"])
            raise ValueError(f"unknown ring block kernel {kernel!r}; known: {known}") from None
    return kernel
