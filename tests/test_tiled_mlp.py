"""Tiled MLP (models.memory.tiled_mlp) against the untouched MLP, forward and backward.

    cp=1, every tiny family   plain copy vs apply_tiled_mlp copy, 2 rows x 61 tokens, tiles of 16 (122 tokens:
    (+ a NemotronH MoE):      7 full tiles and one of 10); MoE families with output_router_logits=True, so
                              the aux loss trains the router through the recorded (tiled) router logits
    cp=2 (2 gloo ranks):      qwen3 (softmax attention) and qwen3_5 (Gated DeltaNet hybrid) under models.apply_cp
                              (Ulysses), packed documents crossing the shard boundary, 31-token shards in tiles
                              of 16; then both copies under FSDP2 (fully_shard per decoder layer, dp_cp mesh):
                              the gradients FSDP reduce-scatters from the tiled backward
    refusals, tile sizes, dropout and autocast replayed in the recompute, and the peak-memory drop at S=4096

Tolerance: fp32. With one thread (the cp=2 ranks) and tiles of a multiple of 16 rows a dense MLP's forward is
bitwise here (the CPU GEMM's row blocking); with two threads, other tiles or an MoE (grouped_mm over fewer tokens
per expert) logits differ by <= 4e-7 relative. Parameter gradients are sums over tiles instead of one reduction
over all tokens: <= 6.4e-7 relative per MLP parameter. Upstream parameters see the forward's rounding through the
network: up to 4e-6 relative to their own largest gradient (GDN's A_log / dt_bias: small gradients with
cancellation), <= 3e-7 relative to the model's largest gradient. Asserted: logits and loss 1e-6 relative, every
MLP parameter 1e-6 relative to its own largest gradient, every other parameter 1e-6 relative to the model's
largest gradient.
"""

from __future__ import annotations

import copy
import re
from types import MethodType

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM, NemotronHConfig, Qwen3Config, SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

import cp
import models
from models.memory.tiled_mlp import MIN_TILE_TOKENS, TiledForward, apply_tiled_mlp, auto_tile_tokens, decoder_mlps
from models.tiny import tiny_model
from scripts.bench.measure import PeakMemory
from tests.dist import run_distributed
from tests.family_sweep import cp_run, labels_for

RTOL = 1e-6
TILE = 16
FAMILIES = ("qwen3", "glm4_moe", "gpt_oss", "qwen3_5", "qwen3_next", "nemotron_h", "nemotron_h+moe")
MOE = ("glm4_moe", "gpt_oss", "qwen3_next", "nemotron_h+moe")
CP_FAMILIES = ("qwen3", "qwen3_5")
CP_SEQ, CP_DOCS = 61, [20, 25, 16]  # padded to 62: shards of 31; document 2 (tokens 20-44) crosses the boundary


