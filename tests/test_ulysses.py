"""Ulysses attention == single-rank reference, forward and backward, on real gloo groups."""

import pytest
import torch

import cp
from tests.attention_cases import Case, core_cases, run_cases, with_kernel
from tests.dist import run_distributed


def _dims(world, cp_degree=None, style="ulysses", **kw):
    dims = cp.ParallelDims(world_size=world, cp=cp_degree or world, cp_style=style, **kw)
    dims.build()
    return dims


def _core_worker(rank, world):
    kernels = [Case("math_sinks", kernel="math", sinks=True, window="lt_shard", Hkv=2),
               Case("lse_kernel", kernel="lse", sinks=True, window="between", Hkv=1, seed=12)]
    run_cases(core_cases(world) + kernels, _dims(world))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ulysses_matches_reference(world):
    run_distributed(_core_worker, world)


def _hf_kernel_worker(rank, world):
    base = [Case("packed"), Case("gqa_kv1", Hkv=1, window="between"), Case("noncausal", causal=False, Hkv=2)]
    run_cases(with_kernel(base, "hf_sdpa") + with_kernel(base, "hf_eager"), _dims(world))


def test_ulysses_runs_any_hf_attention_function():
    """transformers' own sdpa and eager functions, unchanged, are exact local kernels under Ulysses."""
    run_distributed(_hf_kernel_worker, 2)


def _uneven_heads_worker(rank, world, heads, kv_heads):
    cases = [Case(f"H{heads}_kv{kv_heads}", H=heads, Hkv=kv_heads, seed=heads),
             Case(f"H{heads}_kv{kv_heads}_sinks_window", H=heads, Hkv=kv_heads, sinks=True, window="between")]
    run_cases(cases, _dims(world))


@pytest.mark.parametrize("world,heads,kv_heads", [(4, 6, 6), (4, 6, 2), (4, 6, 3), (2, 7, 7), (2, 7, 1)])
def test_ulysses_heads_not_divisible_by_cp(world, heads, kv_heads):
    run_distributed(_uneven_heads_worker, world, heads, kv_heads)


def _dp_cp_worker(rank, world):
    """dp=2 x cp=2: each cp group runs its own batch; results still match the reference."""
    dims = _dims(world, cp_degree=2)
    seed = dims.dp_rank  # a different batch per dp replica, the same within a cp group
    run_cases([Case("dp_replica", seed=seed, window="between", Hkv=2)], dims)


def test_ulysses_inside_dp_by_cp_mesh():
    run_distributed(_dp_cp_worker, 4)


def _errors_worker(rank, world):
    dims = _dims(world)
    batch = cp.setup_cp_params(torch.zeros(1, 32, dtype=torch.long), dims)
    p = batch.params
    q = torch.randn(1, p.local_len, 1, 8)
    with pytest.raises(ValueError, match="at least 2 query heads"):
        cp.ulysses_attention(q, q, q, p)
    q = torch.randn(1, p.local_len + 1, 4, 8)
    with pytest.raises(ValueError, match="CPParams describe"):
        cp.ulysses_attention(q, q, q, p)
    q = torch.randn(1, p.local_len, 4, 8)
    with pytest.raises(ValueError, match="multiple of 3 KV heads"):
        cp.ulysses_attention(q, torch.randn(1, p.local_len, 3, 8), torch.randn(1, p.local_len, 3, 8), p)
    with pytest.raises(ValueError, match="window"):
        cp.ulysses_attention(q, q, q, p, window=0)
    with pytest.raises(ValueError, match="one logit per query head"):
        cp.ulysses_attention(q, q, q, p, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="q head dim 8 differs from k head dim 6"):
        cp.ulysses_attention(q, q[..., :6], q, p)
    # After every rejected call the group is still in step: a real call works.
    out = cp.ulysses_attention(q, q, q, p)
    assert out.shape == q.shape


def test_ulysses_rejects_bad_inputs_before_any_collective():
    run_distributed(_errors_worker, 2)


