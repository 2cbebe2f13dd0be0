"""Where cptrain's CP time and memory go, measured on one process (the numbers behind the notes
on the goals). Shapes follow the attention workload (H=8, Hkv=2, D=64, fp32).

    documents  Ulysses' local kernel at cp=2 (cp.kernels.sdpa_attention on the full S for H/2 heads,
               the workload's packed documents) fwd+bwd, two ways: one call over the dense [S, S]
               document mask (what cptrain did before per-document calls), and cp.kernels.per_document
               (one fused causal call per document, what Ulysses does now): time and peak bytes.
    block      cp.block_kernels.CpuFlashBlockKernel fwd+bwd on the ring's S/4 x S/4 pieces at cp=2 (a
               diagonal piece of one document and a fully visible one) against the raw fused op
               with is_causal=True / no mask: the block kernel's own overhead.
    index      cp.collectives.seq_to_head at group size 1 with every head (cptrain's cp=1 path for
               q, k, v): returns its input, no copy.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.measure import PeakMemory
from bench.workloads import packed_doc_lens
from cp.block_kernels import CpuFlashBlockKernel
from cp.collectives import seq_to_head
from cp.kernels import per_document, sdpa_attention
from cp.masks import AttnMask, BlockMask

CPU = torch.device("cpu")


def _median_time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak(fn) -> int:
    with PeakMemory(CPU) as peak:
        fn()
    return peak.bytes


def document_cost(seq_len: int, heads: int = 4, kv_heads: int = 1, dim: int = 64) -> dict:
    lens = packed_doc_lens(seq_len, seed=seq_len)
    pos = torch.arange(seq_len)
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[None]  # [1, S]
    mask = AttnMask(q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, causal=True)
    ends = torch.tensor(lens).cumsum(0).tolist()
    spans = [(0, end - n, end) for n, end in zip(lens, ends)]
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, seq_len, heads, dim, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, seq_len, kv_heads, dim, generator=gen) for _ in range(2))
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def call(per_doc: bool):
        out = per_document(sdpa_attention, *leaves, mask, spans) if per_doc else sdpa_attention(*leaves, mask)
        out.backward(dout)
        for leaf in leaves:
            leaf.grad = None

    return {"seq_len": seq_len, "docs": len(lens), "dense_s": _median_time(lambda: call(False)),
            "per_doc_s": _median_time(lambda: call(True)), "dense_bytes": _peak(lambda: call(False)),
            "per_doc_bytes": _peak(lambda: call(True))}


def _block_step(kernel, q, k, v, allowed, dout, scale):
    out, lse = kernel.forward(q, k, v, allowed, scale)
    delta = (dout * out).sum(-1).transpose(1, 2)  # [B, L, H] -> [B, H, L]
    kernel.backward(q, k, v, out, dout, lse, delta, allowed, scale)


def _fused_step(q, k, v, dout, scale, causal):
    groups = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)  # [B, L, H, D] -> [B, H, L, D]
    kh, vh = (t.transpose(1, 2).repeat_interleave(groups, dim=1) for t in (k, v))  # [B, L, Hkv, D] -> [B, H, L, D]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, causal, scale=scale)
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(dout.transpose(1, 2), qh, kh, vh, out, lse,
                                                                        0.0, causal, scale=scale)


def block_cost(seq_len: int, heads: int = 8, kv_heads: int = 2, dim: int = 64) -> dict:
    piece = seq_len // 4  # zigzag chunk at cp=2
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, piece, heads, dim, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, piece, kv_heads, dim, generator=gen) for _ in range(2))
    scale, kernel = dim ** -0.5, CpuFlashBlockKernel()
    causal, full = BlockMask("causal", (1, piece, piece)), BlockMask("full", (1, piece, piece))  # as RingPlan makes them
    return {
        "seq_len": seq_len, "piece": piece,
        "diag_kernel_s": _median_time(lambda: _block_step(kernel, q, k, v, causal, dout, scale)),
        "diag_fused_s": _median_time(lambda: _fused_step(q, k, v, dout, scale, True)),
        "full_kernel_s": _median_time(lambda: _block_step(kernel, q, k, v, full, dout, scale)),
        "full_fused_s": _median_time(lambda: _fused_step(q, k, v, dout, scale, False)),
    }


def index_cost(seq_len: int, heads: int = 8, kv_heads: int = 2, dim: int = 64) -> dict:
    q = torch.randn(1, seq_len, heads, dim)
    k, v = torch.randn(1, seq_len, kv_heads, dim), torch.randn(1, seq_len, kv_heads, dim)

    def copies():
        seq_to_head(q, None, [list(range(heads))])
        seq_to_head(k, None, [list(range(kv_heads))])
        seq_to_head(v, None, [list(range(kv_heads))])

    return {"seq_len": seq_len, "s": _median_time(copies), "bytes": _peak(copies)}


def run(seq_lens: list[int]) -> dict:
    """All hotspot measurements at each S (single thread, like one rank of the sweep)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"documents": [document_cost(s) for s in seq_lens], "block": [block_cost(s) for s in seq_lens],
                "index": [index_cost(s) for s in seq_lens]}
    finally:
        torch.set_num_threads(threads)
