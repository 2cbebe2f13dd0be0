"""CP styles as registry entries (cp/styles.py): what each entry says, that a new entry runs through every
layer (ParallelDims, setup_cp_params, validation, the model's attention) exactly, the one `kernel=` keyword,
Ulysses' head chunks as a model option, and cp's errors re-raised by the trainer in its config keys."""

import copy
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import cp
import models
from models.tiny import tiny_model
from tests.dist import run_distributed
from tests.family_sweep import compare, cp_run, family_model, labels_for, reference_run, sweep_family
from tests.reference import random_doc_lens
from trainer import config

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def test_registry_describes_every_style():
    rows = {name: (s.levels, s.default_layout, s.kernel_kind, s.recurrent_mixers, s.options)
            for name, s in cp.CP_STYLES.items()}
    assert rows == {"ulysses": (("ulysses",), "contiguous", "local", True, ("chunks",)),
                    "ring": (("ring",), "zigzag", "block", False, ()),
                    "hybrid": (("ring", "ulysses"), "zigzag", "block", False, ())}
    assert cp.CP_STYLES["ring"].attention is cp.ring_attention
    assert cp.get_style("hybrid").shard_levels("zigzag", 2, 3) == [("zigzag", 2), ("contiguous", 3)]
    assert cp.get_style("hybrid").degrees(8, 2) == (4, 2)
    assert cp.get_style("ulysses").degrees(4) == (1, 4) and cp.get_style("ring").degrees(4) == (4, 1)
    with pytest.raises(ValueError, match="levels"):
        cp.CPStyle(name="bad", levels=("ulysses", "ring"), default_layout="zigzag", attention=cp.ring_attention,
                   kernel_kind="block", recurrent_mixers=False)


def _new_style_worker(rank, world):
    """A fourth style, added as one registry entry: the ring over contiguous shards (no zigzag)."""
    cp.register_cp_style(cp.CPStyle(name="ring_contiguous", levels=("ring",), default_layout="contiguous",
                                    attention=cp.ring_attention, kernel_kind="block", recurrent_mixers=False))
    dims = cp.ParallelDims(world_size=world, cp=world, cp_style="ring_contiguous")
    dims.build()
    assert (dims.ring, dims.ulysses) == (world, 1)
    params = cp.setup_cp_params(torch.zeros(1, 16, dtype=torch.long), dims).params
    assert params.layout == "contiguous"
    assert params.local_index.tolist() == list(range(rank * 16 // world, (rank + 1) * 16 // world))
    outcome = sweep_family("qwen3", {"ring_contiguous": dims})["ring_contiguous"]
    assert outcome[0] == "exact", outcome
    with pytest.raises(cp.CPConfigError, match="use cp_style=ulysses"):  # recurrent_mixers=False: refused
        cp.assert_cp_style_supports_model("ring_contiguous", tiny_model("qwen3_5"))


def test_a_style_added_as_one_registry_entry_is_exact_end_to_end():
    run_distributed(_new_style_worker, 2)


def test_one_kernel_keyword_on_every_attention_function_and_attn_fn_deprecated():
    params = cp.setup_cp_params(torch.zeros(1, 12, dtype=torch.long), seq_lens=[[5, 7]]).params
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 12, 4, 8, generator=gen), *torch.randn(2, 1, 12, 2, 8, generator=gen)
    outs = {name: style.attention(q, k, v, params, kernel="math")  # "math": a local and a block kernel name
            for name, style in cp.CP_STYLES.items()}
    assert torch.allclose(outs["ulysses"], outs["ring"], atol=1e-6)
    assert torch.allclose(outs["ring"], outs["hybrid"], atol=1e-6)
    with pytest.warns(DeprecationWarning, match="kernel="):
        old = cp.ulysses_attention(q, k, v, params, attn_fn="math")
    assert torch.equal(old, outs["ulysses"])


def _chunks_worker(rank, world):
    """model.ulysses_chunks through apply_cp: the same logits, loss and gradients as chunks=1 (and the
    per-document reference), on a GQA model (4 heads, 2 KV heads) at cp=2."""
    dims = cp.ParallelDims(world_size=world, cp=world)
    dims.build()
    reference = family_model("qwen3")
    lens = random_doc_lens(61, random.Random(3), max_len=30)
    ids = torch.randint(0, reference.config.vocab_size, (1, 61), generator=torch.Generator().manual_seed(2))
    labels = labels_for(ids, lens)
    names = [n for n, _ in reference.named_parameters()]
    runs = {}
    for chunks in (1, 2):
        model = models.apply_cp(copy.deepcopy(reference), dims, attn="math", chunks=chunks)
        assert model.config._attn_implementation == ("cptrain_cp_math" if chunks == 1 else "cptrain_cp_math_chunks2")
        runs[chunks] = cp_run(model, dims, ids, lens, labels)
    ref = reference_run(reference, ids, lens, labels)
    assert not compare(ref, runs[2], names), compare(ref, runs[2], names)
    (logits1, loss1, grads1), (logits2, loss2, grads2) = runs[1], runs[2]
    assert torch.equal(logits1, logits2) and torch.equal(loss1, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))


def test_ulysses_chunks_model_option_gives_identical_numbers():
    run_distributed(_chunks_worker, 2)


def test_ulysses_chunks_refused_at_startup_with_the_fix():
    with pytest.raises(cp.CPConfigError, match="cp_style=ulysses") as info:
        models.apply_cp(tiny_model("qwen3"), cp.ParallelDims(world_size=1, cp=1, cp_style="ring"), chunks=2)
    assert "chunks" in info.value.names
    with pytest.raises(cp.CPConfigError, match="between 1 and the number of KV heads"):
        models.apply_cp(tiny_model("qwen3"), cp.ParallelDims(world_size=1, cp=1), chunks=3)


def _compose(*overrides):
    config.register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="sft", overrides=list(overrides))


@pytest.mark.parametrize("overrides,world,message", [
    (["model.cp=3"], 4, "model.cp=3 does not divide the world size 4: launch a multiple of 3 ranks or change model.cp"),
    (["model.cp_style=stripes"], 2, "unknown model.cp_style='stripes'"),
    (["model.cp=4", "model.cp_style=hybrid"], 4, "model.cp_style=hybrid needs model.cp_ulysses"),
    (["model.cp_style=ring", "model.cp_ulysses=2"], 2, "model.cp_ulysses is only used with model.cp_style=hybrid"),
    (["model.ulysses_chunks=0"], 2, "model.ulysses_chunks=0 must be >= 1"),
])
def test_trainer_reraises_cp_errors_in_its_config_keys(overrides, world, message):
    with pytest.raises(ValueError) as info:
        config.validate_sft(_compose(*overrides), world)
    assert message in str(info.value)


def test_config_terms_translate_only_the_named_arguments():
    error = cp.CPConfigError("chunks=3 leaves fewer query heads in a head group than the 4 Ulysses ranks: lower "
                             "chunks (cp=4)", "chunks")
    with pytest.raises(ValueError) as info, config.cp_errors_in_config_terms():
        raise error
    assert str(info.value) == ("model.ulysses_chunks=3 leaves fewer query heads in a head group than the 4 Ulysses "
                               "ranks: lower model.ulysses_chunks (cp=4)")
    assert info.value.__cause__ is error