def _chunked_worker(rank, world):
    """Head-chunked pipelined Ulysses gives the same numbers as the single-shot path, and both match
    the reference. Bitwise with the math kernel (SDPA's fused GQA backward sums dK over a different
    batch of heads per chunk, which moves the last bit, ~1e-6)."""
    dims = _dims(world)
    cases = [Case("chunks2", H=8, Hkv=4, window="between", sinks=True, extra={"chunks": 2}),
             Case("chunks4_gqa", H=8, Hkv=4, seed=3, extra={"chunks": 4}) if world == 2 else
             Case("chunks2_uneven", H=8, Hkv=2, S=67, extra={"chunks": 2})]
    run_cases(cases, dims)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 61, 8, 16, generator=gen)
    k, v = torch.randn(1, 61, 4, 16, generator=gen), torch.randn(1, 61, 4, 16, generator=gen)
    p = cp.setup_cp_params(torch.zeros(1, 61, dtype=torch.long), dims, seq_lens=[[20, 1, 40]]).params
    results = []
    for chunks in (1, 2):
        ql, kl, vl = (cp.shard(t, p).requires_grad_() for t in (q, k, v))
        out = cp.ulysses_attention(ql, kl, vl, p, window=33, chunks=chunks, kernel="math")
        out.pow(2).sum().backward()
        results.append([out.detach(), ql.grad, kl.grad, vl.grad])
    for what, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"chunked {what} differs from single-shot by {(a - b).abs().max():.3g}"


def test_ulysses_head_chunked_pipeline_is_identical_to_single_shot():
    run_distributed(_chunked_worker, 2)
    run_distributed(_chunked_worker, 4)


def test_ulysses_chunk_option_is_validated():
    p = cp.setup_cp_params(torch.zeros(1, 8, dtype=torch.long)).params
    q = torch.randn(1, 8, 4, 8)
    with pytest.raises(ValueError, match="between 1 and the number of KV heads"):
        cp.ulysses_attention(q, q[:, :, :2], q[:, :, :2], p, chunks=3)


def _per_document_worker(rank, world):
    """Ulysses hands the kernel one document at a time (no [S, S] mask) and the result equals one call
    over the packed mask; rows of a batch keep their own documents."""
    dims = _dims(world)
    seq_lens = [[5, 17, 1, 9], [32]]
    ids = torch.zeros(2, 32, dtype=torch.long)
    p = cp.setup_cp_params(ids, dims, seq_lens=seq_lens).params
    assert p.document_spans == ((0, 0, 5), (0, 5, 22), (0, 22, 23), (0, 23, 32), (1, 0, 32))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 32, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    seen = []

    def spy(q_, k_, v_, mask, **kw):
        seen.append((q_.shape[:2], torch.unique(mask.q_doc).numel()))
        return cp.kernels.math_attention(q_, k_, v_, mask, **kw)

    def packed(q_, k_, v_, mask, **kw):
        return cp.kernels.math_attention(q_, k_, v_, mask, **kw)

    packed.packed_documents = True
    for window in (None, 4):
        grads = []
        for fn in (spy, packed):
            ql, kl, vl = (cp.shard(t, p).requires_grad_() for t in (q, k, v))
            out = cp.ulysses_attention(ql, kl, vl, p, window=window, kernel=fn)
            out.pow(2).sum().backward()
            grads.append([out.detach(), ql.grad, kl.grad, vl.grad])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert {n for _, n in seen} == {1}, "a per-document call saw more than one document"
    assert sorted(tuple(s) for s, _ in seen[:5]) == sorted([(1, 5), (1, 17), (1, 1), (1, 9), (1, 32)])


@pytest.mark.parametrize("world", [1, 2])
def test_ulysses_runs_the_kernel_per_document(world):
    run_distributed(_per_document_worker, world)


def test_mask_fast_paths_only_where_they_are_exact():
    """is_plain_causal / is_unmasked (the kernels' mask-free paths) agree with the dense mask, also for
    blocks whose queries and keys are far apart under a window."""
    from cp.masks import AttnMask, BlockMask
    for q_lo, k_lo in ((0, 0), (100, 0), (0, 100)):
        q_pos, k_pos = torch.arange(q_lo, q_lo + 10), torch.arange(k_lo, k_lo + 10)
        for causal in (True, False):
            for window in (None, 5, 10, 11, 20, 200):
                one = torch.zeros(1, 10, dtype=torch.long)
                mask = AttnMask(q_pos, k_pos, one, one, causal, window)
                dense = mask.dense()
                if mask.is_plain_causal():
                    assert torch.equal(dense[0], torch.ones(10, 10, dtype=torch.bool).tril())
                if mask.is_unmasked():
                    assert bool(dense.all()), (q_lo, k_lo, causal, window)
                assert torch.equal(BlockMask.from_attn_mask(mask).dense(), dense)
