"""State-passing CP for the recurrent mixers (model.mixer_cp=state, cp/state_passing.py), exact on packed documents.

    untouched tiny hybrid model, each document alone ──> logits, every parameter gradient   (the reference)
    models.apply_cp(copy, dims, mixer_cp="state") at world 2 and 4 (gloo), rows packed so that documents cross
    1, 2 and 3 shard boundaries, one document sits inside a shard, a document starts a shard, and the length is
    not a multiple of cp (the pad document) ──> unsharded logits, gradients summed over the CP ranks
    equal within the mixers' RTOL; and equal to mixer_cp=ulysses on the same batch.

Families: the Qwen3.5 Gated DeltaNet hybrid, NemotronH and Bamba (Mamba2). A cp larger than the linear head
count runs under state (refused under ulysses); bad input is refused at startup with the fix.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import cp
import models
from cp.collectives import count_comm
from models.tiny import tiny_config, tiny_model
from tests.dist import run_distributed
from tests.test_mamba2 import assert_close, check_packed_model, summed_over_cp

FAMILIES = ("qwen3_5", "nemotron_h", "bamba")
LENGTH = 61  # padded to 64: 32 per rank at world 2, 16 at world 4
# row 0: 40 tokens over shards 0-2 (2 boundaries at world 4), 5 inside shard 2, 16 across the last boundary;
# row 1: 3, then 55 tokens over every boundary at world 4 (3 crossings), then 3; row 2 starts a document exactly
# at a shard start (16 and 32) and ends with the pad document
SEQ_LENS = [[40, 5, 16], [3, 55, 3], [16, 16, 20, 9]]


def _model(family: str, seed: int = 3, **config_changes):
    if not config_changes:
        return tiny_model(family, num_layers=4, seed=seed)
    config = tiny_config(family, num_layers=4)
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().train()


def _batch():
    input_ids = torch.randint(0, 256, (len(SEQ_LENS), LENGTH), generator=torch.Generator().manual_seed(6))
    proj = torch.randn(len(SEQ_LENS), LENGTH, 256, generator=torch.Generator().manual_seed(7))
    return input_ids, proj


def _dims(world: int) -> cp.ParallelDims:
    dims = cp.ParallelDims(world_size=world, cp=world, cp_style="ulysses")
    dims.build()
    return dims


def _run(model, dims, input_ids, proj):
    """Logits (unsharded) and the cp-summed gradients of one forward + backward."""
    batch = cp.setup_cp_params(input_ids, dims, seq_lens=SEQ_LENS)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=batch.params,
                   use_cache=False).logits
    (logits * cp.shard(proj, batch.params)).sum().backward()
    grads = summed_over_cp({n: p.grad for n, p in model.named_parameters()}, batch.params.cp_group)
    return cp.unshard(logits.detach(), batch.params), grads


def _exact_worker(rank, world, family):
    dims = _dims(world)
    reference = _model(family)
    input_ids, proj = _batch()
    state = models.apply_cp(copy.deepcopy(reference), dims, mixer_cp="state")
    check_packed_model(state, reference, dims, input_ids, SEQ_LENS, proj, f"{family} state")
    ulysses = models.apply_cp(copy.deepcopy(reference), dims)
    state_logits, state_grads = _run(state, dims, input_ids, proj)
    ulysses_logits, ulysses_grads = _run(ulysses, dims, input_ids, proj)
    assert_close(state_logits, ulysses_logits, f"{family} state vs ulysses logits")
    for name, grad in ulysses_grads.items():
        assert_close(state_grads[name], grad, f"{family} state vs ulysses grad {name}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("world", [2, 4])
def test_state_passing_equals_each_document_alone_and_ulysses(family, world):
    run_distributed(_exact_worker, world, family)


SHORT_LENGTH = 8  # 2 tokens per rank at world 4: less than the conv's K - 1 = 3, so a halo spans 2 earlier shards
SHORT_SEQ_LENS = [[3, 5], [1, 2, 5]]  # boundaries at 3, and at 1 and 3: strictly inside the halos of ranks 1 and 2


def _short_shard_worker(rank, world, family):
    """The conv halo's multi-shard branch (ShardChain.with_halo: a shard shorter than K - 1, zeros before position
    0) with document boundaries strictly inside a halo: exact against each document alone, forward and backward."""
    dims = _dims(world)
    reference = _model(family)
    input_ids = torch.randint(0, 256, (len(SHORT_SEQ_LENS), SHORT_LENGTH), generator=torch.Generator().manual_seed(8))
    proj = torch.randn(len(SHORT_SEQ_LENS), SHORT_LENGTH, 256, generator=torch.Generator().manual_seed(9))
    state = models.apply_cp(copy.deepcopy(reference), dims, mixer_cp="state")
    check_packed_model(state, reference, dims, input_ids, SHORT_SEQ_LENS, proj, f"{family} state, 2-token shards")


@pytest.mark.parametrize("family", ["qwen3_5", "nemotron_h"])
def test_a_shard_shorter_than_the_conv_halo_with_boundaries_inside_it(family):
    run_distributed(_short_shard_worker, 4, family)


def _more_ranks_than_heads_worker(rank, world):
    dims = _dims(world)
    reference = _model("qwen3_5", linear_num_value_heads=2, linear_num_key_heads=1)
    with pytest.raises(ValueError, match="set model.cp .* to a divisor of 2"):
        models.apply_cp(copy.deepcopy(reference), dims)
    input_ids, proj = _batch()
    state = models.apply_cp(copy.deepcopy(reference), dims, mixer_cp="state")
    check_packed_model(state, reference, dims, input_ids, SEQ_LENS, proj, "qwen3_5 2 linear heads at cp=4")


def test_a_cp_larger_than_the_linear_heads_runs_under_state():
    run_distributed(_more_ranks_than_heads_worker, 4)


def _bytes_worker(rank, world):
    """The state path's all-gathers carry exactly the shard summaries and the conv halos (attention layers send
    all-to-alls only), and its backward returns them through all-to-alls."""
    dims = _dims(world)
    model = models.apply_cp(_model("qwen3_5"), dims, mixer_cp="state")
    input_ids, proj = _batch()
    batch = cp.setup_cp_params(input_ids, dims, seq_lens=SEQ_LENS)
    with count_comm() as counter:
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=batch.params,
                       use_cache=False).logits
        forward_all_to_all = counter.bytes["all_to_all"]
        (logits * cp.shard(proj, batch.params)).sum().backward()
    rows, mixers, floats = len(SEQ_LENS), 3, 4  # 3 Gated DeltaNet layers; float32
    summaries = (world - 1) * rows * 4 * 16 * (16 + 16) * floats  # value heads x Dk x (Dk + Dv) per row
    halos = (world - 1) * rows * 3 * (2 * 2 * 16 + 4 * 16) * floats  # kernel-1 tokens x conv channels per row
    assert counter.bytes["all_gather"] == mixers * (summaries + halos)
    assert counter.bytes["all_to_all"] - 2 * forward_all_to_all == mixers * (summaries + halos)  # + attention's


def test_state_passing_sends_the_summaries_and_halos_it_should():
    run_distributed(_bytes_worker, 2)


@pytest.mark.parametrize("overrides,match", [
    ({"family": "qwen3"}, "has no Gated DeltaNet or Mamba2 mixer: use mixer_cp=ulysses"),
    ({"mixer_cp": "scan"}, r"mixer_cp='scan': use one of \['ulysses', 'state'\]"),
    ({"style": "ring"}, "use cp_style=ulysses"),
])
def test_bad_state_settings_are_refused_at_startup(overrides, match):
    model = tiny_model(overrides.get("family", "qwen3_5"), num_layers=4)
    dims = cp.ParallelDims(world_size=2, cp=2, cp_style=overrides.get("style", "ulysses"))
    with pytest.raises(ValueError, match=match):
        models.apply_cp(model, dims, mixer_cp=overrides.get("mixer_cp", "state"))
