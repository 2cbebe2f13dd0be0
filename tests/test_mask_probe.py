"""HF's own mask per attention layer (models/mask_probe.py) against what CP attention applies.

    PhiMoE applies its sliding window ONLY through create_sliding_window_causal_mask (no kwarg, no module
    attribute, no layer_types): before the probe CP ran it with full causal attention (loss = the model
    without its window); now the window is learned at apply_cp and the run is exact at cp=2, both styles.
"""

import torch

from models.mask_probe import LayerMask, band_of, probe_layer_masks
from tests.family_sweep import STYLES, run_sweep


def _band(length, window):
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    return (k <= q) & ((q - k < window) if window else True)


def test_band_of_reads_causal_windows_and_refuses_other_masks():
    assert band_of(_band(12, None)) == LayerMask(True, None)
    assert band_of(_band(12, 4)) == LayerMask(True, 4)
    assert band_of(torch.ones(12, 12, dtype=torch.bool)) == LayerMask(False, None)
    chunked = (torch.arange(12)[:, None] // 4 == torch.arange(12)[None, :] // 4) & _band(12, None)
    assert not band_of(chunked).expressible


def test_phimoe_window_only_in_the_mask_is_learned():
    from transformers import PhimoeConfig, PhimoeForCausalLM

    config = PhimoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, sliding_window=24,
                          router_jitter_noise=0.0)
    probed = probe_layer_masks(PhimoeForCausalLM(config))
    assert probed and all(hf == LayerMask(True, 24) and ours == LayerMask(True, None) for hf, ours in probed.values())


def test_phimoe_with_a_window_is_exact_under_cp():
    """The sweep's phimoe+window (window 8, documents up to 30 tokens, 2 ranks): exact in both styles."""
    results = run_sweep(["phimoe+window"], world=2)["phimoe+window"]
    assert all(results[s][0] == "exact" for s in STYLES), results
