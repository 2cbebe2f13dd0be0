"""Gated DeltaNet: varlen kernels and the Ulysses wrapper against transformers run one document at a time.

The reference never sees packing: transformers' own module (or its torch recurrence) runs on each
document as its own unpadded sequence and the results are concatenated. Our paths see packed rows,
sharded over real gloo ranks, and must match forward and backward (input and parameter gradients,
the latter summed over the cp group as a training step would).

Tolerance: everything runs in float32 and transformers' functions cast to float32 themselves, so no
float64 reference exists. Both sides sum the same terms in different orders (chunk solves vs a token
loop, matmuls over a shard vs the full sequence); measured errors are ~1e-7 relative, so
FP32_RTOL = 2e-5 (relative to the largest reference value) leaves ample room while a leaked state or
conv tap across a document moves values by >1e-2.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig, Qwen3NextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import (Qwen3_5GatedDeltaNet, causal_conv1d_fn,
                                                          torch_chunk_gated_delta_rule,
                                                          torch_recurrent_gated_delta_rule)
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

import cp
from models.mixers.gated_deltanet import (UlyssesGatedDeltaNet, is_gated_deltanet, varlen_gated_delta_rule,
                                   wrap_gated_deltanet)
from models.mixers.varlen_ops import doc_ids_from_seq_lens, varlen_causal_conv1d
from tests.dist import run_distributed

FP32_RTOL = 2e-5
HIDDEN = 64
FAMILIES = {"qwen3_5": (Qwen3_5TextConfig, Qwen3_5GatedDeltaNet),
            "qwen3_next": (Qwen3NextConfig, Qwen3NextGatedDeltaNet)}


# -- helpers --------------------------------------------------------------------------------------


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = FP32_RTOL) -> float:
    """max |got - want| <= rtol * max(1, max |want|); returns the max error."""
    diff = (got.detach().double() - want.detach().double()).abs()
    scale = max(1.0, want.detach().abs().max().item())
    err = diff.max().item()
    assert err <= rtol * scale, f"{name}: max err {err:.3e} (mean {diff.mean().item():.3e}) > {rtol:.0e} * {scale:.3g}"
    return err


def text_config(family: str, v_heads=4, k_heads=2, head_dim=16, layers=1, **extra):
    config_cls = FAMILIES[family][0]
    kw = dict(vocab_size=96, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, linear_num_value_heads=v_heads, linear_num_key_heads=k_heads,
              linear_key_head_dim=head_dim, linear_value_head_dim=head_dim, linear_conv_kernel_dim=4,
              **{"layer_types": ["linear_attention"] * layers, **extra})
    if family == "qwen3_next":
        kw.update(num_experts=0)
    return config_cls(**kw)


def make_mixer(family: str, seed: int, v_heads=4, k_heads=2) -> torch.nn.Module:
    """An HF GatedDeltaNet with weights that make every part matter: slow decays so the state
    carries across chunks, random dt_bias and norm weights so their gradients are non-trivial."""
    torch.manual_seed(seed)
    mixer = FAMILIES[family][1](text_config(family, v_heads, k_heads), layer_idx=0)
    with torch.no_grad():
        mixer.A_log.copy_(torch.empty(v_heads).uniform_(0.02, 0.2).log())
        mixer.dt_bias.copy_(torch.randn(v_heads))
        mixer.norm.weight.copy_(1 + 0.5 * torch.randn(mixer.head_v_dim))
    return mixer


def per_document(fn, seq_lens, *tensors: torch.Tensor) -> torch.Tensor:
    """fn on every document of every row alone (each tensor sliced to [1, n, ...]), concatenated to [B, S, ...]."""
    rows = []
    for b, row in enumerate(seq_lens):
        starts = [sum(row[:i]) for i in range(len(row))]
        rows.append(torch.cat([fn(*(t[b:b + 1, s:s + n] for t in tensors)) for s, n in zip(starts, row)], dim=1))
    return torch.cat(rows)


def grads_by_name(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


# -- kernels --------------------------------------------------------------------------------------

KERNEL_DOCS = [[5, 1, 40, 17, 1], [30, 1, 33]]  # two rows, length-1 documents, documents longer than a chunk


def _delta_rule_inputs(B, S, Hk, Hv, D, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, S, Hk, D, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(B, S, Hv, D + 3, generator=gen).requires_grad_()
    g = (-0.3 * torch.rand(B, S, Hv, generator=gen)).requires_grad_()
    beta = torch.rand(B, S, Hv, generator=gen).requires_grad_()
    return q, k, v, g, beta


@pytest.mark.parametrize("chunk_size,k_heads", [(64, 2), (8, 2), (5, 1), (8, 4)])
def test_varlen_delta_rule_matches_transformers_per_document(chunk_size, k_heads):
    q, k, v, g, beta = _delta_rule_inputs(2, 64, k_heads, 4, 16, seed=chunk_size)
    inputs = (q, k, v, g, beta)
    doc_ids = doc_ids_from_seq_lens(KERNEL_DOCS)
    out = varlen_gated_delta_rule(q, k, v, g, beta, doc_ids, chunk_size=chunk_size)

    def reference(hf_fn, **kw):
        return per_document(lambda *doc: hf_fn(*doc[:3], g=doc[3], beta=doc[4], use_qk_l2norm_in_kernel=True, **kw)[0],
                            KERNEL_DOCS, *inputs)

    recurrent = reference(torch_recurrent_gated_delta_rule)  # token by token: independent of any chunking
    chunked = reference(torch_chunk_gated_delta_rule, chunk_size=chunk_size)
    assert_close("out vs HF recurrence", out, recurrent)
    assert_close("out vs HF chunked", out, chunked)
    weight = torch.randn_like(out)
    got = torch.autograd.grad((out * weight).sum(), inputs)
    want = torch.autograd.grad((recurrent * weight).sum(), inputs)
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta"], got, want):
        assert_close(name, a, b)


def test_varlen_conv_matches_transformers_per_document():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 12, generator=gen).requires_grad_()
    weight = torch.randn(12, 1, 4, generator=gen).requires_grad_()
    out = varlen_causal_conv1d(x, weight, None, doc_ids_from_seq_lens(KERNEL_DOCS), activation="silu")
    ref = per_document(lambda d: causal_conv1d_fn(d.transpose(1, 2), weight.squeeze(1), None, activation="silu")
                       .transpose(1, 2), KERNEL_DOCS, x)  # [1, n, C] -> [1, C, n] -> [1, n, C]
    assert_close("conv out", out, ref)
    w = torch.randn_like(out)
    for name, a, b in zip(["dx", "dweight"], torch.autograd.grad((out * w).sum(), [x, weight]),
                          torch.autograd.grad((ref * w).sum(), [x, weight])):
        assert_close(name, a, b)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_documents_are_isolated(family):
    """Changing one document's tokens leaves every other document's output bit-identical, and the
    gradient of a document's output reaches no other document's inputs."""
    mixer = wrap_gated_deltanet(make_mixer(family, seed=3), chunk_size=8)
    seq_lens = [[9, 1, 20, 14]]
    params = cp.setup_cp_params(torch.zeros(1, 44, dtype=torch.long), seq_lens=seq_lens).params
    hidden = torch.randn(1, 44, HIDDEN)
    changed = hidden.clone()
    changed[:, 10:30] = torch.randn(1, 20, HIDDEN)  # the third document only
    out, out_changed = mixer(hidden, cp_params=params), mixer(changed, cp_params=params)
    keep = torch.ones(44, dtype=torch.bool)
    keep[10:30] = False
    assert torch.equal(out[:, keep], out_changed[:, keep]), "a document's output depends on its neighbour"
    assert not torch.allclose(out[:, 10:30], out_changed[:, 10:30]), "the changed document did not change"

    probe = hidden.clone().requires_grad_()
    mixer(probe, cp_params=params)[:, 10:30].sum().backward()
    assert probe.grad[:, keep].abs().max() == 0, "gradient leaked into a neighbouring document"
    assert probe.grad[:, 10:30].abs().max() > 0


# -- the wrapper on one rank ----------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_wrapper_keeps_names_and_matches_module_on_unpacked_rows(family):
    original = make_mixer(family, seed=0)
    reference = copy.deepcopy(original)
    wrapped = wrap_gated_deltanet(original, chunk_size=16)
    assert wrap_gated_deltanet(wrapped) is wrapped
    assert list(wrapped.state_dict()) == list(reference.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in reference.named_parameters()]

    hidden = torch.randn(2, 37, HIDDEN, requires_grad=True)
    hidden_ref = hidden.detach().clone().requires_grad_()
    out, ref = wrapped(hidden), reference(hidden_ref)  # one document per row
    assert_close("out", out, ref)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    assert_close("dhidden", hidden.grad, hidden_ref.grad)
    want = grads_by_name(reference)
    for name, grad in grads_by_name(wrapped).items():
        assert_close(f"d{name}", grad, want[name])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_wrapper_packed_single_rank_matches_per_document_module(family):
    original = make_mixer(family, seed=1)
    reference = copy.deepcopy(original)
    wrapped = wrap_gated_deltanet(original, chunk_size=8)
    seq_lens = [[12, 1, 30, 7], [1, 49]]
    params = cp.setup_cp_params(torch.zeros(2, 50, dtype=torch.long), seq_lens=seq_lens).params
    hidden = torch.randn(2, 50, HIDDEN)
    assert_close("out", wrapped(hidden, cp_params=params), per_document(reference, seq_lens, hidden))
    # HF's packed-sequence kwarg (no CPParams) selects the same documents
    cu = params.cu_seqlens
    assert_close("out via cu_seq_lens_q", wrapped(hidden[:1], cu_seq_lens_q=cu[:5]),
                 per_document(reference, seq_lens[:1], hidden[:1]))


def test_generation_with_a_cache_runs_the_original_module():
    """HF's cached decoding (no cp_params) goes through the original module's own path, unchanged."""
    torch.manual_seed(5)
    model = Qwen3_5ForCausalLM(text_config("qwen3_5", layers=2, layer_types=["linear_attention", "full_attention"]))
    reference = copy.deepcopy(model)
    model.model.layers[0].linear_attn = wrap_gated_deltanet(model.model.layers[0].linear_attn)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), reference.generate(ids, **kw))


# -- the wrapper under Ulysses on real gloo ranks -------------------------------------------------

# (family, v_heads, k_heads, seq_lens, chunk_size): documents cross the shard boundaries, there are
# length-1 documents, lengths are not divisible by cp (setup_cp_params pads), key heads below cp.
CASES_WORLD2 = [
    ("qwen3_5", 4, 2, [[20, 1, 25, 7]], 8),  # S=53: padded to 54, the 25-token document straddles both shards
    ("qwen3_next", 4, 2, [[3, 40, 1, 9], [1, 1, 51]], 8),  # two rows
    ("qwen3_5", 4, 1, [[31, 1, 1, 22]], 64),  # one key head, replicated to both ranks
    ("qwen3_next", 6, 3, [[17, 18, 1, 10]], 5),  # ranks need key heads {0,1} and {1,2}: overlapping, re-expanded
]
CASES_WORLD4 = [
    ("qwen3_5", 4, 2, [[13, 1, 30, 1, 25]], 8),  # S=70 padded to 72; key heads replicated (2 < 4)
    ("qwen3_next", 8, 2, [[1, 60, 9]], 16),
]


def _dims(world, style="ulysses"):
    dims = cp.ParallelDims(world_size=world, cp=world, cp_style=style)
    dims.build()
    return dims


def run_layer_case(dims, family, v_heads, k_heads, seq_lens, chunk_size, seed=0) -> dict[str, float]:
    """CP layer on this rank's shard vs the HF module on each document of the full sequence."""
    original = make_mixer(family, seed, v_heads, k_heads)
    reference = copy.deepcopy(original)
    wrapped = wrap_gated_deltanet(original, ulysses_size=dims.ulysses, chunk_size=chunk_size)
    B, S = len(seq_lens), sum(seq_lens[0])
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(B, S, HIDDEN, generator=gen)
    weight = torch.randn(B, S, HIDDEN, generator=gen)
    params = cp.setup_cp_params(torch.zeros(B, S, dtype=torch.long), dims, seq_lens=seq_lens).params

    local = cp.shard(hidden, params).requires_grad_()
    out = cp.unshard(wrapped(local, cp_params=params), params)  # [B, S, hidden], every rank
    (out * weight).sum().backward()
    for p in wrapped.parameters():
        dist.all_reduce(p.grad, group=params.cp_group)  # what the data-parallel reduction does

    full = hidden.clone().requires_grad_()
    ref = per_document(reference, seq_lens, full)
    (ref * weight).sum().backward()
    errors = {"out": assert_close("out", out, ref),
              "dhidden": assert_close("dhidden", local.grad, cp.shard(full.grad, params))}
    want = grads_by_name(reference)
    for name, grad in grads_by_name(wrapped).items():
        errors[f"d{name}"] = assert_close(f"d{name}", grad, want[name])
    return errors


