"""The fused GPU kernel adapters and the self-check that guards them, proven on CPU.

No GPU here: the adapters are driven through CPU stand-ins written from each package's documented
contract (tests/fake_gpu_packages.py), torch's memory-efficient attention ops run on the meta
device (their real schemas and output shapes in this torch), and the exactness check is shown to
accept exact kernels and to reject kernels with the classic convention bugs.
"""

import re
import warnings

import pytest
import torch

import cp
from cp import kernel_check
from cp.block_kernels import CpuFlashBlockKernel, MathBlockKernel
from cp.cuda_kernels import (
    EfficientBlockKernel,
    FlashBlockKernel,
    FlashVarlenKernel,
    probe_block_kernel,
    probe_local_kernel,
)
from cp.masks import AttnMask
from models.mixers import fused_kernels
from models.mixers.gated_deltanet import varlen_gated_delta_rule
from models.mixers.mamba2 import ssd_scan_varlen
from models.mixers.varlen_ops import varlen_causal_conv1d
from tests import fake_gpu_packages
from tests.dist import run_distributed


def test_compare_reports_shape_inf_pattern_and_error():
    a = torch.tensor([1.0, float("-inf")])
    assert kernel_check.compare([a], [a.clone()], torch.float32) is None
    assert "shape" in kernel_check.compare([a[:1]], [a], torch.float32)
    assert "-inf" in kernel_check.compare([torch.tensor([1.0, 0.0])], [a], torch.float32)
    assert "relative error" in kernel_check.compare([torch.tensor([1.01, float("-inf")])], [a], torch.float32)
    assert kernel_check.compare([torch.tensor([1.01, float("-inf")])], [a], torch.bfloat16) is None


def test_verdicts_are_cached_and_failures_raise_or_fall_back():
    kernel_check.forget("probe_test")
    calls = []

    def failing():
        calls.append(1)
        raise RuntimeError("no such kernel here")

    with pytest.warns(RuntimeWarning, match="no such kernel here"):
        assert not kernel_check.prefer("probe_test", "cpu", torch.float32, failing)
    with pytest.raises(RuntimeError, match="failed cptrain's exactness check"):
        kernel_check.require("probe_test", "cpu", torch.float32, failing)
    assert len(calls) == 1, "the probe runs once per (kernel, device, dtype)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_check.prefer("probe_test", "cpu", torch.float64, lambda: None)
    kernel_check.forget("probe_test")


class _IgnoresMask(CpuFlashBlockKernel):
    """The packed-document bug: a kernel that attends across documents."""

    def forward(self, q, k, v, allowed, scale):
        plain_causal = torch.ones_like(allowed).tril()  # documents and window dropped
        return super().forward(q, k, v, allowed if bool(allowed.all()) else plain_causal, scale)


