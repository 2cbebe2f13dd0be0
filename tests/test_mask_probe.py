"""HF's own mask per attention layer (models/mask_probe.py) against what CP attention applies, and the inputs
that would reshape HF's mask at call time (models/mask_inputs.py).

    PhiMoE applies its sliding window ONLY through create_sliding_window_causal_mask (no kwarg, no module
    attribute, no layer_types): before the probe CP ran it with full causal attention (loss = the model
    without its window); now the window is learned at apply_cp and the run is exact at cp=2, both styles.
    Gemma3 with use_bidirectional_attention: HF's sliding layers see a symmetric window, which no CP kernel
    applies: apply_cp refuses it.
"""

import pytest
import torch

import cp
import models
from models.mask_probe import LayerMask, band_of, probe_layer_masks
from models.tiny import tiny_model
from tests.dist import run_distributed
from tests.family_sweep import ATTENTION_STYLES, family_model, run_sweep


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
    """The sweep's phimoe+window (window 8, documents up to 30 tokens, 2 ranks): exact in both attention styles
    (and no state-passing column: PhiMoE has no recurrent mixer)."""
    results = run_sweep(["phimoe+window"], world=2)["phimoe+window"]
    assert all(results[s][0] == "exact" for s in ATTENTION_STYLES), results
    assert results["state"][0] == "refused", results


def test_apply_cp_refuses_a_mask_cp_cannot_reproduce():
    """gemma3_text+bidirectional: HF's sliding layers are |q - k| < w both ways (neither causal nor a full
    bidirectional band): refused at apply_cp, before any collective, naming the layer."""
    model = family_model("gemma3_text+bidirectional")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn.*cannot reproduce"):
        models.apply_cp(model, cp.ParallelDims(world_size=1, cp=1, cp_style="ulysses"))


def _mask_input_worker(rank, world):
    dims = cp.ParallelDims(world_size=world, cp=world, cp_style="ulysses")
    dims.build()
    model = models.apply_cp(tiny_model("qwen3"), dims)
    ids = torch.randint(3, 100, (1, 22))
    batch = cp.setup_cp_params(ids, dims, seq_lens=[[9, 13]])
    call = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=batch.params)
    refusals = {}
    for name, extra in {"token_type_ids": dict(token_type_ids=torch.ones_like(batch.input_ids)),
                        "mm_token_type_ids": dict(mm_token_type_ids=torch.ones_like(batch.input_ids)),
                        "padding mask": dict(attention_mask=torch.tensor([[1] * (batch.input_ids.shape[1] - 1) + [0]])),
                        "4D mask": dict(attention_mask=torch.ones(1, 1, 11, 11, dtype=torch.bool))}.items():
        with pytest.raises(ValueError) as err:
            model(**call, **extra)
        refusals[name] = str(err.value)
    plain = model(**call).logits
    ones = model(**call, attention_mask=torch.ones_like(batch.input_ids)).logits  # restricts nothing: accepted
    return refusals, float((plain - ones).abs().max())


def test_inputs_that_reshape_the_mask_are_refused_at_the_call():
    """HF turns token_type_ids (Gemma3 image spans), mm_token_type_ids (Gemma4) and padding masks into mask
    restrictions that CP attention (no mask function) would drop: a CP model's forward refuses them, at cp=2 on
    real ranks; a 2D mask of ones is accepted and changes nothing."""
    for refusals, diff in run_distributed(_mask_input_worker, 2):
        assert "token_type_ids" in refusals["token_type_ids"] and "model.cp=1" in refusals["token_type_ids"]
        assert "mm_token_type_ids" in refusals["mm_token_type_ids"]
        assert all("setup_cp_params" in refusals[k] for k in ("padding mask", "4D mask")), refusals
        assert diff == 0.0, diff
