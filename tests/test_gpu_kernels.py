"""The fused GPU kernels on a real CUDA device (skipped on CPU): each passes cptrain's exactness
probe, and the CP paths that use them equal the exact math kernel, forward and backward.

Run on a GPU machine with the `[gpu]` extra installed: `python -m pytest -q tests/test_gpu_kernels.py`.
A kernel whose package is missing is skipped, not failed; one that is present must pass.
"""

import importlib

import pytest
import torch

import cp
from cp import kernel_check
from cp.cuda_kernels import EFFICIENT, FLASH, FlashVarlenKernel, probe_block_kernel, probe_local_kernel
from models.mixers import fused_kernels

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _needs(package: str):
    try:
        importlib.import_module(package)
    except ImportError:
        pytest.skip(f"{package} is not installed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_efficient_block_kernel_passes_its_probe(dtype):
    assert probe_block_kernel(EFFICIENT, CUDA, dtype) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_block_kernel_passes_its_probe(dtype):
    _needs("flash_attn")
    assert probe_block_kernel(FLASH, CUDA, dtype) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 17), (False, 9)])
def test_flash_varlen_kernel_passes_its_probe(dtype, causal, window):
    _needs("flash_attn")
    assert probe_local_kernel(FlashVarlenKernel("flash_attention_2"), CUDA, dtype, causal=causal, window=window) is None


@pytest.mark.parametrize("op,package", [("causal_conv1d", "causal_conv1d"),
                                        ("gated_delta_rule", "fla.ops.gated_delta_rule"),
                                        ("ssd_scan", "mamba_ssm.ops.triton.ssd_combined")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixer_kernels_pass_their_probes(op, package, dtype):
    _needs(package)
    kernel_check.forget()
    spec = fused_kernels._twins()[op]
    assert spec.probe(spec.fused, spec.twin, CUDA, dtype) is None
    assert fused_kernels.pick(op, CUDA, dtype) is spec.fused


def test_ring_auto_kernel_on_cuda_matches_math():
    """The ring at world 1 on CUDA with 'auto' (cuda_efficient once checked) == the math block kernel,
    on packed documents with a window."""
    ids = torch.zeros(1, 96, dtype=torch.long, device=CUDA)
    p = cp.setup_cp_params(ids, style="ring", seq_lens=[[40, 1, 55]]).params
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 96, h, 64, generator=gen).to(CUDA) for h in (4, 2, 2))
    results = []
    for kernel in ("auto", "math"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = cp.ring_attention(*leaves, p, window=33, kernel=kernel)
        out.pow(2).sum().backward()
        results.append([out, *(t.grad for t in leaves)])
    assert isinstance(cp.kernels.resolve_block_kernel("auto", CUDA, torch.float32), type(EFFICIENT))  # fp32: no flash
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
