"""Attention traits (models/traits.py) honoured or refused, at cp=1 and below the model level; HF hub
kernels as the inner kernel (models/hub_kernels.py) through transformers' own registration path."""

import math
import types

import pytest
import torch

import cp
import models
from cp.block_kernels import MathBlockKernel, attention_with_lse
from cp.kernels import softcap_kernels
from cp.masks import AttnMask
from models.tiny.family_configs import tiny_family_model
from models.traits import NOT_PASSED, layer_softcap, layer_window
from tests.dist import run_distributed
from tests.family_sweep import ATTENTION_STYLES, family_model, reference_run, run_sweep, sharpen_qk


def _softcap_reference(q, k, v, pos, doc, softcap, scale):
    """Textbook float64: capped logits, masked (document, causal), softmax, weighted values."""
    qh, kh, vh = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, S, H, D] -> [B, H, S, D]
    scores = qh @ kh.transpose(-1, -2) * scale
    scores = softcap * torch.tanh(scores / softcap)
    allowed = (doc[:, :, None] == doc[:, None, :]) & (pos[:, None] >= pos[None, :])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ vh).transpose(1, 2)  # [B, H, S, D] -> [B, S, H, D]


def _qkv(seed=0, S=24, H=4, D=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, S, H, D, generator=g) * 3).requires_grad_() for _ in range(3)]


def test_softcap_kernels_match_the_textbook_and_each_other():
    """The Ulysses kernel (autograd through the tanh) and the ring's math block kernel (its own backward)
    equal a float64 textbook softcapped attention, forward and backward; the cap visibly matters."""
    q, k, v = _qkv()
    softcap, scale = 2.0, 1 / math.sqrt(q.shape[-1])
    pos = torch.tensor([*range(10), *range(14)])
    doc = torch.tensor([[0] * 10 + [1] * 14])
    mask = AttnMask(pos, pos, doc, doc, causal=True)
    ref = _softcap_reference(q, k, v, pos, doc, softcap, scale)
    ulysses_kernel, block_kernel = softcap_kernels(softcap)
    out = ulysses_kernel(q, k, v, mask, scale=scale)
    assert (out.double() - ref).abs().max() < 1e-5
    uncapped = attention_with_lse(q, k, v, mask, scale=scale)[0]
    assert (uncapped.double() - ref).abs().max() > 1e-1, "logits too small for the cap to matter"

    dout = torch.randn_like(out)
    grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    block_out, lse = block_kernel.forward(q, k, v, mask.dense(), scale)
    assert (block_out.double() - ref).abs().max() < 1e-5
    delta = (dout * block_out).sum(-1).transpose(1, 2)  # [B, S, H] -> [B, H, S]
    block_grads = block_kernel.backward(q, k, v, block_out, dout, lse, delta, mask.dense(), scale)
    for name, got, want in zip("qkv", block_grads, grads):
        assert (got.double() - want).abs().max() < 1e-4, f"d{name}: {(got.double() - want).abs().max():.3g}"
    assert isinstance(block_kernel, MathBlockKernel) and block_kernel.softcap == softcap


