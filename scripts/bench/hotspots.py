"""Where cptrain's CP time and memory go, measured on one process (the numbers behind the notes
on goals the sweep does not meet). Shapes follow the attention workload (H=8, Hkv=2, D=64, fp32).

    mask     Ulysses' local kernel at cp=2 (cp.kernels.sdpa_attention on the full S for H/2 heads,
             packed documents) fwd+bwd under torch.profiler: time in the fused flash kernels vs
             in the ops that build and apply the dense mask (AttnMask.dense's int64 position
             difference and comparisons; SDPA's bool -> float conversion, aten::where), and the
             peak bytes. The mask is built for the FULL S on every rank, once per attention call,
             so at cp=P a rank builds P of them per step where cp=1 builds one.
    block    cp.kernels.CpuFlashBlockKernel fwd+bwd on the ring's pieces at cp=2 (S/4 x S/4):
             a causal diagonal piece and a fully visible piece, with the dense additive mask the
             ring passes today, against the same fused kernel with is_causal=True / no mask.
    index    cp.collectives.seq_to_head at group size 1 with an explicit head index (what
             cptrain's cp=1 path does for q, k, v): an advanced-indexing copy.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.measure import PeakMemory
from bench.workloads import packed_doc_lens
from cp.collectives import seq_to_head
from cp.kernels import AttnMask, CpuFlashBlockKernel, sdpa_attention

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


MASK_OPS = ("aten::sub", "aten::eq", "aten::ge", "aten::lt", "aten::abs", "aten::bitwise_and", "aten::where",
            "aten::logical_not", "aten::masked_fill")


def mask_cost(seq_len: int, heads: int = 4, kv_heads: int = 1, dim: int = 64) -> dict:
    from torch.profiler import ProfilerActivity, profile

    lens = packed_doc_lens(seq_len, seed=seq_len)
    pos = torch.arange(seq_len)
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[None]  # [1, S]
    mask = AttnMask(q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, causal=True)
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, seq_len, heads, dim, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, seq_len, kv_heads, dim, generator=gen) for _ in range(2))
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def call():
        sdpa_attention(*leaves, mask).backward(dout)
        for leaf in leaves:
            leaf.grad = None

    call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        call()
        total = time.perf_counter() - start
    by_op = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    flash = sum(t for name, t in by_op.items() if "flash_attention" in name)
    masking = sum(by_op.get(name, 0.0) for name in MASK_OPS)
    return {"seq_len": seq_len, "heads": heads, "s": total, "flash_s": flash, "mask_s": masking, "bytes": _peak(call),
            "mask_bytes": _peak(mask.dense)}


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
    causal = torch.ones(piece, piece, dtype=torch.bool).tril()[None]  # [1, c, c]
    full = torch.ones(1, piece, piece, dtype=torch.bool)
    return {
        "seq_len": seq_len, "piece": piece,
        "diag_masked_s": _median_time(lambda: _block_step(kernel, q, k, v, causal, dout, scale)),
        "diag_causal_s": _median_time(lambda: _fused_step(q, k, v, dout, scale, True)),
        "full_masked_s": _median_time(lambda: _block_step(kernel, q, k, v, full, dout, scale)),
        "full_nomask_s": _median_time(lambda: _fused_step(q, k, v, dout, scale, False)),
        "diag_masked_bytes": _peak(lambda: _block_step(kernel, q, k, v, causal, dout, scale)),
        "diag_causal_bytes": _peak(lambda: _fused_step(q, k, v, dout, scale, True)),
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
        return {"mask": [mask_cost(s) for s in seq_lens], "block": [block_cost(s) for s in seq_lens],
                "index": [index_cost(s) for s in seq_lens]}
    finally:
        torch.set_num_threads(threads)
