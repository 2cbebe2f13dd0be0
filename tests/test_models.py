"""HF models under CP: logits, loss and every parameter's gradient at cp>1 equal the model run on
each document alone (no packing, no CP, transformers' own eager attention and torch mixers)."""

import random

import pytest
import torch

import cp
import models
from models.tiny import TINY_FAMILIES, tiny_model
from tests.dist import run_distributed
from tests.family_sweep import cp_run, labels_for, reference_run
from tests.reference import random_doc_lens

SOFTMAX = ("qwen3", "glm4_moe", "gpt_oss")
HYBRID = ("qwen3_5", "qwen3_next", "nemotron_h")
# fp32 through two layers: logits are O(1); rounding differs from the per-document run only in
# summation order (blocked attention, chunked scans), ~1e-6. A leaked or dropped key is >1e-2.
LOGITS_ATOL = 2e-5
# Parameter gradients sum over up to a few hundred tokens; scale the tolerance by the gradient's size.
GRAD_RTOL = 2e-5


def _model_worker(rank, world, family, styles, S, attn=None):
    if attn == "my_sdpa":  # a user's custom function, registered in this process
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        AttentionInterface.register("my_sdpa", sdpa_attention_forward)
    ref_model = tiny_model(family, attn="eager")
    rng = random.Random(7)
    lens = random_doc_lens(S, rng, max_len=S // 2)
    ids = torch.randint(0, ref_model.config.vocab_size, (1, S), generator=torch.Generator().manual_seed(1))
    labels = labels_for(ids, lens)
    ref_logits, ref_loss, ref_grads = reference_run(ref_model, ids, lens, labels)
    names = [n for n, _ in ref_model.named_parameters()]
    failures = []
    for style, cp_ulysses in styles:
        dims = cp.ParallelDims(world_size=world, cp=world, cp_style=style, cp_ulysses=cp_ulysses)
        dims.build()
        model = models.apply_cp(tiny_model(family), dims, attn=attn)
        logits, loss, grads = cp_run(model, dims, ids, lens, labels)
        tag = f"{family} {style}{'' if cp_ulysses is None else cp_ulysses} cp={world} docs={lens}"
        err = (logits - ref_logits).abs().max().item()
        if not err <= LOGITS_ATOL:
            failures.append(f"{tag}: logits max abs err {err:.3g} > {LOGITS_ATOL}")
        if not abs(loss - ref_loss) <= 1e-5:
            failures.append(f"{tag}: loss {loss.item():.8f} vs {ref_loss.item():.8f}")
        assert len(grads) == len(ref_grads), "apply_cp changed the parameter list"
        for name, g, r in zip(names, grads, ref_grads):
            err, scale = (g - r).abs().max().item(), max(1.0, r.abs().max().item())
            if not err <= GRAD_RTOL * scale:
                failures.append(f"{tag}: grad {name} max abs err {err:.3g} (grad max {scale:.3g})")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("family", SOFTMAX)
def test_softmax_models_match_cp1_under_every_style(family):
    run_distributed(_model_worker, 2, family, [("ulysses", None), ("ring", None), ("hybrid", 1)], 61)


@pytest.mark.parametrize("family", HYBRID)
def test_linear_attention_and_mamba_models_match_cp1_under_ulysses(family):
    run_distributed(_model_worker, 2, family, [("ulysses", None)], 61)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_5"])
def test_models_on_four_ranks(family):
    styles = [("ulysses", None)] if family == "qwen3_5" else [("ulysses", None), ("ring", None), ("hybrid", 2)]
    run_distributed(_model_worker, 4, family, styles, 90)


@pytest.mark.parametrize("family", HYBRID)
@pytest.mark.parametrize("style", ["ring", "hybrid"])
def test_ring_and_hybrid_are_rejected_for_linear_attention_and_ssm_layers(family, style):
    model = tiny_model(family)
    with pytest.raises(cp.CPConfigError, match="use cp_style=ulysses"):  # cp's terms (the trainer: model.cp_style)
        cp.assert_cp_style_supports_model(style, model)


def test_unsupported_mixer_family_is_rejected_under_every_style():
    class FalconMambaMixer(torch.nn.Module):  # a sequence mixer cptrain has no CP path for
        pass

    model = tiny_model("qwen3")
    model.model.layers[0].extra = FalconMambaMixer()
    for style in ("ulysses", "ring", "hybrid"):
        with pytest.raises(ValueError, match="no CP path"):
            cp.assert_cp_style_supports_model(style, model)


@pytest.mark.parametrize("attn,style,match", [("flex_attention", "ulysses", "BlockMask"),
                                              ("paged_attention", "ulysses", "inference-only"),
                                              ("nonsense", "ulysses", "neither a cptrain kernel"),
                                              ("flash_attention_2", "ring", "needs the flash_attn package"),
                                              ("sdpa_without_lse", "ring", "without log-sum-exp")])
def test_denied_attention_kernels_fail_at_startup(attn, style, match):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    AttentionInterface.register("sdpa_without_lse", sdpa_attention_forward)  # a user's custom function
    dims = cp.ParallelDims(world_size=1, cp=1, cp_style=style)
    with pytest.raises(ValueError, match=match):
        models.apply_cp(tiny_model("qwen3"), dims, attn=attn)


def test_any_registered_attention_function_runs_under_ulysses():
    """A function registered with transformers (here HF's own sdpa function under a custom name) is
    used as the Ulysses local kernel, with the mask cptrain builds from CPParams."""
    run_distributed(_model_worker, 2, "qwen3", [("ulysses", None)], 61, attn="my_sdpa")


def test_model_called_without_cp_params_fails_clearly():
    dims = cp.ParallelDims(world_size=1, cp=1)
    model = models.apply_cp(tiny_model("qwen3"), dims)
    with pytest.raises(ValueError, match="without cp_params"):
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_prepared_models_keep_transformers_names(family):
    """apply_cp renames nothing: state_dict keys and parameter names are the untouched model's, in order."""
    plain = tiny_model(family)
    prepared = models.apply_cp(tiny_model(family), cp.ParallelDims(world_size=1, cp=1))
    assert list(prepared.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in prepared.named_parameters()] == [n for n, _ in plain.named_parameters()]
    prepared.load_state_dict(plain.state_dict(), strict=True)  # an HF checkpoint loads as it is


@pytest.mark.parametrize("attn,expected", [("sdpa", "sdpa"), ("eager", "eager"), ("math", "sdpa")])
def test_plain_model_is_the_untouched_transformers_model(attn, expected):
    """The GRPO rollout copy and the HF export are built from models.apply.plain_model: same config, no CP
    attention, cache on; the prepared model's weights load into it by name."""
    from models.apply import plain_model
    prepared = models.apply_cp(tiny_model("qwen3_5"), cp.ParallelDims(world_size=1, cp=1), attn=attn)
    plain = plain_model(prepared)
    assert plain.config._attn_implementation == expected and plain.config.use_cache
    plain.load_state_dict(prepared.state_dict(), strict=True)
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny_model("qwen3_5", attn=expected)(input_ids=ids, use_cache=False).logits
        assert torch.allclose(plain(input_ids=ids).logits, want, atol=1e-5)