def _layer_worker(rank, world, cases):
    dims = _dims(world)
    return [run_layer_case(dims, *case, seed=i) for i, case in enumerate(cases)]


def _model_worker(rank, world):
    """A whole Qwen3_5ForCausalLM (linear-attention layers only, so no attention registration is
    needed): cp_params given to the model's forward reaches every wrapped mixer."""
    dims = _dims(world)
    torch.manual_seed(7)
    model = Qwen3_5ForCausalLM(text_config("qwen3_5", layers=2))
    reference = copy.deepcopy(model)
    for layer in model.model.layers:
        assert is_gated_deltanet(layer.linear_attn)
        layer.linear_attn = wrap_gated_deltanet(layer.linear_attn, ulysses_size=dims.ulysses, chunk_size=8)
    seq_lens = [[18, 1, 22, 4]]
    ids = torch.randint(0, 96, (1, 45), generator=torch.Generator().manual_seed(8))
    batch = cp.setup_cp_params(ids, dims, seq_lens=seq_lens)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=batch.params,
                   use_cache=False).logits
    logits = cp.unshard(logits, batch.params)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9))
    (logits * weight).sum().backward()
    for p in model.parameters():
        dist.all_reduce(p.grad, group=batch.params.cp_group)

    ref = per_document(lambda d: reference(input_ids=d, use_cache=False).logits, seq_lens, ids)
    (ref * weight).sum().backward()
    errors = {"logits": assert_close("logits", logits, ref)}
    want = grads_by_name(reference)
    for name, grad in grads_by_name(model).items():
        errors[f"d{name}"] = assert_close(f"d{name}", grad, want[name])

    # HF makes a DynamicCache by default, even in training: the wrapper refuses to leave it half filled
    # (a model with an attention layer: HF's own mask code needs one once a cache exists)
    hybrid = Qwen3_5ForCausalLM(text_config("qwen3_5", layers=2, layer_types=["linear_attention", "full_attention"]))
    hybrid.model.layers[0].linear_attn = wrap_gated_deltanet(hybrid.model.layers[0].linear_attn)
    with pytest.raises(ValueError, match="use_cache=False"):
        hybrid(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=batch.params)
    return errors


