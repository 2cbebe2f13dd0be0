"""The CP attention case matrix and its checker, shared by the Ulysses / ring / hybrid tests.

Every case runs the CP path on this rank's shards, gathers the output, backpropagates a fixed
random projection of it, and compares output, dq, dk, dv (and the sink gradient, summed over
the cp group like any replicated parameter's) with the float64 single-rank reference.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

import cp
from tests.reference import random_doc_lens, reference_attention

# fp32 CP path vs float64 reference: softmax over <= a few hundred keys and a D=8..16 dot product
# in fp32 give ~1e-7 relative error per element; 2e-5 leaves room for accumulation order while a
# masking bug (a leaked or dropped key) moves values by >1e-2.
FP32_ATOL = 2e-5
# float64 CP path: the algorithm is exact, only rounding remains.
FP64_ATOL = 1e-11


@dataclass(frozen=True)
class Case:
    name: str
    S: int = 96
    B: int = 1
    H: int = 4
    Hkv: int = 4
    D: int = 8
    docs: str = "random"  # random | single | ones (every document of length 1)
    causal: bool = True
    window: str | int | None = None  # None, an int, or "lt_shard" | "between" | "gt_seq"
    sinks: bool = False
    kernel: str | None = None  # None = auto, a KERNELS name, or "hf_sdpa" | "hf_eager"
    dtype: torch.dtype = torch.float32
    seed: int = 0
    extra: dict = field(default_factory=dict)


def resolve_window(window, S: int, cp_size: int):
    if window is None or isinstance(window, int):
        return window
    shard = -(-S // cp_size)
    return {"lt_shard": max(1, shard // 3), "between": shard + max(1, (S - shard) // 2), "gt_seq": 2 * S}[window]


def _kernel(name):
    if name in ("hf_sdpa", "hf_eager"):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.models.llama.modeling_llama import eager_attention_forward
        return cp.hf_kernel(sdpa_attention_forward if name == "hf_sdpa" else eager_attention_forward)
    return name


def _doc_lens(case: Case, rng: random.Random) -> list[list[int]]:
    if case.docs == "single":
        return [[case.S] for _ in range(case.B)]
    if case.docs == "ones":
        return [[1] * case.S for _ in range(case.B)]
    return [random_doc_lens(case.S, rng) for _ in range(case.B)]


def max_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.double() - b.double()).abs()
    return d.max().item(), d.mean().item()


def check_case(case: Case, dims: cp.ParallelDims, attention=cp.ulysses_attention) -> list[str]:
    """Run one case on this rank; return failure messages (empty when everything matches)."""
    rng = random.Random(case.seed)
    gen = torch.Generator().manual_seed(case.seed)
    q = torch.randn(case.B, case.S, case.H, case.D, generator=gen, dtype=case.dtype)
    k = torch.randn(case.B, case.S, case.Hkv, case.D, generator=gen, dtype=case.dtype)
    v = torch.randn(case.B, case.S, case.Hkv, case.D, generator=gen, dtype=case.dtype)
    proj = torch.randn(case.B, case.S, case.H, case.D, generator=gen, dtype=case.dtype)
    sinks = torch.randn(case.H, generator=gen, dtype=case.dtype) if case.sinks else None
    lens = _doc_lens(case, rng)
    window = resolve_window(case.window, case.S, dims.cp)

    batch = cp.setup_cp_params(torch.zeros(case.B, case.S, dtype=torch.long), dims, seq_lens=lens)
    p = batch.params
    ql, kl, vl = (cp.shard(t, p).requires_grad_() for t in (q, k, v))
    sl = None if sinks is None else sinks.clone().requires_grad_()
    out = attention(ql, kl, vl, p, causal=case.causal, window=window, sinks=sl,  # kernel: local (Ulysses) or block
                    **({"kernel": _kernel(case.kernel)} if case.kernel else {}), **case.extra)
    full = cp.unshard(out, p)
    (full * proj).sum().backward()

    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    sr = None if sinks is None else sinks.double().requires_grad_()
    ref = reference_attention(qr, kr, vr, lens, causal=case.causal, window=window, sinks=sr)
    (ref * proj.double()).sum().backward()

    atol = FP64_ATOL if case.dtype == torch.float64 else FP32_ATOL
    pairs = [("out", full, ref), ("dq", ql.grad, cp.shard(qr.grad, p)), ("dk", kl.grad, cp.shard(kr.grad, p)),
             ("dv", vl.grad, cp.shard(vr.grad, p))]
    if sinks is not None:
        sink_grad = sl.grad.clone()
        if p.cp_group is not None:
            dist.all_reduce(sink_grad, group=p.cp_group)  # a replicated parameter: grads sum over cp ranks
        pairs.append(("dsinks", sink_grad, sr.grad))
    failures = []
    for what, got, want in pairs:
        if got is None:
            failures.append(f"{case.name}: {what} is missing (no gradient reached it)")
            continue
        worst, mean = max_err(got, want)
        if not worst <= atol:
            failures.append(f"{case.name} (window={window}, docs={lens}): {what} max abs err {worst:.3g} "
                            f"(mean {mean:.3g}) > {atol:g}")
    return failures


def core_cases(world: int) -> list[Case]:
    """The case matrix every CP attention style must pass (DESIGN.md 'How to test')."""
    S_uneven = 16 * world + 3  # not divisible by cp
    cases = [
        Case("packed"),
        Case("packed_seed1", seed=1, S=80),
        Case("single_doc", docs="single"),
        Case("length1_docs", docs="ones", S=8 * world),
        Case("uneven_total", S=S_uneven, seed=2),
        Case("uneven_single_doc", S=S_uneven, docs="single"),
        Case("gqa_kv1", Hkv=1),
        Case("gqa_kv2", Hkv=2, seed=3),
        Case("window_lt_shard", window="lt_shard"),
        Case("window_between", window="between", seed=4),
        Case("window_between_single_doc", window="between", docs="single"),
        Case("window_gt_seq", window="gt_seq"),
        Case("sinks", sinks=True, seed=5),
        Case("sinks_window_gqa", sinks=True, window="between", Hkv=2, seed=6),
        Case("noncausal", causal=False),
        Case("noncausal_window", causal=False, window="lt_shard", seed=7),
        Case("batch2", B=2, S=64, seed=8),
        Case("batch2_uneven_window", B=2, S=S_uneven, window="between", Hkv=2, seed=9),
        Case("math_kernel", kernel="math", window="between"),
        Case("fp64_exact", dtype=torch.float64, window="between", sinks=True, Hkv=2, seed=10),
    ]
    return cases


def run_cases(cases: list[Case], dims: cp.ParallelDims, attention=cp.ulysses_attention) -> None:
    failures = [msg for case in cases for msg in check_case(case, dims, attention)]
    assert not failures, "\n".join(failures)


def with_kernel(cases: list[Case], kernel: str) -> list[Case]:
    return [replace(c, name=f"{c.name}[{kernel}]", kernel=kernel) for c in cases]
