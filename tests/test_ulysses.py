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
    run_cases(core_cases(world), _dims(world))


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
    # After every rejected call the group is still in step: a real call works.
    out = cp.ulysses_attention(q, q, q, p)
    assert out.shape == q.shape


def test_ulysses_rejects_bad_inputs_before_any_collective():
    run_distributed(_errors_worker, 2)
