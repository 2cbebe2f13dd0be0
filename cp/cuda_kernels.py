"""Fused GPU attention kernels for the CP paths, each checked on its device before it is trusted.

    ring / hybrid / "lse" block kernel       "cuda_flash" (fp16 / bf16, flash-attn installed)
        flash_attn_func with the LSE for "causal" and "full" pieces, flash-attn's block backward
        (bound by argument name: its signature changed between releases); window-cut pieces
        go to "cuda_efficient".

    ring / hybrid / "lse" block kernel       "cuda_efficient"
        torch's memory-efficient attention ops (aten::_efficient_attention_forward / _backward,
        the kernels behind SDPA's efficient backend; fp32, fp16, bf16), which return the LSE and
        take the FINAL out/LSE in the backward, flash style:
            diagonal piece of one document   custom_mask_type=1 (causal from the top left), no bias
            keys all visible                 no mask, no bias
            anything else (a window cuts it) additive bias [B, H, Sq, Sk] from the piece's mask
        LSE comes back [B, H, ceil(Sq/32)*32]: sliced to Sq, padded again for the backward.

    Ulysses local kernel                     "flash_varlen" (attn=flash_attention_2 / _3)
        flash-attn's flash_attn_varlen_func over the whole gathered packed sequence as THD
        [B*S, h, D] with cu_seqlens of its documents: one call, no mask, no per-document loop;
        causal, window_size=(window-1, 0) (non-causal: (window-1, window-1)), native GQA.
        Sinks need the LSE: such layers go through the block kernel path ("lse") instead.

None is assumed right: `cp.kernel_check` runs each once per (device, dtype) against the exact
math kernel (packed documents, GQA, a window, forward and backward) before first use. "auto" on
CUDA picks cuda_flash (half precision, flash-attn installed), else cuda_efficient, whichever first
passes, and the exact math block kernel when none does.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass

import torch

from cp import kernel_check
from cp.block_kernels import MathBlockKernel, attention_with_lse
from cp.documents import cu_seqlens_from_doc_ids
from cp.masks import AttnMask, BlockMask, acc_dtype, check_gqa, default_scale
from cp.styles import CPConfigError

LSE_ALIGN = 32  # memory-efficient attention pads the LSE's query dim to a multiple of this
BIAS_ALIGN = 16  # ... and wants the bias' key dim stride aligned to this


def _padded_bias(allowed: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[B, Sq, Sk] bool -> additive bias [B, H, Sq, Sk] (0 / -inf) in q's dtype on q's device, the key
    dim stored padded to BIAS_ALIGN and the head dim broadcast (stride 0): the layout SDPA hands this kernel."""
    B, Sq, Sk = allowed.shape
    storage = torch.zeros(B, 1, Sq, math.ceil(Sk / BIAS_ALIGN) * BIAS_ALIGN, dtype=q.dtype, device=q.device)
    bias = storage[..., :Sk]  # [B, 1, Sq, Sk_pad] -> [B, 1, Sq, Sk]
    bias.masked_fill_(~allowed.to(q.device)[:, None], float("-inf"))
    return bias.expand(B, q.shape[2], Sq, Sk)  # [B, 1, Sq, Sk] -> [B, H, Sq, Sk]


