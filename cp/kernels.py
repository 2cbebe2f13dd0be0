"""Local attention kernels: attention over tokens this rank holds, judged on GLOBAL positions.

A kernel is a callable `kernel(q, k, v, mask, *, scale, sinks) -> out` with BSHD tensors
q [B, Sq, H, D], k/v [B, Sk, Hkv, D] (H % Hkv == 0, query head h uses KV head h // (H/Hkv)) and an
`AttnMask` (cp.masks) describing which keys each query may see. The mask is defined by global
sequence positions and document ids, so the same kernel is exact for a full sequence (Ulysses), a
gathered permuted sequence (hybrid) or one block of a ring. `sinks` are per-head logits (GPT-OSS `s_aux`) that join every query's softmax
denominator once, with a zero value vector. `softcap` (Gemma2's attn_logit_softcapping) caps each
scaled logit s to softcap * tanh(s / softcap) before the mask and softmax; only the explicit-softmax
kernels apply it (`softcap_kernels` gives the Ulysses kernel and the ring block kernel).

Kernels (`KERNELS`, chosen by name; `resolve_kernel` is the one entry point):
    "math"  explicit softmax in fp32 (or fp64 for fp64 inputs), differentiated by autograd:
            exact, supports everything (`attention_with_lse` also returns the LSE). O(B*H*Sq*Sk).
    "sdpa"  torch scaled_dot_product_attention with a boolean mask (plain causal without one);
            sinks go to "lse".
    "lse"   a block kernel with LSE (cp.block_kernels; cpu_flash on CPU) with its own backward; sinks merged
            from the LSE exactly once.
    "auto"  "sdpa" (the default).

Block kernels (cp.block_kernels, cp.cuda_kernels) are picked by `resolve_block_kernel`. Packed
documents never reach a kernel as one dense mask: Ulysses calls the kernel per document
(`per_document`), the ring plan cuts its pieces per document (cp.ring.RingPlan).
Any HF AttentionInterface function (sdpa, eager, ...) becomes a kernel through `hf_kernel(fn)`.

Imports go one way: cp.masks <- cp.block_kernels <- cp.cuda_kernels <- cp.kernels <- the CP styles.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from cp.block_kernels import BLOCK_KERNELS, LseAttention, MathBlockKernel, attention_with_lse
from cp.cuda_kernels import cuda_block_kernel
from cp.masks import AttnMask, BlockMask, check_gqa, default_scale


def math_attention(q, k, v, mask: AttnMask, *, scale: float | None = None, sinks: torch.Tensor | None = None,
                   softcap: float | None = None):
    return attention_with_lse(q, k, v, mask, scale=scale, sinks=sinks, softcap=softcap)[0]


def sdpa_attention(q, k, v, mask: AttnMask, *, scale: float | None = None, sinks: torch.Tensor | None = None):
    if sinks is not None:  # SDPA has no sink term: the LSE path merges it exactly
        return lse_attention(q, k, v, mask, scale=scale, sinks=sinks)
    check_gqa(q, k)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, S, H, D] -> [B, H, S, D]
    if mask.is_plain_causal():
        mask_kw = {"is_causal": True}
    elif mask.is_unmasked():
        mask_kw = {}
    else:
        mask_kw = {"attn_mask": mask.dense()[:, None]}  # [B, Sq, Sk] -> [B, 1, Sq, Sk]
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=default_scale(q, scale),
                                         enable_gqa=kh.shape[1] != qh.shape[1], **mask_kw)
    return out.transpose(1, 2)  # [B, H, Sq, D] -> [B, Sq, H, D]


Kernel = Callable[..., torch.Tensor]


def lse_attention(q, k, v, mask: AttnMask, *, scale: float | None = None, sinks: torch.Tensor | None = None,
                  block_kernel=None):
    """One block through a block kernel with LSE (cpu_flash on CPU): sinks merged exactly, fused memory use."""
    kernel = resolve_block_kernel(block_kernel, q.device, q.dtype)
    block, scale = BlockMask.from_attn_mask(mask), default_scale(q, scale)
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
        groups = check_gqa(q, k)
        owner = module if module is not None else SimpleNamespace(num_key_value_groups=groups, is_causal=mask.causal,
                                                                  training=False)
        additive = torch.zeros(mask.dense().shape, dtype=q.dtype, device=q.device)  # [B, Sq, Sk]
        additive = additive.masked_fill(~mask.dense(), torch.finfo(q.dtype).min)[:, None]  # -> [B, 1, Sq, Sk]
        extra = {} if sinks is None else {"s_aux": sinks}
        out, _ = fn(owner, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), additive,  # BSHD -> BHSD
                    scaling=default_scale(q, scale), dropout=0.0, is_causal=False, **extra)
        return out  # HF attention functions return BSHD

    return kernel


def softcap_kernels(softcap: float) -> tuple[Kernel, MathBlockKernel]:
    """(Ulysses local kernel, ring block kernel) that cap logits at `softcap`: the explicit-softmax ones."""

    def capped_math(q, k, v, mask: AttnMask, *, scale=None, sinks=None):
        return math_attention(q, k, v, mask, scale=scale, sinks=sinks, softcap=softcap)

    return capped_math, MathBlockKernel(name=f"math_softcap{softcap:g}", softcap=softcap)


def resolve_block_kernel(kernel, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """Block kernels (with LSE) for the ring: a name in BLOCK_KERNELS, "cuda_flash" / "cuda_efficient"
    (flash-attn / torch's memory-efficient kernel, cp.cuda_kernels), "auto"/None (cpu_flash on CPU; on
    CUDA the first fused kernel that passed its exactness check there, else math), or an object with
    the same forward/backward (the test override hook)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if kernel is None or kernel == "auto":
        if device.type == "cuda":
            return cuda_block_kernel(device, dtype or torch.float32)
        kernel = "cpu_flash" if device.type == "cpu" else "math"
    if kernel in ("cuda_flash", "cuda_efficient"):
        return cuda_block_kernel(device, dtype or torch.float32, kernel)
    if isinstance(kernel, str):
        try:
            return BLOCK_KERNELS[kernel]
        except KeyError:
            known = sorted([*BLOCK_KERNELS, "auto", "cuda_flash", "cuda_efficient"])
            raise ValueError(f"unknown ring block kernel {kernel!r}; known: {known}") from None
    return kernel
