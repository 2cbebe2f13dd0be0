"""Ring and hybrid attention == single-rank reference, forward and backward, on real gloo groups."""

import math

import pytest
import torch

import cp
from tests.attention_cases import Case, core_cases, run_cases


def _dims(world, style, cp_ulysses=None):
    dims = cp.ParallelDims(world_size=world, cp=world, cp_style=style, cp_ulysses=cp_ulysses)
    dims.build()
    return dims


def _ring_worker(rank, world):
    run_cases(core_cases(world), _dims(world, "ring"), cp.ring_attention)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ring_matches_reference(world):
    from tests.dist import run_distributed
    run_distributed(_ring_worker, world)


def _hybrid_worker(rank, world, cp_ulysses):
    run_cases(core_cases(world), _dims(world, "hybrid", cp_ulysses), cp.hybrid_attention)


@pytest.mark.parametrize("cp_ulysses", [2, 1, 4])  # 2x2, ring 4 x ulysses 1, ring 1 x ulysses 4
def test_hybrid_matches_reference_on_four_ranks(cp_ulysses):
    from tests.dist import run_distributed
    run_distributed(_hybrid_worker, 4, cp_ulysses)


def _styles_agree_worker(rank, world):
    """ring == ulysses == hybrid on the same data, and zigzag == contiguous for the ring."""
    gen = torch.Generator().manual_seed(11)
    S, H, Hkv, D = 77, 4, 2, 8
    q = torch.randn(1, S, H, D, generator=gen)
    k, v = torch.randn(1, S, Hkv, D, generator=gen), torch.randn(1, S, Hkv, D, generator=gen)
    lens, sinks = [[30, 1, 40, 6]], torch.randn(H, generator=gen)
    outs = {}
    runs = [("ulysses", None, None, cp.ulysses_attention), ("ring", None, None, cp.ring_attention),
            ("ring", None, "contiguous", cp.ring_attention)]
    if world == 4:
        runs.append(("hybrid", 2, None, cp.hybrid_attention))
    for causal in (True, False):
        for style, cp_ulysses, layout, fn in runs:
            dims = _dims(world, style, cp_ulysses)
            p = cp.setup_cp_params(torch.zeros(1, S, dtype=torch.long), dims, seq_lens=lens, layout=layout).params
            ql, kl, vl = (cp.shard(t, p).requires_grad_() for t in (q, k, v))
            out = cp.unshard(fn(ql, kl, vl, p, causal=causal, window=25, sinks=sinks), p)
            out.pow(2).sum().backward()
            grads = [cp.unshard(g, p) for g in (ql.grad, kl.grad, vl.grad)]
            outs[(style, layout, causal)] = [out.detach()] + grads
    for key, got in outs.items():
        ref = outs[("ulysses", None, key[2])]
        for what, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            err = (a - b).abs().max().item()
            assert err < 2e-5, f"{key} {what} differs from ulysses by {err:.3g}"  # fp32 rounding only


def test_ring_ulysses_hybrid_and_layouts_agree():
    from tests.dist import run_distributed
    run_distributed(_styles_agree_worker, 2)
    run_distributed(_styles_agree_worker, 4)


def _uneven_heads_hybrid_worker(rank, world):
    dims = _dims(world, "hybrid", 2)
    cases = [Case("hybrid_H6_kv2", H=6, Hkv=2, window="between", sinks=True),
             Case("hybrid_H7_kv7", H=7, Hkv=7, seed=3), Case("hybrid_H3_kv1", H=3, Hkv=1, seed=4)]
    run_cases(cases, dims, cp.hybrid_attention)


def test_hybrid_heads_not_divisible_by_ulysses_degree():
    from tests.dist import run_distributed
    run_distributed(_uneven_heads_hybrid_worker, 4)