def _mask_mode(mask: BlockMask, q: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """(custom_mask_type, bias): 1 = causal from the top left, 0 = none."""
    if mask.kind == "causal":
        return 1, None
    if mask.kind == "full":
        return 0, None
    return 0, _padded_bias(mask.dense(), q)


def _expand_kv_bshd(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.repeat_interleave(groups, dim=2) if groups > 1 else t  # [B, Sk, Hkv, D] -> [B, Sk, H, D]


@dataclass(frozen=True)
class EfficientBlockKernel:
    """Block kernel with LSE on torch's memory-efficient attention (CUDA). BSHD in and out."""

    name: str = "cuda_efficient"

    def forward(self, q, k, v, allowed, scale: float):
        groups, mask = check_gqa(q, k), BlockMask.of(allowed)
        mask_type, bias = _mask_mode(mask, q)
        out, lse, *_ = torch.ops.aten._efficient_attention_forward(  # by name: bound to the op's schema
            query=q, key=_expand_kv_bshd(k, groups), value=_expand_kv_bshd(v, groups), bias=bias, cu_seqlens_q=None,
            cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0, custom_mask_type=mask_type,
            compute_log_sumexp=True, scale=scale)  # out [B, Sq, H, D], lse [B, H, Sq padded to LSE_ALIGN]
        lse, out = lse[..., :q.shape[1]].to(acc_dtype(q)), out.to(acc_dtype(q))
        empty = mask.rows_without_keys()  # [B, Sq]: a query with no visible key gets out 0, lse -inf
        if empty is not None:
            empty = empty.to(q.device)
            lse, out = lse.masked_fill(empty[:, None], float("-inf")), out.masked_fill(empty[:, :, None, None], 0.0)
        return out, lse

    def backward(self, q, k, v, out, dout, lse, delta, allowed, scale: float):
        groups = check_gqa(q, k)
        B, Sq, H, _ = q.shape
        mask_type, bias = _mask_mode(BlockMask.of(allowed), q)
        lse_padded = torch.zeros(B, H, math.ceil(Sq / LSE_ALIGN) * LSE_ALIGN, dtype=torch.float32, device=q.device)
        lse_padded[..., :Sq] = lse.float()  # [B, H, Sq] -> [B, H, Sq_pad]
        no_rng = torch.zeros((), dtype=torch.int64, device=q.device)  # dropout 0: seed and offset unused
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(  # by name: bound to the op's schema
            grad_out_=dout.to(q.dtype), query=q, key=_expand_kv_bshd(k, groups), value=_expand_kv_bshd(v, groups),
            bias=bias, out=out.to(q.dtype), cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=Sq,
            max_seqlen_k=k.shape[1], logsumexp=lse_padded, dropout_p=0.0, philox_seed=no_rng, philox_offset=no_rng,
            custom_mask_type=mask_type, bias_requires_grad=False, scale=scale)
        dtype = acc_dtype(q)
        if groups > 1:  # [B, Sk, H, D] -> [B, Sk, Hkv, D]: sum each KV head's query group
            dk, dv = (t.unflatten(2, (k.shape[2], groups)).sum(3) for t in (dk, dv))
        return dq.to(dtype), dk.to(dtype), dv.to(dtype)


def _probe_inputs(device, dtype, *, heads: int = 4, kv_heads: int = 2, head_dim: int = 64, length: int = 80):
    """A small packed case: documents of 30, 1 and 49 tokens; positions 0..length-1."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, length, h, head_dim, generator=gen).to(device, dtype)
                     for h in (heads, kv_heads, kv_heads, heads))
    pos = torch.arange(length, device=device)
    docs = torch.tensor([0] * 30 + [1] + [2] * (length - 31), device=device)[None]
    return q, k, v, dout, pos, docs


def probe_block_kernel(kernel, device, dtype) -> str | None:
    """Compare a block kernel with the exact math block kernel on `device`: three block shapes (a
    diagonal causal piece, an all-visible piece, a packed piece cut by a window), forward (out, lse)
    and backward (dq, dk, dv) from the exact final out/lse. None when it matches."""
    q_all, k_all, v_all, dout_all, pos, docs = _probe_inputs(device, dtype)
    one_doc, half = torch.zeros_like(docs), len(pos) // 2
    early, late = slice(0, half), slice(half, len(pos))
    pieces = {  # name: (query rows, key rows, mask)
        "diagonal": (slice(None), slice(None), AttnMask(pos, pos, one_doc, one_doc).dense()),
        "all visible": (slice(None), slice(None), torch.ones(1, len(pos), len(pos), dtype=torch.bool, device=device)),
        "packed + window": (slice(None), slice(None), AttnMask(pos, pos, docs, docs, window=17).dense()),
        "earlier keys, window (queries with no key)": (late, early, AttnMask(pos[late], pos[early], one_doc[:, late],
                                                                           one_doc[:, early], window=17).dense()),
    }
    exact, scale = MathBlockKernel(), default_scale(q_all, None)
    for what, (qs, ks, allowed) in pieces.items():
        q, k, v, dout = q_all[:, qs], k_all[:, ks], v_all[:, ks], dout_all[:, qs]
        out, lse = kernel.forward(q, k, v, allowed, scale)
        ref_out, ref_lse = exact.forward(q, k, v, allowed, scale)
        ref_out_final = ref_out.masked_fill(torch.isneginf(ref_lse).transpose(1, 2)[..., None], 0.0)
        # a query with no key in this block has a finite final LSE from the ring's other blocks
        final_lse = torch.where(torch.isneginf(ref_lse), torch.zeros_like(ref_lse), ref_lse)
        delta = (dout.to(ref_out.dtype) * ref_out_final).sum(-1).transpose(1, 2)  # [B, S, H] -> [B, H, S]
        grads = kernel.backward(q, k, v, ref_out_final, dout, final_lse, delta, allowed, scale)
        ref_grads = exact.backward(q, k, v, ref_out_final, dout, final_lse, delta, allowed, scale)
        failure = kernel_check.compare([out, lse, *grads], [ref_out, ref_lse, *ref_grads], dtype,
                                       ["out", "lse", "dq", "dk", "dv"])
        if failure is not None:
            return f"{what} block: {failure}"
    return None


EFFICIENT = EfficientBlockKernel()


def _flash_backward_args(**candidates):
    """flash-attn's internal block backward, its arguments bound by name: its signature changed between
    releases (window_size -> window_size_left/_right, softcap added), the names did not."""
    from flash_attn import flash_attn_interface

    backward = flash_attn_interface._flash_attn_backward
    names = inspect.signature(backward).parameters
    return backward, {name: value for name, value in candidates.items() if name in names}


@dataclass(frozen=True)
class FlashBlockKernel:
    """Block kernel on flash-attn (fp16 / bf16): "causal" and "full" pieces through flash_attn_func with
    the LSE (return_attn_probs) and flash-attn's block backward from the final out/LSE, native GQA;
    "dense" pieces (a window cuts them) go to `fallback` (the memory-efficient kernel)."""

    name: str = "cuda_flash"
    fallback: object = EFFICIENT

    def forward(self, q, k, v, allowed, scale: float):
        mask = BlockMask.of(allowed)
        if mask.kind == "dense":
            return self.fallback.forward(q, k, v, mask, scale)
        from flash_attn import flash_attn_func

        out, lse, _ = flash_attn_func(q, k, v, 0.0, softmax_scale=scale, causal=mask.kind == "causal",
                                      return_attn_probs=True)  # out [B, Sq, H, D], lse [B, H, Sq]
        return out.to(acc_dtype(q)), lse.to(acc_dtype(q))

    def backward(self, q, k, v, out, dout, lse, delta, allowed, scale: float):
        mask = BlockMask.of(allowed)
        if mask.kind == "dense":
            return self.fallback.backward(q, k, v, out, dout, lse, delta, mask, scale)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # filled by the kernel
        backward, args = _flash_backward_args(
            dout=dout.to(q.dtype).contiguous(), q=q, k=k, v=v, out=out.to(q.dtype).contiguous(),
            softmax_lse=lse.float().contiguous(), dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale,
            causal=mask.kind == "causal", window_size=(-1, -1), window_size_left=-1, window_size_right=-1,
            softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None)
        backward(**args)
        dtype = acc_dtype(q)
        return dq.to(dtype), dk.to(dtype), dv.to(dtype)


FLASH = FlashBlockKernel()
CUDA_BLOCK_KERNELS = {FLASH.name: FLASH, EFFICIENT.name: EFFICIENT}
HALF = (torch.float16, torch.bfloat16)


def cuda_block_kernel(device: torch.device, dtype: torch.dtype, name: str | None = None):
    """A fused block kernel for CUDA that passed its check on (device, dtype).

    name given ("cuda_flash", "cuda_efficient"): that kernel, or an error naming why not.
    name None (auto): cuda_flash for fp16/bf16 when flash-attn imports, else cuda_efficient, each only
    once checked; the exact math kernel when neither passes (with a warning saying why)."""
    probe = lambda kernel: (lambda: probe_block_kernel(kernel, device, dtype))
    if name is not None:
        kernel = CUDA_BLOCK_KERNELS[name]
        kernel_check.require(kernel.name, device, dtype, probe(kernel))
        return kernel
    candidates = ([FLASH] if dtype in HALF and kernel_check.importable("flash_attn") else []) + [EFFICIENT]
    for kernel in candidates:
        if kernel_check.prefer(kernel.name, device, dtype, probe(kernel)):
            return kernel
    return MathBlockKernel()


# ----------------------------------------------------------------------------------------------
# Ulysses: flash-attn varlen over the packed gathered sequence


FLASH_MODULES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def _document_cu_seqlens(doc: torch.Tensor) -> tuple[torch.Tensor, int]:
    """doc ids [B, S] -> int32 THD cu_seqlens of the rows flattened, and the longest document."""
    bounds = cu_seqlens_from_doc_ids(doc).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def _window_size(causal: bool, window: int | None) -> tuple[int, int]:
    """HF's sliding_window (a query sees `window` keys, itself included) -> flash-attn (left, right)."""
    if window is None:
        return (-1, -1)
    return (window - 1, 0) if causal else (window - 1, window - 1)


@dataclass(frozen=True)
class FlashVarlenKernel:
    """Ulysses local kernel: one flash_attn_varlen_func call over packed documents (needs aligned q/k
    positions with contiguous documents, what Ulysses gathers). No sinks (no LSE returned)."""

    attn: str = "flash_attention_2"
    source: object = None  # a module with flash_attn_varlen_func (an HF hub kernel); None: FLASH_MODULES[attn]
    packed_documents = True  # cp.kernels.per_document hands it the whole packed call

    @property
    def module(self):
        return self.source if self.source is not None else importlib.import_module(FLASH_MODULES[self.attn])

    def __call__(self, q, k, v, mask: AttnMask, *, scale=None, sinks=None):
        if sinks is not None:
            raise ValueError("flash_attn_varlen_func has no attention sinks; cptrain routes sink layers through "
                             "the LSE block kernel")
        if not torch.equal(mask.q_pos, mask.k_pos):
            raise ValueError("flash varlen needs queries and keys at the same positions (Ulysses' gathered sequence)")
        B, S, H, D = q.shape
        cu_seqlens, max_len = _document_cu_seqlens(mask.q_doc)
        out = self.module.flash_attn_varlen_func(
            q.reshape(B * S, H, D), k.reshape(B * S, k.shape[2], D), v.reshape(B * S, v.shape[2], v.shape[3]),
            cu_seqlens, cu_seqlens, max_len, max_len, softmax_scale=default_scale(q, scale), causal=mask.causal,
            window_size=_window_size(mask.causal, mask.window))  # [B, S, h, D] -> THD [B * S, h, D]
        out = out[0] if isinstance(out, tuple) else out  # flash_attn_interface (FA3) may return (out, lse)
        return out.reshape(B, S, H, -1)  # THD [B * S, H, D] -> [B, S, H, D]


def probe_local_kernel(kernel, device, dtype, *, causal: bool = True, window: int | None = 17) -> str | None:
    """Compare a Ulysses local kernel with the exact math kernel on a packed case, out and dq/dk/dv."""
    q, k, v, _, pos, docs = _probe_inputs(device, dtype)
    mask = AttnMask(pos, pos, docs, docs, causal, window)
    return kernel_check.probe_function(lambda *qkv: kernel(*qkv, mask), lambda *qkv: attention_with_lse(*qkv, mask)[0],
                                       [q, k, v], dtype, names=["out", "dq", "dk", "dv"])


def flash_varlen_kernel(attn: str, device: torch.device, dtype: torch.dtype) -> FlashVarlenKernel:
    """attn=flash_attention_2/3 under Ulysses: the flash-attn package's varlen kernel, checked."""
    if torch.device(device).type != "cuda":
        raise CPConfigError(f"attn={attn} needs CUDA; on {device} use attn=sdpa", "attn")
    try:
        importlib.import_module(FLASH_MODULES[attn])
    except ImportError as exc:
        raise CPConfigError(f"attn={attn} needs the {FLASH_MODULES[attn]} package (pip install 'cptrain[gpu]'); or "
                            "use attn=sdpa", "attn") from exc
    kernel = FlashVarlenKernel(attn)
    kernel_check.require(f"{attn}_varlen", device, dtype, lambda: probe_local_kernel(kernel, device, dtype))
    return kernel
