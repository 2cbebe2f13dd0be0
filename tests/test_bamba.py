"""Bamba (hybrid attention + Mamba2, BambaForCausalLM) under Ulysses CP: the third mixer family, added
as one file (models/mixers/bamba.py) plus one registry line (models/mixers/registry.py).

    untouched tiny Bamba, each document alone ──> logits, loss gradients   (the reference)
    models.apply_cp(copy, dims) at world 2 (gloo), the documents packed into rows so that some
    cross the shard boundary ──> unsharded logits, gradients summed over the CP ranks
    equal within RTOL (float32 rounding of the chunked scan / conv against HF's torch path), under
    the HF parameter names (apply_cp renames nothing).

Plus the registry itself: every family reaches cp.validation, apply_cp wraps what a spec matches,
ring / hybrid are refused, and a mixer without the Mamba2 layout is refused rather than run wrong.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

import cp
import models
from cp import validation
from models.mixers.bamba import SPEC as BAMBA
from models.mixers.mamba2 import UlyssesMamba2Mixer, check_mamba2_layout
from models.mixers.registry import MIXER_FAMILIES, spec_of
from models.mixers.spec import MixerSpec
from models.tiny import tiny_model
from tests.dist import run_distributed
from tests.reference import random_doc_lens
from tests.test_mamba2 import check_packed_model, crosses_a_shard


def _bamba(seed: int = 0):
    return tiny_model("bamba", num_layers=4, seed=seed)  # 3 Mamba2 layers, then attention


def test_every_family_is_registered_with_cp_and_matched_by_its_spec():
    for spec in MIXER_FAMILIES:
        for name in [*spec.class_names, spec.wrapper.__name__]:
            assert name in validation.SUPPORTED_SEQUENCE_MIXERS, name
            assert validation.MIXER_CP_STYLES[name] == ("ulysses",), name
    model = _bamba()
    mixers = [m for m in model.modules() if type(m).__name__ == "BambaMixer"]
    assert len(mixers) == 3 and all(spec_of(m) is BAMBA for m in mixers)
    models.apply_cp(model, cp.ParallelDims(world_size=1, cp=1))
    wrapped = [m for m in model.modules() if isinstance(m, UlyssesMamba2Mixer)]
    assert len(wrapped) == 3 and all(type(m._original).__name__ == "BambaMixer" for m in wrapped)
    assert spec_of(wrapped[0]) is None  # a wrapper is not wrapped again


def test_a_spec_naming_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="not models.mixers.fused_kernels ops"):
        MixerSpec(name="x", class_names={"XMixer": "x"}, wrapper=UlyssesMamba2Mixer, wrap=lambda m, d: m,
                  kernels=("no_such_scan",))


@pytest.mark.parametrize("style,dims", [("ring", {"cp": 2}), ("hybrid", {"cp": 4, "cp_ulysses": 2})])
def test_ring_and_hybrid_are_refused(style, dims):
    with pytest.raises(ValueError, match=r"\(Bamba Mamba2 \(SSM\) at model.layers.0.mamba\).*use cp_style=ulysses"):
        models.apply_cp(_bamba(), cp.ParallelDims(world_size=dims["cp"], cp_style=style, **dims))


def test_a_mixer_without_the_mamba2_layout_is_refused():
    mixer = _bamba().model.layers[0].mamba
    mixer.in_proj = torch.nn.Linear(mixer.hidden_size, mixer.in_proj.out_features + 2, bias=False)  # a d_mlp part
    with pytest.raises(ValueError, match="not the Mamba2 layout"):
        check_mamba2_layout(mixer)
    with pytest.raises(ValueError, match="not the Mamba2 layout"):
        BAMBA.wrap(mixer, None)


def _world2_worker(rank, world):
    dims = cp.ParallelDims(world_size=world, cp=world, cp_style="ulysses")
    dims.build()
    reference = _bamba(seed=5)
    model = models.apply_cp(copy.deepcopy(reference), dims)
    rows, length = 2, 53
    rng = random.Random(3)
    seq_lens = [[9, 1, 30, 13], random_doc_lens(length, rng)]
    input_ids = torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(6))
    proj = torch.randn(rows, length, 256, generator=torch.Generator().manual_seed(7))
    padded_len = cp.setup_cp_params(input_ids, dims, seq_lens=seq_lens).params.padded_len
    assert crosses_a_shard(seq_lens, padded_len, dims.cp), f"no document crosses a shard: {seq_lens}"
    ref_grads = check_packed_model(model, reference, dims, input_ids, seq_lens, proj, "bamba")
    assert any(".mamba." in name for name in ref_grads)


def test_packed_documents_crossing_shards_match_each_document_alone_world2():
    run_distributed(_world2_worker, 2)