def _model(family: str):
    """The tiny model of `family`; "nemotron_h+moe": NemotronH blocks mamba, attention, moe, mlp (the tiny
    config has no MoE block), router weights scaled up so routing is decisive."""
    if family != "nemotron_h+moe":
        return tiny_model(family)
    config = NemotronHConfig(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             layers_block_type=["mamba", "attention", "moe", "mlp"], mamba_num_heads=4,
                             mamba_head_dim=16, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=16,
                             intermediate_size=96, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().train()
    nn.init.normal_(model.model.layers[2].mixer.gate.weight, std=0.5)
    return model


def _mlp_names(model) -> set[str]:
    return {f"{path}.{name}" for path, mlp in decoder_mlps(model) for name, _ in mlp.named_parameters()}


def _step(model, ids, moe: bool):
    """Logits, loss (+ the router aux loss for MoE), every parameter gradient, the recorded router logits."""
    out = model(input_ids=ids, labels=ids, use_cache=False, output_router_logits=moe or None)
    loss = out.loss + (0.1 * out.aux_loss if getattr(out, "aux_loss", None) is not None else 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), loss.detach(), grads, getattr(out, "router_logits", None)


def _errors(ref, got, mlp_names: set[str]) -> dict:
    """Relative errors of (logits, loss, grads) `got` against `ref`: per MLP parameter (its own scale) and for all
    parameters (the model's largest gradient)."""
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = ref[:3], got[:3]
    assert set(grads) == set(ref_grads), f"gradients for different parameters: {set(grads) ^ set(ref_grads)}"
    scale = max(g.abs().max().item() for g in ref_grads.values())
    errs = {n: (grads[n] - g).abs().max().item() for n, g in ref_grads.items()}
    return {"logits": ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item(),
            "loss": abs((loss - ref_loss).item()) / abs(ref_loss.item()),
            "mlp_grad": max(errs[n] / ref_grads[n].abs().max().item() for n in mlp_names if n in ref_grads),
            "grad": max(errs.values()) / scale}


def _assert_within(name: str, errors: dict) -> None:
    worst = {k: v for k, v in errors.items() if not v <= RTOL}
    assert not worst, f"{name}: relative errors {worst} > {RTOL} (all: {errors})"


@pytest.mark.parametrize("family", FAMILIES)
def test_tiled_matches_plain(family):
    plain = _model(family)
    tiled = apply_tiled_mlp(copy.deepcopy(plain), tile_tokens=TILE)
    assert list(tiled.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 256, (2, 61), generator=torch.Generator().manual_seed(0))
    ref, got = _step(plain, ids, family in MOE), _step(tiled, ids, family in MOE)
    _assert_within(family, _errors(ref, got, _mlp_names(plain)))
    if family in MOE:  # one [N, E] tensor per MoE layer, as untiled, in token order
        assert [r.shape for r in got[3]] == [r.shape for r in ref[3]]
        assert all((g - r).abs().max() <= RTOL * r.abs().max() for g, r in zip(got[3], ref[3]))


def _fsdp(model, dims):
    """FSDP2 as the trainer shards: each decoder layer, then the root, over dp_cp; gradients summed."""
    from torch.distributed.fsdp import fully_shard

    for module in [*model.model.layers, model]:
        fully_shard(module, mesh=dims.dp_cp_mesh)
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return model


def _fsdp_run(model, dims, ids, lens, labels):
    """cp_run's loss and gradients with FSDP2 doing the gradient reduction (full gradients gathered back)."""
    batch = cp.setup_cp_params(ids, dims, labels=labels, seq_lens=[lens])
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=batch.params).logits
    count = (batch.labels != -100).sum()
    dist.all_reduce(count, group=batch.params.cp_group)
    loss = torch.nn.functional.cross_entropy(logits[0], batch.labels[0], ignore_index=-100, reduction="sum") / count
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=batch.params.cp_group)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    return cp.unshard(logits.detach(), batch.params), total, grads


def cp_batch(world: int):
    """(dims, ids, labels) in a cp=world rank: a Ulysses group over all ranks and one packed row of CP_SEQ tokens
    (documents CP_DOCS); transformers' logging quieted."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dims = cp.ParallelDims(world_size=world, cp=world, cp_style="ulysses")
    dims.build()
    ids = torch.randint(0, 256, (1, CP_SEQ), generator=torch.Generator().manual_seed(1))
    return dims, ids, labels_for(ids, CP_DOCS)


def _cp_worker(rank, world):
    dims, ids, labels = cp_batch(world)
    errors = {}
    for family in CP_FAMILIES:
        plain = models.apply_cp(tiny_model(family), dims)
        tiled = apply_tiled_mlp(copy.deepcopy(plain), tile_tokens=TILE)
        names, mlp_names = [n for n, _ in plain.named_parameters()], _mlp_names(plain)
        sharded = [_fsdp(copy.deepcopy(m), dims) for m in (plain, tiled)]
        runs = [cp_run(m, dims, ids, CP_DOCS, labels) for m in (plain, tiled)]
        ref, got = [(logits, loss, dict(zip(names, grads))) for logits, loss, grads in runs]
        errors[family] = _errors(ref, got, mlp_names)
        ref, got = [_fsdp_run(m, dims, ids, CP_DOCS, labels) for m in sharded]
        errors[f"{family} fsdp2"] = _errors(ref, got, mlp_names)
    return errors


def test_tiled_matches_plain_cp2():
    errors = run_distributed(_cp_worker, 2)[0]
    for name, errs in errors.items():
        _assert_within(f"{name} cp=2", errs)


class _AuxGate(nn.Module):
    """DeepSeek remote-code style gate: a load-balancing loss over the call's tokens inside forward."""

    def __init__(self):
        super().__init__()
        self.alpha, self.seq_aux = 0.001, True

    def forward(self, x):
        return x


class _SequenceStatistic(nn.Module):
    """Returns a scalar computed over all the tokens of the call next to the hidden states."""

    def forward(self, x):
        return x * 2, x.mean()


