"""NemotronH Mamba2 under Ulysses CP == the original transformers mixer run on each document alone.

    references                                         checked against them
    float64 step-by-step recurrence, per document  <-  ssd_scan_varlen (chunked, fp32): values + grads
    F.conv1d on each document alone                <-  varlen_causal_conv1d: values + grads
    ORIGINAL NemotronHMamba2Mixer torch path,      <-  UlyssesMamba2Mixer at cp=1, world 2 and world 4:
    one unpadded document at a time, concatenated      output, input grad, every parameter grad
                                                       (parameter grads summed over the cp group)

Tolerances. fp32 against the original fp32 mixer: both run a chunked SSD scan, but the chunks
start at different places (the reference restarts at each document, ours at multiples of
chunk_size of the packed row) and the all-to-all reorders nothing but the summation order of
the local products, so the two differ by float32 rounding: measured <= ~1e-6 relative to the
largest value. RTOL = 2e-5 of the largest reference value leaves room for accumulation order; a
state or conv tap leaking across a document moves values by O(1) (asserted below: the original
mixer run on the packed row is off by > 1e-2).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import NemotronHConfig, NemotronHForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

import cp
from models.mixers.hf_conventions import cache_keyword
from models.mixers.mamba2 import UlyssesMamba2Mixer, discretise_dt, is_mamba2_mixer, ssd_scan_varlen, wrap_mamba2_mixer
from models.mixers.varlen_ops import doc_ids_from_seq_lens, varlen_causal_conv1d
from tests.dist import run_distributed
from tests.reference import random_doc_lens

RTOL = 2e-5  # of the largest reference value; see the module docstring
FP64_RTOL = 2e-5  # fp32 chunked kernel vs float64 recurrence: float32 rounding only


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def tiny_config(*, heads=4, groups=2, head_dim=16, state=8, chunk=16, hidden=64,
                layers=("linear_attention",)) -> NemotronHConfig:
    return NemotronHConfig(vocab_size=50, hidden_size=hidden, layers_block_type=list(layers), mamba_num_heads=heads,
                           mamba_head_dim=head_dim, n_groups=groups, ssm_state_size=state, conv_kernel=4,
                           chunk_size=chunk, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16)


def randomise_ssm(mixer: NemotronHMamba2Mixer, gen: torch.Generator) -> None:
    """Slow decays (small dt, small |A|) so a leaked state would be visible; non-trivial D, norm, conv bias."""
    with torch.no_grad():
        heads = mixer.num_heads
        mixer.A_log.copy_(torch.empty(heads).uniform_(-1.5, 1.0, generator=gen))
        mixer.dt_bias.copy_(torch.randn(heads, generator=gen) - 2.5)
        mixer.D.copy_(torch.randn(heads, generator=gen))
        mixer.norm.weight.copy_(1 + 0.2 * torch.randn(mixer.norm.weight.shape, generator=gen))
        mixer.conv1d.bias.copy_(0.3 * torch.randn(mixer.conv1d.bias.shape, generator=gen))


def make_mixer(config: NemotronHConfig, seed: int) -> NemotronHMamba2Mixer:
    torch.manual_seed(seed)
    mixer = NemotronHMamba2Mixer(config, layer_idx=0)
    randomise_ssm(mixer, torch.Generator().manual_seed(seed))
    return mixer.train()


def packed_lens(length: int, rows: int, rng: random.Random) -> list[list[int]]:
    """Row 0: a length-1 document early, then random ones; other rows random (length-1 ones mixed in)."""
    first = [min(5, length - 2), 1]
    out = [first + random_doc_lens(length - sum(first), rng)]
    return out + [random_doc_lens(length, rng) for _ in range(rows - 1)]


def documents(seq_lens):
    """(row, start, length) of every document."""
    for row, lens in enumerate(seq_lens):
        start = 0
        for n in lens:
            yield row, start, n
            start += n


def per_document(fn, full: torch.Tensor, seq_lens) -> torch.Tensor:
    """Run fn on every document alone ([1, n, ...]) and put the results back in place."""
    rows = [[] for _ in seq_lens]
    for row, start, n in documents(seq_lens):
        rows[row].append(fn(full[row:row + 1, start:start + n]))
    return torch.cat([torch.cat(r, dim=1) for r in rows], dim=0)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(max |a - ref| / max(1, max|ref|), max abs error, mean abs error)."""
    diff = (a.double() - ref.double()).abs()
    scale = max(1.0, ref.abs().max().item())
    return diff.max().item() / scale, diff.max().item(), diff.mean().item()