class _LseInLog2(CpuFlashBlockKernel):
    """A kernel whose LSE is in another base (the convention bug that breaks ring merges)."""

    def forward(self, q, k, v, allowed, scale):
        out, lse = super().forward(q, k, v, allowed, scale)
        return out, lse / torch.log(torch.tensor(2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_kernel_probe_accepts_exact_kernels(dtype):
    for kernel in (CpuFlashBlockKernel(), MathBlockKernel()):
        assert probe_block_kernel(kernel, torch.device("cpu"), dtype) is None


@pytest.mark.parametrize("kernel,match", [(_IgnoresMask(), "packed \\+ window block: out"), (_LseInLog2(), "lse")])
def test_block_kernel_probe_rejects_wrong_kernels(kernel, match):
    failure = probe_block_kernel(kernel, torch.device("cpu"), torch.float32)
    assert failure is not None and re.search(match, failure), failure


class _SchemaBoundBackward:
    """Stands in for aten::_efficient_attention_backward on meta tensors (this torch's meta kernel for it
    drops the `out` argument): binds the call to the op's real schema, then returns gradient shapes."""

    def __init__(self):
        self.schema = torch.ops.aten._efficient_attention_backward.default._schema

    def __call__(self, *args, **kwargs):
        names = [a.name for a in self.schema.arguments]
        bound = dict(zip(names, args)) | kwargs
        assert set(kwargs) <= set(names), f"not in the schema: {set(kwargs) - set(names)}"
        missing = [a.name for a in self.schema.arguments if a.name not in bound and not a.has_default_value()]
        assert not missing, f"required by the schema, not passed: {missing}"
        lse, q = bound["logsumexp"], bound["query"]
        assert lse.shape[-1] % 32 == 0 and lse.shape[-1] >= q.shape[1], "LSE padded to a multiple of 32"
        return (torch.empty_like(q), torch.empty_like(bound["key"]), torch.empty_like(bound["value"]), None)


@pytest.mark.parametrize("groups", [1, 2])
def test_efficient_block_kernel_matches_torch_schemas_on_meta(groups, monkeypatch):
    """aten::_efficient_attention_forward runs the adapter's call on meta tensors in this torch and the
    backward call binds to its schema; the adapter returns the block-kernel layout: out [B, Sq, H, D],
    lse [B, H, Sq], dk/dv with Hkv heads (GQA groups summed)."""
    kernel, meta = EfficientBlockKernel(), torch.device("meta")
    B, S, H, D = 2, 40, 4, 64
    q = torch.empty(B, S, H, D, device=meta, dtype=torch.bfloat16)
    kv = torch.empty(B, S, H // groups, D, device=meta, dtype=torch.bfloat16)
    pos = torch.arange(S)
    masks = {"diagonal": torch.ones(S, S, dtype=torch.bool).tril().expand(B, S, S),
             "all visible": torch.ones(B, S, S, dtype=torch.bool),
             "window": AttnMask(pos, pos, torch.zeros(B, S), torch.zeros(B, S), window=5).dense()}
    monkeypatch.setattr(torch.ops.aten, "_efficient_attention_backward", _SchemaBoundBackward())
    for name, allowed in masks.items():  # real masks (the mode is decided from them), meta tensors
        out, lse = kernel.forward(q, kv, kv, allowed, 0.125)
        assert out.shape == (B, S, H, D) and lse.shape == (B, H, S), name
        delta = torch.empty(lse.shape, device=meta)
        dq, dk, dv = kernel.backward(q, kv, kv, out, out, lse, delta, allowed, 0.125)
        assert dq.shape == q.shape and dk.shape == kv.shape and dv.shape == kv.shape, name


def test_flash_varlen_adapter_is_exact_and_a_wrong_window_convention_is_caught():
    with fake_gpu_packages.installed():
        kernel = FlashVarlenKernel("flash_attention_2")
        for causal, window in ((True, None), (True, 17), (False, 9)):
            assert probe_local_kernel(kernel, "cpu", torch.float32, causal=causal, window=window) is None
    with fake_gpu_packages.installed(flash_window_shift=1):  # window off by one
        failure = probe_local_kernel(FlashVarlenKernel("flash_attention_2"), "cpu", torch.float32)
        assert failure is not None and "out" in failure


@pytest.mark.parametrize("version", ["2.5", "2.7"])
def test_flash_block_kernel_binds_either_backward_signature(version):
    """The flash block kernel (causal / full pieces on flash-attn, window-cut pieces on its fallback)
    passes the block probe against flash-attn's 2.5 and 2.7 backward signatures."""
    with fake_gpu_packages.installed(flash_backward_version=version):
        kernel = FlashBlockKernel(fallback=CpuFlashBlockKernel())
        assert probe_block_kernel(kernel, torch.device("cpu"), torch.float32) is None


def _ulysses_flash_worker(rank, world):
    """Ulysses at world 2 with the flash varlen adapter on packed documents == the math kernel."""
    dims = cp.ParallelDims(world_size=world, cp=world, cp_style="ulysses")
    dims.build()
    p = cp.setup_cp_params(torch.zeros(2, 48, dtype=torch.long), dims, seq_lens=[[20, 1, 27], [48]]).params
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 48, h, 16, generator=gen) for h in (4, 2, 2))
    results = []
    with fake_gpu_packages.installed():
        for attn_fn in (FlashVarlenKernel("flash_attention_2"), "math"):
            ql, kl, vl = (cp.shard(t, p).requires_grad_() for t in (q, k, v))
            out = cp.ulysses_attention(ql, kl, vl, p, window=7, kernel=attn_fn)
            out.pow(2).sum().backward()
            results.append([out, ql.grad, kl.grad, vl.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ulysses_with_flash_varlen_adapter_matches_math():
    run_distributed(_ulysses_flash_worker, 2)


def test_document_index_helpers():
    docs = torch.tensor([[4, 4, 5, 6, 6, 6], [7, 7, 7, 7, 8, 8]])
    assert fused_kernels.seq_idx_from_doc_ids(docs).tolist() == [[0, 0, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1]]
    assert fused_kernels.cu_seqlens_from_doc_ids(docs).tolist() == [0, 2, 3, 6, 10, 12]


@pytest.mark.parametrize("probe,fused,twin", [
    (fused_kernels.probe_causal_conv1d, fused_kernels.fused_causal_conv1d, varlen_causal_conv1d),
    (fused_kernels.probe_gated_delta_rule, fused_kernels.fused_gated_delta_rule, varlen_gated_delta_rule),
    (fused_kernels.probe_ssd_scan, fused_kernels.fused_ssd_scan, ssd_scan_varlen),
    (fused_kernels.probe_gated_delta_rule_state, fused_kernels.fused_gated_delta_rule, varlen_gated_delta_rule),
    (fused_kernels.probe_ssd_scan_state, fused_kernels.fused_ssd_scan, ssd_scan_varlen)])
def test_mixer_adapters_pass_documents_to_the_packages_correctly(probe, fused, twin):
    """Each adapter, driven through its package's documented contract, equals cptrain's exact twin
    on packed documents (7, 1 and 64 tokens), forward and input gradients."""
    with fake_gpu_packages.installed():
        assert probe(fused, twin, torch.device("cpu"), torch.float32) is None


@pytest.mark.parametrize("probe,fused,twin,wrong", [
    (fused_kernels.probe_gated_delta_rule_state, fused_kernels.fused_gated_delta_rule, varlen_gated_delta_rule,
     lambda final, transition: (final, transition.transpose(-1, -2))),  # a transition read the wrong way round
    (fused_kernels.probe_ssd_scan_state, fused_kernels.fused_ssd_scan, ssd_scan_varlen,
     lambda final, decay: (final, decay * 0)),  # the decay across the shard dropped
])
def test_state_passing_probes_catch_a_wrong_summary(probe, fused, twin, wrong):
    """The state-passing probes compare the summaries a fused kernel hands the chain, not only its outputs."""
    def broken(*args, entering_state, **kwargs):
        return fused(*args, entering_state=lambda final, other: entering_state(*wrong(final, other)), **kwargs)

    with fake_gpu_packages.installed():
        assert probe(broken, twin, torch.device("cpu"), torch.float32) is not None


def test_mixer_probe_catches_documents_leaking():
    """A fused kernel that ignores the document starts fails its check."""
    leaky = lambda x, w, b, doc_ids, **kw: varlen_causal_conv1d(x, w, b, torch.zeros_like(doc_ids), **kw)
    failure = fused_kernels.probe_causal_conv1d(leaky, varlen_causal_conv1d, torch.device("cpu"), torch.float32)
    assert failure is not None and "out" in failure


def test_mixer_kernels_fall_back_to_the_twin_off_cuda_or_when_the_check_fails():
    kernel_check.importable.cache_clear()  # importability is cached per process
    assert fused_kernels.pick("causal_conv1d", torch.device("cpu"), torch.float32) is varlen_causal_conv1d
    assert fused_kernels.pick("ssd_scan", torch.device("cuda"), torch.float32) is ssd_scan_varlen  # not importable
    kernel_check.forget()
    with fake_gpu_packages.installed():  # importable, but the probe cannot run on a CUDA device here
        kernel_check.importable.cache_clear()
        with pytest.warns(RuntimeWarning, match="exactness check"):
            picked = fused_kernels.pick("gated_delta_rule", torch.device("cuda"), torch.bfloat16)
        assert picked is varlen_gated_delta_rule
    kernel_check.importable.cache_clear()
    kernel_check.forget()


def test_ring_block_kernel_auto_on_cuda_falls_back_when_unchecked():
    """'auto' on a CUDA device whose fused kernel cannot pass the check runs the exact math kernel;
    an explicit cuda_efficient raises instead."""
    kernel_check.forget()
    with pytest.warns(RuntimeWarning, match="cuda_efficient"):
        assert isinstance(cp.kernels.resolve_block_kernel("auto", torch.device("cuda"), torch.float32), MathBlockKernel)
    for name in ("cuda_efficient", "cuda_flash"):
        with pytest.raises(RuntimeError, match=name):
            cp.kernels.resolve_block_kernel(name, torch.device("cuda"), torch.bfloat16)
    kernel_check.forget()