def _switch_mlp():
    """transformers' Switch Transformers MoE: top-1 routing with an expert capacity."""
    return SwitchTransformersSparseMLP(SwitchTransformersConfig(d_model=64, d_ff=32, num_experts=4, expert_capacity=8))


@pytest.mark.parametrize("replacement, words", [
    (_switch_mlp, "model.layers.0.mlp.router (SwitchTransformersTop1Router) is not per-token: expert_capacity=8"),
    (lambda: nn.Sequential(nn.Linear(64, 64), _AuxGate()), "model.layers.0.mlp.1 (_AuxGate) is not per-token: alpha="),
])
def test_not_per_token_mlp_refused(replacement, words):
    model = tiny_model("qwen3")
    model.model.layers[0].mlp = replacement()
    with pytest.raises(ValueError, match=re.escape(words)):
        apply_tiled_mlp(model, tile_tokens=TILE)
    assert "forward" not in vars(model.model.layers[1].mlp), "a refused model must be left untouched"


def test_sequence_statistic_refused_at_call():
    model = tiny_model("qwen3")
    model.model.layers[0].mlp = _SequenceStatistic()
    apply_tiled_mlp(model, tile_tokens=TILE)
    with pytest.raises(ValueError, match=r"output 1 is \(\) for a tile of 16 tokens: not per-token"):
        model.model.layers[0].mlp(torch.randn(1, 40, 64))


@pytest.mark.parametrize("tile_tokens", [0, -8])
def test_tile_tokens_must_be_positive(tile_tokens):
    with pytest.raises(ValueError, match=f"tile_tokens={tile_tokens}: pass a positive number of tokens per tile"):
        apply_tiled_mlp(tiny_model("qwen3"), tile_tokens=tile_tokens)


def test_auto_tile_tokens():
    assert auto_tile_tokens(4096, 256, 4096) == MIN_TILE_TOKENS  # 16 tiles of 256
    assert auto_tile_tokens(8192, 4096, 12288) == 2731  # 3 tiles: a tile's intermediate ~ the layer input
    assert auto_tile_tokens(100, 64, 128) == MIN_TILE_TOKENS  # short inputs: one tile, the untouched forward


def test_dropout_replayed_in_recompute():
    """The recompute sees the forward's dropout mask: dx = (mask * 2 * dy) @ W with mask read from y."""
    torch.manual_seed(0)
    linear = nn.Linear(8, 8, bias=False)
    mlp = nn.Sequential(linear, nn.Dropout(0.5)).train()
    mlp.forward = MethodType(TiledForward(5, None), mlp)
    x = torch.randn(2, 13, 8, requires_grad=True)
    dy = torch.randn(2, 13, 8)
    y = mlp(x)
    y.backward(dy)
    kept = (y != 0).float() * 2.0
    torch.testing.assert_close(x.grad, (kept * dy) @ linear.weight, rtol=0, atol=1e-6)


class _AutocastProbe(nn.Linear):
    """A Linear that records whether CPU autocast was on for each call."""

    def forward(self, x):
        self.calls.append(torch.is_autocast_enabled("cpu"))
        return super().forward(x)


def test_autocast_replayed_in_recompute():
    """A forward under autocast is recomputed under autocast (bf16 matmuls in backward too)."""
    probe = _AutocastProbe(8, 8)
    probe.calls = []
    mlp = nn.Sequential(probe)
    mlp.forward = MethodType(TiledForward(5, None), mlp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(torch.randn(1, 13, 8, requires_grad=True))
    y.float().sum().backward()
    assert probe.calls == [True] * 6  # 3 tiles forward, 3 recomputed


def test_tiled_mlp_lowers_peak_memory():
    """hidden 256, intermediate 4096, S=4096, one layer: the untiled MLP keeps 4 [S, 4096] fp32 activations
    (256 MiB) for backward; tiles of 256 tokens keep none. Measured 442 MiB -> 111 MiB."""
    config = Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=4096, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().train()
    tiled = apply_tiled_mlp(copy.deepcopy(plain))
    ids = torch.randint(0, 256, (1, 4096))
    peaks = {}
    for name, model in (("plain", plain), ("tiled", tiled)):
        with PeakMemory(torch.device("cpu")) as peak:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        peaks[name] = peak.bytes
    assert peaks["tiled"] < peaks["plain"] / 2, peaks
