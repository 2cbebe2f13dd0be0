"""Device self-checks: a fused kernel is trusted on a (device, dtype) only after it matched
cptrain's exact torch path there, forward and backward.

Fused GPU kernels (flash-attn's block and varlen kernels, torch's memory-efficient attention with
LSE, fla's gated delta rule, mamba-ssm's SSD scan, causal-conv1d) change calling conventions between
versions:
LSE layouts and padding, window conventions, document indices, head layouts. A convention
mismatch does not crash, it trains on wrong numbers, which is the failure cptrain exists to
rule out. So none runs unchecked:

    first request of kernel K on (device, dtype)
        probe(): a small packed case (documents of several lengths, GQA, windows) through K and
                 through the exact torch implementation on the same device, outputs and
                 gradients compared at the dtype's tolerance
        verdict cached per (K, device, dtype): None (trusted) or the reason it failed

    explicit choice (attn=flash_attention_2, kernel="cuda_flash"): a failed check raises
    automatic choice ("auto", mixer kernels when importable): a failed check warns once and the
    exact torch path runs instead

The probe costs one small fwd+bwd per kernel, device and dtype per process.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable, Sequence

import torch

# max |fast - exact| / max |exact| allowed per compute dtype (the exact side runs in fp32)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}

_VERDICTS: dict[tuple[str, str, torch.dtype], str | None] = {}


def compare(fast: Sequence[torch.Tensor], exact: Sequence[torch.Tensor], dtype: torch.dtype,
            names: Sequence[str] | None = None) -> str | None:
    """None when every fast output matches its exact counterpart (same shape, same -inf pattern,
    relative error within TOLERANCE[dtype]); else what differs."""
    names = names or [f"output {i}" for i in range(len(exact))]
    for name, a, b in zip(names, fast, exact, strict=True):
        if tuple(a.shape) != tuple(b.shape):
            return f"{name}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        a, b = a.detach().double(), b.detach().double()
        a_inf, b_inf = torch.isneginf(a), torch.isneginf(b)
        if not torch.equal(a_inf, b_inf):
            return f"{name}: -inf at {int((a_inf != b_inf).sum())} entries where the exact path differs"
        a, b = a.masked_fill(a_inf, 0.0), b.masked_fill(b_inf, 0.0)
        if not bool(torch.isfinite(a).all()):
            return f"{name}: non-finite values"
        err = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6) if b.numel() else 0.0
        if err > TOLERANCE[dtype]:
            return f"{name}: relative error {err:.3g} > {TOLERANCE[dtype]:g}"
    return None


def probe_function(fast: Callable, exact: Callable, differentiable: Sequence[torch.Tensor], dtype: torch.dtype, *,
                   names: Sequence[str] | None = None, **kwargs) -> str | None:
    """Run `fast` and `exact` on the same inputs (`differentiable` positional tensors, then kwargs),
    backpropagate the same random weighting of the output through both, and compare the output and
    every input gradient."""
    results = []
    for fn in (fast, exact):
        leaves = [t.detach().clone().requires_grad_() for t in differentiable]
        out = fn(*leaves, **kwargs)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, torch.float32)
        (out.float() * weight).sum().backward()
        results.append([out, *(leaf.grad for leaf in leaves)])
    names = names or ["out", *(f"d input {i}" for i in range(len(differentiable)))]
    return compare(results[0], results[1], dtype, names)


def verdict(name: str, device: torch.device | str, dtype: torch.dtype, probe: Callable[[], str | None]) -> str | None:
    """The cached outcome of `probe` for (name, device, dtype): None when trusted, else why not."""
    key = (name, str(torch.device(device)), dtype)
    if key not in _VERDICTS:
        try:
            _VERDICTS[key] = probe()
        except Exception as exc:  # a kernel that cannot run here is not trusted here
            _VERDICTS[key] = f"{type(exc).__name__}: {exc}"
    return _VERDICTS[key]


def require(name: str, device, dtype: torch.dtype, probe: Callable[[], str | None]) -> None:
    """Raise unless the kernel passed its check on (device, dtype)."""
    failure = verdict(name, device, dtype, probe)
    if failure is not None:
        raise RuntimeError(f"kernel {name!r} failed cptrain's exactness check on {device} / {dtype}: {failure}. "
                           "Choose an exact torch kernel instead (sdpa or math).")


def prefer(name: str, device, dtype: torch.dtype, probe: Callable[[], str | None]) -> bool:
    """True when the kernel passed its check; otherwise warn (once per key) and return False."""
    failure = verdict(name, device, dtype, probe)
    if failure is not None:
        warnings.warn(f"kernel {name!r} failed cptrain's exactness check on {device} / {dtype} ({failure}); "
                      "running the exact torch path instead", RuntimeWarning, stacklevel=3)
    return failure is None


@functools.cache
def importable(package: str) -> bool:
    """Whether an optional kernel package imports here (cached: a failed import is slow to repeat)."""
    try:
        importlib.import_module(package)
        return True
    except ImportError:
        return False


def forget(name: str | None = None) -> None:
    """Drop cached verdicts (all, or one kernel's): tests and kernel upgrades in a live process."""
    for key in [key for key in _VERDICTS if name is None or key[0] == name]:
        del _VERDICTS[key]