def test_layer_window_reads_kwarg_module_and_config():
    config = types.SimpleNamespace(layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    sliding = types.SimpleNamespace(config=config, layer_idx=0)
    full = types.SimpleNamespace(config=config, layer_idx=1, sliding_window=8)  # attribute kept on a full layer
    assert layer_window(sliding) == 8  # from the config's layer types (no kwarg, no attribute)
    assert layer_window(full) is None  # the config says full: the leftover attribute is not a window
    assert layer_window(full, 5) == 5 and layer_window(sliding, None) is None  # a kwarg (None too) decides
    assert layer_window(types.SimpleNamespace(sliding_window=6)) == 6  # module attribute only
    assert layer_window(types.SimpleNamespace(sliding_window=6, is_sliding=False)) is None
    assert layer_window(types.SimpleNamespace(), NOT_PASSED) is None


def test_layer_softcap_reads_kwarg_module_and_config():
    config = types.SimpleNamespace(attn_logit_softcapping=30.0)
    assert layer_softcap(types.SimpleNamespace(config=config), None) == 30.0
    assert layer_softcap(types.SimpleNamespace(attn_logit_softcapping=20.0, config=config), None) == 20.0
    assert layer_softcap(types.SimpleNamespace(config=config), 10.0) == 10.0
    assert layer_softcap(types.SimpleNamespace(config=types.SimpleNamespace()), None) is None


def test_trait_families_are_exact_or_refused_at_cp1():
    """cp=1 packs documents too: softcap and module/config windows are honoured there, seq-length RoPE refused."""
    results = run_sweep(["gemma2", "qwen2_moe+window", "llama+dynamic_rope"], world=1)
    assert all(results["gemma2"][s][0] == "exact" for s in ATTENTION_STYLES), results["gemma2"]
    assert all(results["qwen2_moe+window"][s][0] == "exact" for s in ATTENTION_STYLES), results["qwen2_moe+window"]
    refused = results["llama+dynamic_rope"]
    assert all(refused[s][0] == "refused" for s in ATTENTION_STYLES), refused


@pytest.mark.parametrize("name,trait", [("gemma2", {"attn_logit_softcapping": None}),
                                        ("qwen2_moe+window", {"use_sliding_window": False})])
def test_sweep_logits_are_large_enough_for_a_dropped_trait_to_show(name, trait):
    """The sweep's sharpened q/k make the trait matter far beyond its tolerance (a silent drop fails)."""
    from tests.family_sweep import labels_for, variants

    family, variant = variants().get(name, (name, {}))
    with_trait = family_model(name)
    without = tiny_family_model(family, **{**variant, **trait})
    without.load_state_dict(with_trait.state_dict())
    for m in (with_trait, without):
        sharpen_qk(m)
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    lens = [40]
    a = reference_run(with_trait, ids, lens, labels_for(ids, lens))[0]
    b = reference_run(without, ids, lens, labels_for(ids, lens))[0]
    assert (a - b).abs().max() > 1e-2


# ---- HF hub kernels ------------------------------------------------------------------------------


HUB = "kernels-community/stand-in-attention"


def _register_stand_in(module_attrs=None, fail=None):
    """Replace transformers' hub loader by one that registers HF's own sdpa function under the hub name
    (what the real loader does with a downloaded kernel), without touching the network."""
    from transformers import AttentionInterface
    from transformers.integrations import hub_kernels
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import models.hub_kernels as ours

    ours._LOADED.clear()

    def load_and_register_attn_kernel(attn, attention_wrapper=None, allow_all_kernels=False):
        if fail is not None:
            raise fail
        AttentionInterface.register(attn, sdpa_attention_forward)
        return types.SimpleNamespace(**(module_attrs or {}))

    hub_kernels.load_and_register_attn_kernel = load_and_register_attn_kernel


def _hub_worker(rank, world):
    from tests.family_sweep import cp_run, labels_for

    _register_stand_in()
    reference = family_model("qwen3")
    sharpen_qk(reference)
    model = family_model("qwen3")
    model.load_state_dict(reference.state_dict())
    lens = [20, 1, 30, 10]
    ids = torch.randint(0, 200, (1, sum(lens)), generator=torch.Generator().manual_seed(3))
    labels = labels_for(ids, lens)
    ref_logits, ref_loss, _ = reference_run(reference, ids, lens, labels)
    dims = cp.ParallelDims(world_size=world, cp=world, cp_style="ulysses")
    dims.build()
    models.apply_cp(model, dims, attn=HUB)
    assert "hub" in model.config._attn_implementation and "/" not in model.config._attn_implementation
    logits, loss, _ = cp_run(model, dims, ids, lens, labels)
    assert (logits - ref_logits).abs().max() < 1e-4, (logits - ref_logits).abs().max()
    assert abs(loss - ref_loss) < 1e-5


def test_hub_kernel_is_registered_through_transformers_and_runs_under_ulysses():
    run_distributed(_hub_worker, 2)


def test_hub_kernel_refusals_name_the_cause(monkeypatch):
    from transformers.integrations import hub_kernels

    # the stand-ins below replace transformers' loader; monkeypatch puts the real one back after the test
    monkeypatch.setattr(hub_kernels, "load_and_register_attn_kernel", hub_kernels.load_and_register_attn_kernel)
    dims = cp.ParallelDims(world_size=1, cp=1, cp_style="ulysses")
    ring = cp.ParallelDims(world_size=1, cp=1, cp_style="ring")
    if not hub_kernels.is_kernels_available():  # this machine: no `kernels` package, nothing downloaded
        import models.hub_kernels as ours
        ours._LOADED.clear()
        with pytest.raises(ValueError, match="needs the `kernels` package"):
            models.apply_cp(family_model("qwen3"), dims, attn="kernels-community/flash-attn2")
    _register_stand_in()
    with pytest.raises(ValueError, match="no\\s+log-sum-exp|LSE"):
        models.apply_cp(family_model("qwen3"), ring, attn=HUB)
    _register_stand_in(fail=ValueError("connection refused"))
    with pytest.raises(ValueError, match="could not load the hub kernel.*offline.*connection refused"):
        models.apply_cp(family_model("qwen3"), dims, attn=HUB)
    if not torch.cuda.is_available():
        _register_stand_in(module_attrs={"flash_attn_varlen_func": lambda *a, **k: None})
        with pytest.raises(ValueError, match="needs a CUDA device"):
            models.apply_cp(family_model("qwen3"), dims, attn=HUB)