def assert_close(a: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = RTOL) -> float:
    assert a.shape == ref.shape, f"{what}: shape {tuple(a.shape)} vs reference {tuple(ref.shape)}"
    rel, mx, mean = rel_err(a, ref)
    assert rel <= rtol, f"{what}: max|err|={mx:.3e} mean={mean:.3e} (relative {rel:.3e} > {rtol})"
    return rel


def crosses_a_shard(seq_lens, padded_len: int, size: int) -> bool:
    shard = padded_len // size
    return any(start // shard != (start + n - 1) // shard for _, start, n in documents(seq_lens))


# ------------------------------------------------------------------------------------------------
# Kernels against independent references (single process)
# ------------------------------------------------------------------------------------------------


def _conv_reference(x_doc, weight, bias):
    """One document: nn.Conv1d's causal depthwise conv (left zero padding), then SiLU."""
    channels, kernel = weight.shape
    out = F.conv1d(x_doc.transpose(1, 2), weight.unsqueeze(1), bias, padding=kernel - 1, groups=channels)
    return F.silu(out[..., :x_doc.shape[1]]).transpose(1, 2)  # [1, C, n] -> [1, n, C]


def test_varlen_causal_conv_matches_each_document_alone():
    gen = torch.Generator().manual_seed(0)
    seq_lens = packed_lens(53, 2, random.Random(0))
    x = torch.randn(2, 53, 12, generator=gen, requires_grad=True)
    weight = torch.randn(12, 4, generator=gen, requires_grad=True)
    bias = torch.randn(12, generator=gen, requires_grad=True)
    proj = torch.randn(2, 53, 12, generator=gen)

    out = varlen_causal_conv1d(x, weight, bias, doc_ids_from_seq_lens(seq_lens), activation="silu")
    grads = torch.autograd.grad((out * proj).sum(), (x, weight, bias))
    ref = per_document(lambda d: _conv_reference(d, weight, bias), x, seq_lens)
    ref_grads = torch.autograd.grad((ref * proj).sum(), (x, weight, bias))

    assert_close(out, ref, "conv output")
    for name, g, r in zip(("x", "weight", "bias"), grads, ref_grads):
        assert_close(g, r, f"conv grad {name}")


def _sequential_scan(x, dt, A, B, C, D, dt_bias, limit):
    """One document, float64, one step at a time: the Mamba2 recurrence as written in the paper."""
    x, B, C = x.double(), B.double(), C.double()
    dt = discretise_dt(dt.double(), dt_bias.double(), limit=limit).double()  # [1, n, h]
    heads, groups = x.shape[2], B.shape[2]
    B = B.repeat_interleave(heads // groups, dim=2)  # [1, n, g, N] -> [1, n, h, N]
    C = C.repeat_interleave(heads // groups, dim=2)  # [1, n, g, N] -> [1, n, h, N]
    state = x.new_zeros(heads, x.shape[3], B.shape[3])  # [h, p, N]
    outs = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[0, t] * A.double())  # [h]
        state = decay[:, None, None] * state + dt[0, t][:, None, None] * x[0, t][:, :, None] * B[0, t][:, None, :]
        outs.append(torch.einsum("hpn,hn->hp", state, C[0, t]) + D.double()[:, None] * x[0, t])
    return torch.stack(outs)[None]  # [1, n, h, p]


@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_ssd_scan_matches_float64_recurrence_per_document(chunk):
    gen = torch.Generator().manual_seed(chunk)
    b, S, h, p, g, n = 2, 45, 4, 3, 2, 5
    seq_lens = packed_lens(S, b, random.Random(chunk))
    leaf = lambda *shape, scale=1.0, shift=0.0: (scale * torch.randn(*shape, generator=gen) + shift).requires_grad_()
    x, dt, B, C = leaf(b, S, h, p), leaf(b, S, h), leaf(b, S, g, n), leaf(b, S, g, n)
    A, D, dt_bias = leaf(h, scale=0.3, shift=-0.5), leaf(h), leaf(h, shift=-2.0)
    limit = (0.01, float("inf"))
    inputs = (x, dt, A, B, C, D, dt_bias)
    proj = torch.randn(b, S, h, p, generator=gen, dtype=torch.float64)

    y = ssd_scan_varlen(x, dt, A, B, C, doc_ids_from_seq_lens(seq_lens), D=D, dt_bias=dt_bias, dt_limit=limit,
                        chunk_size=chunk)
    grads = torch.autograd.grad((y.double() * proj).sum(), inputs)
    rows = [[] for _ in range(b)]
    for row, start, length in documents(seq_lens):
        piece = slice(start, start + length)
        rows[row].append(_sequential_scan(x[row:row + 1, piece], dt[row:row + 1, piece], A, B[row:row + 1, piece],
                                          C[row:row + 1, piece], D, dt_bias, limit))
    ref = torch.cat([torch.cat(r, dim=1) for r in rows])
    ref_grads = torch.autograd.grad((ref * proj).sum(), inputs)

    assert y.dtype == torch.float32
    assert_close(y, ref, f"scan output (chunk {chunk})", FP64_RTOL)
    for name, gr, r in zip(("x", "dt", "A", "B", "C", "D", "dt_bias"), grads, ref_grads):
        assert_close(gr, r, f"scan grad {name} (chunk {chunk})", FP64_RTOL)


# ------------------------------------------------------------------------------------------------
# The wrapper at cp=1 against the original transformers mixer
# ------------------------------------------------------------------------------------------------


def run_and_grads(module: torch.nn.Module, hidden: torch.Tensor, proj: torch.Tensor, call) -> tuple:
    """Forward through `call`, backprop <out, proj>; return (out, input grad, {param name: grad})."""
    hidden = hidden.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = call(hidden)
    (out * proj).sum().backward()
    return out.detach(), hidden.grad, {name: p.grad for name, p in module.named_parameters()}


def check_mixer_against_reference(wrapped: UlyssesMamba2Mixer, reference: NemotronHMamba2Mixer, got: tuple,
                                  want: tuple, what: str) -> None:
    out, grad_in, grads = got
    ref_out, ref_grad_in, ref_grads = want
    assert_close(out, ref_out, f"{what}: output")
    assert_close(grad_in, ref_grad_in, f"{what}: grad of the input")
    for name, ref_grad in ref_grads.items():
        assert grads[name] is not None, f"{what}: parameter {name} got no gradient"
        assert_close(grads[name], ref_grad, f"{what}: grad of {name}")


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 1), (4, 4)])
def test_wrapper_cp1_matches_original_mixer_per_document(heads, groups):
    config = tiny_config(heads=heads, groups=groups)
    reference = make_mixer(config, seed=heads * 10 + groups)
    wrapped = wrap_mamba2_mixer(copy.deepcopy(reference))
    S, rows = 61, 2
    seq_lens = packed_lens(S, rows, random.Random(1))
    gen = torch.Generator().manual_seed(2)
    hidden, proj = torch.randn(rows, S, 64, generator=gen), torch.randn(rows, S, 64, generator=gen)
    params = cp.setup_cp_params(torch.zeros(rows, S, dtype=torch.long), seq_lens=seq_lens).params

    got = run_and_grads(wrapped, hidden, proj, lambda h: wrapped(h, cp_params=params))
    want = run_and_grads(reference, hidden, proj, lambda h: per_document(reference, h, seq_lens))
    check_mixer_against_reference(wrapped, reference, got, want, f"cp=1 H={heads} G={groups}")

    # The reference is sensitive: the original mixer on the packed row leaks across documents.
    with torch.no_grad():
        leaked = reference(hidden)
    assert rel_err(leaked, want[0])[0] > 1e-2, "the original mixer should leak across packed documents"