def _plan_worker(rank, world):
    """Zigzag balances causal work and the plan skips invisible blocks: count visible query-key pairs
    each rank computes, and pieces skipped for documents/windows."""
    from cp.ring import RingPlan
    dims = _dims(world, "ring")
    S = 64
    p = cp.setup_cp_params(torch.zeros(1, S, dtype=torch.long), dims).params
    plan = RingPlan.build(p, causal=True, window=None)
    computed = sum(math.prod(m.shape) for step in plan.steps for *_, m in step)  # area actually computed
    visible = sum(m.visible_pairs() for step in plan.steps for *_, m in step)
    # one document, causal: rank-balanced with zigzag; every computed piece is at least half visible
    contiguous = cp.setup_cp_params(torch.zeros(1, S, dtype=torch.long), dims, layout="contiguous").params
    contiguous_visible = sum(m.visible_pairs() for step in RingPlan.build(contiguous, True, None).steps
                             for *_, m in step)
    # documents that never meet across ranks: a step whose blocks share no document computes nothing
    docs = cp.setup_cp_params(torch.zeros(1, S, dtype=torch.long), dims, seq_lens=[[S // 4] * 4],
                              layout="contiguous").params
    doc_pieces = [len(step) for step in RingPlan.build(docs, True, None).steps]
    window_pieces = [len(step) for step in RingPlan.build(contiguous, True, 4).steps]
    return computed, visible, contiguous_visible, doc_pieces, window_pieces


def test_ring_plan_balances_zigzag_and_skips_invisible_blocks():
    from tests.dist import run_distributed
    results = run_distributed(_plan_worker, 4)
    visible = [r[1] for r in results]
    assert len(set(visible)) == 1, f"zigzag causal work per rank should be equal: {visible}"
    assert sum(visible) == 64 * 65 // 2  # every causal pair computed exactly once
    contiguous = [r[2] for r in results]
    assert max(contiguous) > 3 * min(contiguous), f"contiguous layout is unbalanced as expected: {contiguous}"
    for computed, vis, *_ in results:
        assert computed <= 2 * vis, "half-masked zigzag blocks are computed on their visible runs only"
    for rank, r in enumerate(results):
        assert r[3] == [1, 0, 0, 0], f"rank {rank}: 4 documents of one shard each see only their own block: {r[3]}"
        assert r[4][0] == 1 and sum(r[4][2:]) == 0, f"window 4 < shard: only own and previous block: {r[4]}"


def _ring_errors_worker(rank, world):
    dims = _dims(world, "hybrid", 2)
    p = cp.setup_cp_params(torch.zeros(1, 32, dtype=torch.long), dims).params
    q = torch.randn(1, p.local_len, 4, 8)
    with pytest.raises(ValueError, match="use cp.hybrid_attention"):
        cp.ring_attention(q, q, q, p)
    with pytest.raises(ValueError, match="CPParams describe"):
        cp.hybrid_attention(q[:, 1:], q[:, 1:], q[:, 1:], p)
    with pytest.raises(ValueError, match="q head dim 8 differs from k head dim 6"):
        cp.hybrid_attention(q, q[..., :6], q, p)
    ring = cp.setup_cp_params(torch.zeros(1, 32, dtype=torch.long), _dims(world, "ring")).params
    with pytest.raises(ValueError, match="q head dim 8 differs from k head dim 6"):
        cp.ring_attention(q, q[..., :6], q, ring)
    with pytest.raises(ValueError, match="pass a built ParallelDims"):
        cp.setup_cp_params(torch.zeros(1, 32, dtype=torch.long), style="hybrid")


def test_ring_and_hybrid_reject_bad_inputs():
    from tests.dist import run_distributed
    run_distributed(_ring_errors_worker, 4)


def test_piece_masks_classified_from_ranges_equal_the_dense_mask():
    """Every piece kind the plan derives from position ranges alone (causal diagonal, full, window-cut
    dense, skipped) is exactly the dense mask of global positions, for causal and non-causal, any window."""
    from cp.masks import AttnMask
    from cp.ring import _piece_mask

    runs = [(0, 8), (8, 16), (3, 5), (20, 27)]
    kinds = set()
    for (qa, qb) in runs:
        for (ka, kb) in runs:
            qp, kp = torch.arange(qa, qb), torch.arange(ka, kb)
            for causal in (True, False):
                for window in (None, 1, 3, 8, 9, 30):
                    one = torch.zeros(1, len(qp), dtype=torch.long)
                    expected = AttnMask(qp, kp, one, torch.zeros(1, len(kp), dtype=torch.long), causal, window).dense()
                    mask = _piece_mask(qp, kp, causal, window)
                    if mask is None:
                        assert not expected.any(), (qa, qb, ka, kb, causal, window)
                        continue
                    kinds.add(mask.kind)
                    assert torch.equal(mask.dense(), expected), (qa, qb, ka, kb, causal, window, mask.kind)
                    assert mask.visible_pairs() == int(expected.sum())
    assert kinds == {"causal", "full", "dense"}