def _world2_worker(rank, world):
    """One spawn for every world-2 check (each spawn pays the transformers import on 2 cores)."""
    layer_errors = _layer_worker(rank, world, CASES_WORLD2)
    model_errors = _model_worker(rank, world)
    _errors_worker(rank, world)
    return layer_errors, model_errors


def test_ulysses_world2_layer_and_model_match_reference_and_reject_bad_calls():
    run_distributed(_world2_worker, 2)


def test_ulysses_layer_matches_reference_world4():
    run_distributed(_layer_worker, 4, CASES_WORLD4)


# -- errors, raised before any collective ---------------------------------------------------------


def test_wrap_rejects_bad_head_splits_and_modules():
    with pytest.raises(ValueError, match=r"6 \(linear_num_value_heads\).*divisor of 6"):
        wrap_gated_deltanet(make_mixer("qwen3_5", 0, v_heads=6, k_heads=3), ulysses_size=4)
    with pytest.raises(ValueError, match="not a supported GatedDeltaNet"):
        wrap_gated_deltanet(torch.nn.Linear(4, 4))
    assert isinstance(wrap_gated_deltanet(make_mixer("qwen3_next", 0, v_heads=6, k_heads=3), ulysses_size=3),
                      UlyssesGatedDeltaNet)


def _errors_worker(rank, world):
    dims = _dims(world)
    params = cp.setup_cp_params(torch.zeros(1, 32, dtype=torch.long), dims, seq_lens=[[10, 22]]).params
    hidden = torch.randn(1, params.local_len, HIDDEN)
    with pytest.raises(ValueError, match="divisor of 3"):
        wrap_gated_deltanet(make_mixer("qwen3_5", 0, v_heads=3, k_heads=1))(hidden, cp_params=params)
    wrapped = wrap_gated_deltanet(make_mixer("qwen3_5", 0))
    with pytest.raises(ValueError, match="CPParams describe"):
        wrapped(torch.randn(1, params.local_len + 1, HIDDEN), cp_params=params)
    with pytest.raises(ValueError, match="attention_mask"):
        wrapped(hidden, attention_mask=torch.ones(1, params.local_len), cp_params=params)
    ring = cp.setup_cp_params(torch.zeros(1, 32, dtype=torch.long), style="ring", group=dims.cp_group).params
    with pytest.raises(ValueError, match="use model.cp_style=ulysses"):
        wrapped(hidden, cp_params=ring)
    # the group is still in step after every refusal: a real call works
    assert wrapped(hidden, cp_params=params).shape == hidden.shape