def test_packed_documents_are_isolated():
    """Changing the documents before and after one document leaves its output bit-for-bit unchanged."""
    wrapped = wrap_mamba2_mixer(make_mixer(tiny_config(), seed=3))
    seq_lens = [[23, 9, 17, 1, 14]]  # 64 tokens; target document 2 spans positions 32..48 (crosses a chunk)
    params = cp.setup_cp_params(torch.zeros(1, 64, dtype=torch.long), seq_lens=seq_lens).params
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, 64, 64, generator=gen)
    changed = hidden.clone()
    changed[:, :32] = torch.randn(1, 32, 64, generator=gen) * 3  # documents 0 and 1
    changed[:, 49:] = torch.randn(1, 15, 64, generator=gen)  # documents 3 and 4
    with torch.no_grad():
        out, out_changed = wrapped(hidden, cp_params=params), wrapped(changed, cp_params=params)
    target = slice(32, 49)
    assert torch.equal(out[:, target], out_changed[:, target]), \
        f"document 2 changed by {(out[:, target] - out_changed[:, target]).abs().max():.3e}"
    assert (out[:, 31] - out_changed[:, 31]).abs().max() > 1e-3, "the neighbouring document itself should change"


def test_without_cp_params_every_row_is_one_document():
    reference = make_mixer(tiny_config(), seed=5)
    wrapped = wrap_mamba2_mixer(copy.deepcopy(reference))
    hidden = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 40)
    mask[1, :7] = 0  # left padding, HF's convention: padded positions enter as zeros
    with torch.no_grad():
        assert_close(wrapped(hidden), reference(hidden), "no cp_params: the original mixer's output")
        assert torch.equal(wrapped(hidden, attention_mask=mask), reference(hidden, attention_mask=mask))  # HF's path
    assert wrap_mamba2_mixer(wrapped) is wrapped  # idempotent
    assert is_mamba2_mixer(reference) and not is_mamba2_mixer(wrapped)


