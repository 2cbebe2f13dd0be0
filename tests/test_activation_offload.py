"""Activation offload (models.memory.activation_offload) against plain activation checkpointing.

    cp=1 and cp=2 (2 gloo ranks, models.apply_cp Ulysses, packed documents crossing the shard boundary),
    qwen3 (softmax attention) and qwen3_5 (Gated DeltaNet hybrid), 2 decoder layers, HF checkpointing on:
        offload on vs off    loss and every gradient bitwise equal (on CPU the offload is a copy)
        moved                exactly one tensor per layer, of the layer input's shape ([rows, S/cp, hidden]),
                             nothing else; all of them restored for the recompute
        + tiled MLP          checkpointing + offload + apply_tiled_mlp against plain checkpointing: within 1e-6
                             relative (the tiled MLP's own rounding, tests/test_tiled_mlp.py), moved unchanged
    CUDA (marked gpu):       the same equality on the device, the parked inputs in pinned host memory, and
                             device memory lower by about the layer inputs
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import models
from models.memory.activation_offload import enable_activation_offload
from models.memory.tiled_mlp import apply_tiled_mlp
from models.tiny import tiny_model
from tests.dist import run_distributed
from tests.family_sweep import cp_run
from tests.test_tiled_mlp import CP_DOCS, CP_SEQ, cp_batch  # cp=2: 31-token shards, a document crossing them

FAMILIES = ("qwen3", "qwen3_5")
LAYERS, HIDDEN = 2, 64  # qwen3_5: a Gated DeltaNet layer, then an attention layer
RTOL = 1e-6
# what trainer.modeling calls (deprecated in transformers 5.24 in favour of activation_checkpointing_enable)
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")


def _checkpointed(family: str, dims=None):
    model = tiny_model(family, num_layers=LAYERS)
    if dims is not None:
        models.apply_cp(model, dims)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _variants(model):
    """plain checkpointing, + offload, + offload and tiled MLP (tiles of 16): (models, their offloads)."""
    offloaded, tiled = copy.deepcopy(model), apply_tiled_mlp(copy.deepcopy(model), tile_tokens=16)
    return (model, offloaded, tiled), (enable_activation_offload(offloaded), enable_activation_offload(tiled))


def _step(model, ids):
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _compare(ref, offloaded, tiled) -> dict:
    """Offloaded must equal ref bitwise; tiled within RTOL (relative to the largest gradient)."""
    assert torch.equal(offloaded[0], ref[0]) and all(torch.equal(g, r) for g, r in zip(offloaded[1], ref[1]))
    scale = max(r.abs().max().item() for r in ref[1])
    return {"loss": abs((tiled[0] - ref[0]).item()) / abs(ref[0].item()),
            "grad": max((g - r).abs().max().item() for g, r in zip(tiled[1], ref[1])) / scale}


def _moved(offloads) -> list:
    return [(dict(o.moved), o.restored) for o in offloads]


@pytest.mark.parametrize("family", FAMILIES)
def test_offload_matches_checkpointing(family):
    ids = torch.randint(0, 256, (2, CP_SEQ), generator=torch.Generator().manual_seed(0))
    variants, offloads = _variants(_checkpointed(family))
    errors = _compare(*[_step(m, ids) for m in variants])
    assert all(e <= RTOL for e in errors.values()), errors
    layer_inputs = {((2, CP_SEQ, HIDDEN), torch.float32): LAYERS}
    assert _moved(offloads) == [(layer_inputs, LAYERS)] * 2


def _cp_worker(rank, world):
    dims, ids, labels = cp_batch(world)
    results = {}
    for family in FAMILIES:
        variants, offloads = _variants(_checkpointed(family, dims))
        runs = [cp_run(m, dims, ids, CP_DOCS, labels) for m in variants]
        results[family] = (_compare(*[(loss, grads) for _, loss, grads in runs]), _moved(offloads))
    return results


def test_offload_matches_checkpointing_cp2():
    results = run_distributed(_cp_worker, 2)[0]
    layer_inputs = {((1, (CP_SEQ + 1) // 2, HIDDEN), torch.float32): LAYERS}  # this rank's shard of each layer input
    for family, (errors, moved) in results.items():
        assert all(e <= RTOL for e in errors.values()), (family, errors)
        assert moved == [(layer_inputs, LAYERS)] * 2, family


def test_offload_needs_checkpointing():
    with pytest.raises(ValueError, match="no decoder layer of Qwen3ForCausalLM is checkpointed: enable activation"):
        enable_activation_offload(tiny_model("qwen3"))


def test_enable_twice_replaces_the_offload():
    model = _checkpointed("qwen3")
    first, second = enable_activation_offload(model), enable_activation_offload(model)
    _step(model, torch.randint(0, 256, (1, CP_SEQ)))
    assert first.moved == Counter() and sum(second.moved.values()) == LAYERS


@pytest.mark.gpu
def test_cuda_offload_pins_and_frees_device_memory():
    """On the device: equal to plain checkpointing; the layer inputs parked pinned; peak memory lower."""
    device = torch.device("cuda")
    hidden, seq = 1024, 4096
    plain = tiny_model("qwen3", num_layers=8, hidden_size=hidden).to(device)
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offloaded = copy.deepcopy(plain)
    offload = enable_activation_offload(offloaded)
    parked = []
    pack = offload.pack
    offload.pack = lambda t: parked.append(pack(t)) or parked[-1]  # keep the records to inspect the host copies
    ids = torch.randint(0, 256, (1, seq), device=device)
    peaks, results = [], []
    for model in (plain, offloaded):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results.append(_step(model, ids))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    torch.testing.assert_close(results[1], results[0])  # not bitwise: attention backward may use atomics
    assert len(parked) == offload.restored == 8 and all(p.host.is_pinned() and p.fetched is None for p in parked)
    layer_input = seq * hidden * 4
    assert peaks[1] <= peaks[0] - 4 * layer_input, (peaks, layer_input)  # 8 inputs parked, 1-2 in flight
