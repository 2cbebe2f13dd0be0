"""The family sweep: every causal-LM family transformers ships is exact under CP (packed, 2 ranks, ulysses,
ring, and ulysses with state-passing mixers) against each document run alone through the untouched model, or
refused by models.apply_cp with a message. One family per attention trait runs in the default selection; the
rest of the sweep is marked slow (it still runs in `.ci/run`; `-m "not slow"` skips it locally).
docs/support_matrix.md is generated from the same sweep: python scripts/family_sweep.py
"""

from pathlib import Path

import pytest

from models.tiny.family_configs import causal_lm_families
from tests.family_sweep import STYLES, matrix_outcomes, run_sweep, variants

MATRIX = Path(__file__).resolve().parent.parent / "docs" / "support_matrix.md"

# One family (or variant) per trait, with the outcome each column must have (ulysses, ring, state: only the
# families with recurrent mixers have a state-passing path; the rest refuse model.mixer_cp=state).
TRAIT_FAMILIES = {
    "llama": ("exact", "exact", "refused"),  # plain RoPE + GQA
    "mistral": ("exact", "exact", "refused"),  # window passed as a kwarg on every layer
    "qwen2_moe+window": ("exact", "exact", "refused"),  # window on module / config only (use_sliding_window,
    #                                                    max_window_layers)
    "exaone4": ("exact", "exact", "refused"),  # module.sliding_window on every layer, kwarg None on full layers
    "gemma2": ("exact", "exact", "refused"),  # attention logit softcap (+ alternating windows)
    "gpt_oss": ("exact", "exact", "refused"),  # sinks (s_aux) + windows
    "gemma3_text": ("exact", "exact", "refused"),  # RoPE per layer type (local / global) + windows + q/k norms
    "bert": ("exact", "exact", "refused"),  # non-causal attention (module.is_causal False)
    "deepseek_v3": ("exact", "exact", "refused"),  # MLA: value head dim != query/key head dim
    "qwen3_next": ("exact", "refused", "exact"),  # linear attention: Ulysses only
    "llama+dynamic_rope": ("refused", "refused", "refused"),  # RoPE frequencies from the sequence length
    "phi3+longrope": ("refused", "refused", "refused"),
    "roberta": ("refused", "refused", "refused"),  # position ids derived from input_ids (padding offset)
    "stablelm": ("refused", "refused", "refused"),  # kwargs not passed down to attention
    "doge": ("refused", "refused", "refused"),  # dynamic mask built inside attention
    "gemma3_text+bidirectional": ("refused", "refused", "refused"),  # HF's mask: symmetric windows (mask_probe)
}
REFUSAL_WORDS = {"llama+dynamic_rope": "RoPE type", "phi3+longrope": "RoPE type", "roberta": "position ids",
                 "stablelm": "kwargs", "doge": "dynamic mask", "qwen3_next": "cp_style=ulysses",
                 "gemma3_text+bidirectional": "cannot reproduce"}
SWEEP_REST = [f for f in [*causal_lm_families(), *variants()] if f not in TRAIT_FAMILIES]


@pytest.fixture(scope="module")
def trait_results():
    return run_sweep(list(TRAIT_FAMILIES))


@pytest.fixture(scope="module")
def sweep_results():
    return run_sweep(SWEEP_REST)


def _assert_exact_or_refused(family, entry):
    documented = matrix_outcomes(MATRIX.read_text()).get(family)
    found = "not_tiny" if "not_tiny" in entry else tuple(entry[style][0] for style in STYLES)
    assert documented == found, (f"{family}: docs/support_matrix.md says {documented}, the sweep finds {found}: "
                                 "regenerate it with python scripts/family_sweep.py")
    if "not_tiny" in entry:
        assert entry["not_tiny"], f"{family}: listed as not buildable without a reason"
        return
    for style in STYLES:
        outcome, detail = entry[style]
        assert outcome in ("exact", "refused"), f"{family} {style}: {outcome}: {detail}"
        assert detail, f"{family} {style}: {outcome} without a message"


@pytest.mark.parametrize("family", list(TRAIT_FAMILIES))
def test_trait_family_is_exact_or_refused(trait_results, family):
    entry = trait_results[family]
    assert "not_tiny" not in entry, f"{family} must build tiny: {entry.get('not_tiny')}"
    _assert_exact_or_refused(family, entry)
    got = tuple(entry[style][0] for style in STYLES)
    assert got == TRAIT_FAMILIES[family], f"{family}: {dict(zip(STYLES, got))}, expected {TRAIT_FAMILIES[family]}"
    if family in REFUSAL_WORDS:
        refused = [entry[s][1] for s in ("ulysses", "ring") if entry[s][0] == "refused"]
        assert all(REFUSAL_WORDS[family] in msg for msg in refused), refused
    if entry["state"][0] == "refused":
        assert "use mixer_cp=ulysses" in entry["state"][1], entry["state"][1]


@pytest.mark.slow
@pytest.mark.parametrize("family", SWEEP_REST)
def test_every_family_is_exact_or_refused(sweep_results, family):
    _assert_exact_or_refused(family, sweep_results[family])