def install_wrappers(model: NemotronHForCausalLM, dims=None) -> int:
    """What models.apply_cp does for NemotronH's Mamba2 layers; returns how many it wrapped."""
    count = 0
    for block in model.model.layers:
        if block.block_type == "linear_attention":
            block.mixer = wrap_mamba2_mixer(block.mixer, dims=dims)
            count += 1
    return count


MAMBA_MLP = ("linear_attention", "mlp", "linear_attention", "mlp")


def make_model(seed: int, heads=4, groups=2, layers=MAMBA_MLP) -> NemotronHForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(heads=heads, groups=groups, layers=layers)
    model = NemotronHForCausalLM(config).train()
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if is_mamba2_mixer(module):
            randomise_ssm(module, gen)
    return model


def per_document_logits(model, input_ids, seq_lens):
    return per_document(lambda ids: model(input_ids=ids, use_cache=False).logits, input_ids, seq_lens)


def test_cp_params_reach_the_mixer_through_the_model():
    """model(..., cp_params=...) -> block -> mixer(hidden, cache_params=..., attention_mask=None, cp_params=...).

    Mamba + MLP layers only: packed attention needs the CP attention function (models.apply_cp).
    (transformers cannot build a cache for a model without attention layers: use_cache=False.)
    """
    reference = make_model(seed=6)
    model = copy.deepcopy(reference)
    assert install_wrappers(model) == 2
    seq_lens = packed_lens(48, 2, random.Random(6))
    input_ids = torch.randint(0, 50, (2, 48), generator=torch.Generator().manual_seed(6))
    batch = cp.setup_cp_params(input_ids, seq_lens=seq_lens)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=batch.params,
                       use_cache=False).logits
        want = per_document_logits(reference, input_ids, seq_lens)
        assert_close(logits, want, "model logits, cp=1")
        leaked = model(input_ids=input_ids, use_cache=False).logits
        assert rel_err(leaked, want)[0] > 1e-2, "without cp_params documents leak"


def test_design_call_with_attention_layers_and_default_cache():
    """The DESIGN call (use_cache left at the config default) on a model mixing mamba / attention / mlp:
    training mode hands the mixer an empty DynamicCache, which the CP path leaves alone.
    One document per row, so transformers' own attention is exact at cp=1."""
    layers = ("linear_attention", "full_attention", "mlp", "linear_attention")
    reference = make_model(seed=7, layers=layers)
    model = copy.deepcopy(reference)
    assert install_wrappers(model) == 2
    input_ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(7))
    batch = cp.setup_cp_params(input_ids)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=batch.params).logits
        assert_close(logits, reference(input_ids=input_ids).logits, "mamba/attention/mlp model, cp=1")


# ------------------------------------------------------------------------------------------------
# Ulysses on real gloo groups
# ------------------------------------------------------------------------------------------------


def _dims(world: int) -> cp.ParallelDims:
    dims = cp.ParallelDims(world_size=world, cp=world, cp_style="ulysses")
    dims.build()
    return dims


def summed_over_cp(grads: dict, group) -> dict:
    out = {}
    for name, g in grads.items():
        g = g.clone()
        dist.all_reduce(g, group=group)
        out[name] = g
    return out


def check_mixer_case(dims, *, heads, groups, S, rows, seed) -> None:
    config = tiny_config(heads=heads, groups=groups)
    reference = make_mixer(config, seed)
    wrapped = wrap_mamba2_mixer(copy.deepcopy(reference), dims=dims)
    seq_lens = packed_lens(S, rows, random.Random(seed))
    gen = torch.Generator().manual_seed(seed)
    hidden, proj = torch.randn(rows, S, 64, generator=gen), torch.randn(rows, S, 64, generator=gen)
    batch = cp.setup_cp_params(torch.zeros(rows, S, dtype=torch.long), dims, seq_lens=seq_lens)
    params = batch.params
    assert params.padded_len != S or S % dims.cp == 0, "setup_cp_params should pad"
    assert crosses_a_shard(seq_lens, params.padded_len, dims.cp), f"no document crosses a shard: {seq_lens}"

    out, grad_in, grads = run_and_grads(wrapped, cp.shard(hidden, params), cp.shard(proj, params),
                                        lambda h: wrapped(h, cp_params=params))
    got = (cp.unshard(out, params), cp.unshard(grad_in, params), summed_over_cp(grads, params.cp_group))
    want = run_and_grads(reference, hidden, proj, lambda h: per_document(reference, h, seq_lens))
    check_mixer_against_reference(wrapped, reference, got, want,
                                  f"cp={dims.cp} H={heads} G={groups} S={S} docs={seq_lens}")


def check_packed_model(model, reference, dims, input_ids, seq_lens, proj, what: str) -> dict:
    """The CP-prepared `model` on packed rows (this rank's shard) vs `reference` run on each document alone:
    logits and every parameter gradient (summed over the cp group), under the HF parameter names.
    Returns the reference gradients by name."""
    batch = cp.setup_cp_params(input_ids, dims, seq_lens=seq_lens)
    params = batch.params
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=params,
                   use_cache=False).logits
    (logits * cp.shard(proj, params)).sum().backward()
    grads = summed_over_cp({n: p.grad for n, p in model.named_parameters()}, params.cp_group)  # HF names
    want = per_document_logits(reference, input_ids, seq_lens)
    (want * proj).sum().backward()

    assert_close(cp.unshard(logits.detach(), params), want.detach(), f"{what} logits cp={dims.cp}")
    ref_grads = {name: p.grad for name, p in reference.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        assert_close(grads[name], ref_grad, f"{what} grad {name} cp={dims.cp}")
    return ref_grads


def check_model_case(dims, seed) -> None:
    reference = make_model(seed)
    model = copy.deepcopy(reference)
    install_wrappers(model, dims)
    S, rows = 45, 2
    seq_lens = packed_lens(S, rows, random.Random(seed))
    input_ids = torch.randint(0, 50, (rows, S), generator=torch.Generator().manual_seed(seed))
    proj = torch.randn(rows, S, 50, generator=torch.Generator().manual_seed(seed + 1))
    check_packed_model(model, reference, dims, input_ids, seq_lens, proj, "model")


def check_forward_refusal(dims) -> None:
    """heads % P != 0 is refused on every rank before any collective; the group stays in step."""
    wrapped = wrap_mamba2_mixer(make_mixer(tiny_config(heads=3, groups=1), seed=0))  # no dims: checked at call
    params = cp.setup_cp_params(torch.zeros(1, 32, dtype=torch.long), dims).params
    with pytest.raises(ValueError, match=f"not divisible by {dims.cp}"):
        wrapped(torch.randn(1, params.local_len, 64), cp_params=params)


def _world2_worker(rank, world):
    dims = _dims(world)
    check_forward_refusal(dims)  # first: the cases below then show the group is still in step
    check_mixer_case(dims, heads=4, groups=2, S=61, rows=2, seed=11)  # one group per rank
    check_mixer_case(dims, heads=4, groups=1, S=61, rows=2, seed=12)  # n_groups < P: the group is replicated
    check_mixer_case(dims, heads=6, groups=3, S=50, rows=1, seed=13)  # a rank's heads straddle groups unevenly
    check_model_case(dims, seed=14)


def test_ulysses_mixer_matches_reference_world2():
    run_distributed(_world2_worker, 2)


def _world4_worker(rank, world):
    dims = _dims(world)
    check_mixer_case(dims, heads=8, groups=2, S=93, rows=1, seed=21)  # each group on 2 ranks, S % 4 != 0


def test_ulysses_mixer_matches_reference_world4():
    run_distributed(_world4_worker, 4)


# ------------------------------------------------------------------------------------------------
# Errors, raised before any collective
# ------------------------------------------------------------------------------------------------


def test_wrap_refuses_layouts_it_cannot_run():
    mixer = make_mixer(tiny_config(heads=6, groups=3), seed=0)
    with pytest.raises(ValueError, match=r"mamba_num_heads=6 is not divisible by 4.*\[1, 2, 3, 6\]"):
        wrap_mamba2_mixer(mixer, dims=cp.ParallelDims(world_size=4, cp=4, cp_style="ulysses"))
    with pytest.raises(ValueError, match="use model.cp_style=ulysses"):
        wrap_mamba2_mixer(mixer, dims=cp.ParallelDims(world_size=2, cp=2, cp_style="ring"))
    with pytest.raises(ValueError, match="use model.cp_style=ulysses"):
        wrap_mamba2_mixer(mixer, dims=cp.ParallelDims(world_size=4, cp=4, cp_style="hybrid", cp_ulysses=2))
    with pytest.raises(TypeError, match="NemotronHMamba2Mixer"):
        wrap_mamba2_mixer(torch.nn.Linear(2, 2))
    wrap_mamba2_mixer(mixer, dims=cp.ParallelDims(world_size=2, cp=2, cp_style="ulysses"))  # 6 % 2 == 0: fine


def test_forward_refuses_bad_calls():
    mixer = make_mixer(tiny_config(), seed=0)
    wrapped = wrap_mamba2_mixer(mixer)
    params = cp.setup_cp_params(torch.zeros(1, 24, dtype=torch.long), seq_lens=[[10, 14]]).params
    hidden = torch.randn(1, 24, 64)
    with pytest.raises(ValueError, match="CPParams describe"):
        wrapped(hidden[:, :20], cp_params=params)
    with pytest.raises(ValueError, match="drop attention_mask"):
        wrapped(hidden, attention_mask=torch.ones(1, 24), cp_params=params)
    cache = DynamicCache(config=mixer.config)
    with torch.no_grad():
        wrapped(hidden, cache_params=cache, cp_params=params)  # an empty cache is left alone
        assert cache.get_conv_state(0) is None and cache.get_recurrent_state(0) is None
        mixer.eval()
        mixer(hidden, **{cache_keyword(mixer): cache})  # the original fills it
    with pytest.raises(ValueError, match="use_cache=False"):
        wrapped(hidden, cache_params=cache, cp_params=params)
