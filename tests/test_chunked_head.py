"""models/memory/chunked_head.py: log-probs, entropy, the loss and every gradient equal the full-logits path.

    fp32, one process   model(..., token_stats=) vs trainer.loss.token_loss_sum / trainer.rl.loop.token_logprobs on
                        model(...).logits: qwen3 untied and tied, gemma2 (final softcap 3), chunk 1 / 7 / N / > N,
                        T 1.0 / 0.7, ignored tokens; the bare function with a bias
    bf16                chunked vs unchunked bf16, and each against the fp32 truth
    gloo, world 2       cp=2 (apply_cp, packed documents): chunked vs the unchunked cp=2 run (qwen3, qwen3_5);
                        FSDP2 (trainer.modeling.parallelize, dp=2): chunked vs the one-process unchunked reference
    refusals            logit_scale (cohere), logits_scaling (granite, at install and at run time), a custom head,
                        chunk_tokens <= 0
    peak memory         V=32k, N=2048: the chunked fwd+bwd peak is well under the unchunked one

Relative error of a tensor: ||got - ref|| / ||ref|| (fp32 rounding through different GEMM shapes is ~1e-7;
a dropped softcap, temperature or token is > 1e-3).
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from models.memory.chunked_head import (
    ChunkedHeadUnsupported,
    TokenStatsRequest,
    auto_chunk_tokens,
    chunk_bytes_per_token,
    chunked_token_logprobs,
    install_chunked_head,
    supports_chunked_head,
)
from models.tiny.family_configs import tiny_family_model
from models.tiny import tiny_config, tiny_model
from trainer.loss import token_logprobs, token_loss_sum

FP32_RTOL = 1e-6
# bf16: logits round at 2^-8 relative. Chunked and unchunked bf16 differ by that rounding (and the
# chunked dW is summed in fp32); each is compared with the fp32 truth too, and the chunked one must be
# no worse than the unchunked one (with slack for which side a rounding falls).
BF16_RTOL = 2e-2
BF16_SLACK = 1.5
SEQ = 40
# Gated DeltaNet's decay parameters sum many tokens' contributions with heavy cancellation: the ~1e-7
# relative rounding difference the chunked head leaves in d(backbone output) (asserted <= 1e-6 itself)
# comes out ~100x larger there (cp=2: d(backbone output) 1.6e-8 -> A_log 1.9e-6). Every other
# gradient: FP32_RTOL.
AMPLIFIED = ("linear_attn.A_log", "linear_attn.dt_bias")
AMPLIFIED_RTOL = 2e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second OpenMP thread only adds synchronisation (and spins on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / max(ref.norm(), 1e-30))


def worst_grad(model, reference) -> tuple[float, str]:
    """(largest relative gradient error, its parameter) over every parameter (tied ones counted once)."""
    return max((rel(p.grad, r.grad), name) for (name, p), r in zip(model.named_parameters(), reference.parameters()))


def make_model(name: str) -> torch.nn.Module:
    if name == "qwen3":
        return tiny_model("qwen3")
    if name == "qwen3_tied":
        config = tiny_config("qwen3")
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float().train()
        assert model.lm_head.weight is model.model.embed_tokens.weight
        return model
    if name == "gemma2":
        model = tiny_family_model("gemma2", final_logit_softcapping=3.0)  # small: the softcap bends every logit
        assert model.lm_head.weight is model.model.embed_tokens.weight
        return model
    return tiny_family_model(name)


def make_batch(rows: int = 2, seq: int = SEQ, vocab: int = 256, seed: int = 0):
    """ids [rows, seq], next-token labels with ignored prompts and row ends, loss weights [rows, seq]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    labels[0, :7] = -100  # a prompt
    labels[-1, 20:23] = -100
    return ids, labels, torch.rand(rows, seq, generator=g)


def full_logits_loss(model, ids, labels, weights, temperature, top_p=1.0):
    """The unchunked path: SFT's token_loss_sum (T=1) or a GRPO-like weighted -logp sum; (loss, logp, entropy)."""
    logits = model(input_ids=ids).logits
    logp, entropy = token_logprobs(logits, labels, temperature, top_p)
    mask = labels != -100
    loss = token_loss_sum(logits, labels) if temperature == 1.0 else -(weights * logp * mask).sum()
    return loss, logp * mask, entropy * mask


def chunked_loss(model, ids, labels, weights, temperature, chunk, top_p=1.0):
    stats = model(input_ids=ids, token_stats=TokenStatsRequest(labels, temperature, entropy=True, chunk_tokens=chunk,
                                                               top_p=top_p))
    loss = -stats.logp.sum() if temperature == 1.0 else -(weights * stats.logp).sum()
    return loss, stats.logp, stats.entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("name", ["qwen3", "qwen3_tied", "gemma2"])
def test_fp32_equals_full_logits(name, temperature):
    reference = make_model(name)
    model = install_chunked_head(copy.deepcopy(reference))
    ids, labels, weights = make_batch()
    ref_loss, ref_logp, ref_entropy = full_logits_loss(reference, ids, labels, weights, temperature)
    ref_loss.backward()
    n = ids.numel()
    for chunk in (1, 7, n, n + 5):
        model.zero_grad()
        loss, logp, entropy = chunked_loss(model, ids, labels, weights, temperature, chunk)
        loss.backward()
        errors = {"loss": rel(loss.detach(), ref_loss.detach()), "logp": rel(logp.detach(), ref_logp.detach()),
                  "entropy": rel(entropy, ref_entropy), "grad": worst_grad(model, reference)}
        print(f"{name} T={temperature} chunk={chunk}: {errors}")
        assert max(errors["loss"], errors["logp"], errors["entropy"], errors["grad"][0]) <= FP32_RTOL, errors
        assert not logp[labels == -100].any() and not entropy[labels == -100].any()


@pytest.mark.parametrize("name", ["qwen3", "gemma2"])
def test_top_p_log_probs_equal_full_logits(name):
    """rollout.top_p < 1: the log-prob of the nucleus the engine sampled from, chunked as unchunked (forward,
    entropy, every gradient; Gemma2: through the softcap), and not the full softmax's."""
    reference = make_model(name)
    model = install_chunked_head(copy.deepcopy(reference))
    ids, labels, weights = make_batch()
    ref_loss, ref_logp, ref_entropy = full_logits_loss(reference, ids, labels, weights, 0.7, top_p=0.8)
    ref_loss.backward()
    loss, logp, entropy = chunked_loss(model, ids, labels, weights, 0.7, 7, top_p=0.8)
    loss.backward()
    errors = (rel(loss, ref_loss), rel(logp, ref_logp), rel(entropy, ref_entropy), worst_grad(model, reference)[0])
    assert max(errors) <= FP32_RTOL, errors
    full = full_logits_loss(reference, ids, labels, weights, 0.7)[1]
    assert bool(((logp - full)[labels != -100] > 0).all()), "a nucleus log-prob is above the full softmax's"
    assert entropy.isfinite().all()


@pytest.mark.parametrize("name", ["recurrent_gemma", "llama4_text"])
def test_other_softcap_field_and_backbone_lookup(name):
    """recurrent_gemma: the softcap is config.logits_soft_cap; llama4_text: get_decoder() misses .model."""
    reference = make_model(name)
    model = install_chunked_head(copy.deepcopy(reference))
    ids, labels, weights = make_batch()
    ref_loss, ref_logp, _ = full_logits_loss(reference, ids, labels, weights, 0.7)
    ref_loss.backward()
    loss, logp, _ = chunked_loss(model, ids, labels, weights, 0.7, 7)
    loss.backward()
    errors = (rel(loss, ref_loss), rel(logp, ref_logp), worst_grad(model, reference))
    print(f"{name}: {errors}")
    assert max(errors[0], errors[1], errors[2][0]) <= FP32_RTOL, errors


def test_bare_function_with_bias_and_leading_dims():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)  # [B, S, H]
    weight = (torch.randn(50, 16, generator=g) * 0.3).requires_grad_()
    bias = torch.randn(50, generator=g).requires_grad_()
    targets = torch.randint(0, 50, (3, 11), generator=g)
    targets[1] = -100  # a row without loss tokens
    upstream = torch.randn(3, 11, generator=g)
    logits = F.linear(hidden, weight, bias).float() / 0.5
    ref = F.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets != -100)
    ref_grads = torch.autograd.grad((upstream * ref).sum(), (hidden, weight, bias))
    for chunk in (1, 4, None):
        logp, entropy = chunked_token_logprobs(hidden, weight, targets, bias=bias, temperature=0.5, chunk_tokens=chunk)
        grads = torch.autograd.grad((upstream * logp).sum(), (hidden, weight, bias))
        assert entropy is None and logp.shape == targets.shape
        assert rel(logp, ref) <= FP32_RTOL
        assert max(rel(a, b) for a, b in zip(grads, ref_grads)) <= FP32_RTOL


def test_no_loss_tokens_still_gives_zero_gradients():
    """An all-ignored (padding) micro-batch: every gradient exists and is 0 (FSDP's reduce-scatter needs it)."""
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    logp, _ = chunked_token_logprobs(hidden, weight, torch.full((2, 5), -100))
    logp.sum().backward()
    assert not logp.any() and not hidden.grad.any() and weight.grad is not None and not weight.grad.any()


def test_without_token_stats_the_forward_is_unchanged():
    reference = make_model("gemma2")
    model = install_chunked_head(copy.deepcopy(reference))
    assert install_chunked_head(model) is model  # idempotent
    ids, _, _ = make_batch()
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["qwen3", "gemma2"])
def test_bf16_agrees_with_unchunked_bf16(name):
    truth = make_model(name)
    reference = copy.deepcopy(truth).to(torch.bfloat16)
    model = install_chunked_head(copy.deepcopy(reference))
    ids, labels, weights = make_batch()
    runs = {}
    for key, m, loss_fn in (("truth", truth, full_logits_loss), ("unchunked", reference, full_logits_loss),
                            ("chunked", model, lambda *a: chunked_loss(*a, 16))):
        loss, logp, _ = loss_fn(m, ids, labels, weights, 0.7)
        loss.backward()
        runs[key] = (loss.detach(), logp.detach(), {n: p.grad.float() for n, p in m.named_parameters()})
    errors = {}
    for a, b in (("chunked", "unchunked"), ("chunked", "truth"), ("unchunked", "truth")):
        (la, pa, ga), (lb, pb, gb) = runs[a], runs[b]
        errors[f"{a} vs {b}"] = (rel(la, lb), rel(pa, pb), max(rel(ga[n], gb[n]) for n in gb))
    print(f"bf16 {name} (loss, logp, worst grad): {errors}")
    assert max(errors["chunked vs unchunked"]) <= BF16_RTOL, errors
    for i in range(3):
        assert errors["chunked vs truth"][i] <= BF16_SLACK * errors["unchunked vs truth"][i] + 1e-4, errors


# ------------------------------------------------------------------------------------------- gloo ranks


def _chunked_cp_run(model, dims, ids, lens, labels):
    """tests/family_sweep.py cp_run's loss and gradients, from token_stats instead of logits."""
    import torch.distributed as dist

    import cp

    batch = cp.setup_cp_params(ids, dims, labels=labels, seq_lens=[lens])
    stats = model(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=batch.params,
                  use_cache=False, token_stats=TokenStatsRequest(batch.labels, chunk_tokens=7))
    count = (batch.labels != -100).sum()
    dist.all_reduce(count, group=batch.params.cp_group)
    (-stats.logp.sum() / count).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for g in grads:
        dist.all_reduce(g, group=batch.params.cp_group)  # each rank holds its tokens' share
    return grads


def _keep_output_grad(module) -> list:
    """[output of module's last call]; its .grad is kept after backward."""
    kept = []

    def hook(_module, _inputs, out):
        out.retain_grad()
        kept.append(out)

    module.register_forward_hook(hook)
    return kept


def _cp_errors(world: int) -> dict:
    """{family: (d backbone output error (max over ranks), (worst error, parameter) over every gradient)}."""
    import torch.distributed as dist

    import cp
    import models
    from tests.family_sweep import cp_run, labels_for
    from tests.reference import random_doc_lens

    dims = cp.ParallelDims(world_size=world, cp=world, cp_style="ulysses")
    dims.build()
    errors = {}
    for family in ("qwen3", "qwen3_5"):
        plain = models.apply_cp(tiny_model(family), dims)
        chunked = install_chunked_head(copy.deepcopy(plain))
        outputs = [_keep_output_grad(m.model.norm) for m in (plain, chunked)]  # the head's input, this rank's shard
        seq = 61  # not a multiple of cp: the pad path runs too
        lens = random_doc_lens(seq, random.Random(7), max_len=seq // 2)
        ids = torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(1))
        labels = labels_for(ids, lens)
        _, _, ref_grads = cp_run(plain, dims, ids, lens, labels)
        grads = _chunked_cp_run(chunked, dims, ids, lens, labels)
        hidden_err = torch.tensor(rel(outputs[1][-1].grad, outputs[0][-1].grad))
        dist.all_reduce(hidden_err, op=dist.ReduceOp.MAX)
        names = [n for n, _ in plain.named_parameters()]
        errors[family] = (float(hidden_err), [(rel(g, r), n) for g, r, n in zip(grads, ref_grads, names)])
    return errors


def _shard(model, dims, variant: str) -> None:
    """trainer.modeling.parallelize (apply_cp at cp=1, FSDP2 per layer + root), or by hand with the root
    resharding after forward (lm_head.weight is a DTensor again until FSDP's pre-backward hook)."""
    from torch.distributed.fsdp import fully_shard

    from trainer.config import ModelConfig
    from trainer.modeling import parallelize

    if variant != "root_reshards":
        mcfg = dataclasses.replace(ModelConfig(), attn=None, activation_checkpointing=variant == "checkpointing")
        parallelize(model, dims, mcfg, torch.device("cpu"))  # the trainer's own path (installs the chunked head)
        return
    for module in [*model.model.layers, model]:
        fully_shard(module, mesh=dims.dp_cp_mesh, reshard_after_forward=True)
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)


def _fsdp_errors(rank: int, world: int) -> dict:
    """FSDP2 at dp=world: each rank its own row, chunked; the reference is one process, every row, full logits.
    {variant: (worst error, parameter), lm_head.weight's type after forward}."""
    import cp

    dims = cp.ParallelDims(world_size=world, cp=1, cp_style="ulysses")
    dims.build()
    errors = {}
    for variant, name in (("parallelize", "qwen3"), ("checkpointing", "qwen3_tied"), ("root_reshards", "qwen3_tied")):
        reference = make_model(name)
        model = copy.deepcopy(reference)
        if variant == "parallelize":
            install_chunked_head(model)
        _shard(model, dims, variant)
        install_chunked_head(model)  # before sharding (parallelize) or after it (the others): either works
        ids, labels, _ = make_batch(rows=world)
        token_loss_sum(reference(input_ids=ids).logits, labels).backward()
        batch = cp.setup_cp_params(ids[rank:rank + 1], dims, labels=labels[rank:rank + 1])
        kwargs = {} if variant == "root_reshards" else {"position_ids": batch.position_ids, "cp_params": batch.params}
        stats = model(input_ids=batch.input_ids, token_stats=TokenStatsRequest(batch.labels, chunk_tokens=5), **kwargs)
        weight_type = type(model.lm_head.weight).__name__
        (-stats.logp.sum()).backward()  # FSDP sums the ranks' gradients (divide factor 1)
        grads = [p.grad.full_tensor() for p in model.parameters()]
        worst = max((rel(g, r.grad), n) for g, (n, r) in zip(grads, reference.named_parameters()))
        errors[variant] = (worst, weight_type)
    return errors


def _distributed_worker(rank: int, world: int) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return {"cp": _cp_errors(world), "fsdp": _fsdp_errors(rank, world)}


@pytest.fixture(scope="module")
def distributed_errors() -> dict:
    from tests.dist import run_distributed

    return run_distributed(_distributed_worker, 2, timeout=300)[0]


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5"])
def test_cp2_equals_unchunked_cp2_run(distributed_errors, family):
    hidden_err, grads = distributed_errors["cp"][family]
    strict = max((e, n) for e, n in grads if not n.endswith(AMPLIFIED))
    amplified = max(((e, n) for e, n in grads if n.endswith(AMPLIFIED)), default=(0.0, "-"))
    print(f"cp=2 {family}: d(backbone output) {hidden_err:.3g}, worst gradient {strict[1]} {strict[0]:.3g}, "
          f"worst decay gradient {amplified[1]} {amplified[0]:.3g}")
    assert hidden_err <= FP32_RTOL and strict[0] <= FP32_RTOL, (family, hidden_err, strict)
    assert amplified[0] <= AMPLIFIED_RTOL, (family, amplified)


@pytest.mark.parametrize("variant", ["parallelize", "checkpointing", "root_reshards"])
def test_fsdp2_equals_one_process_reference(distributed_errors, variant):
    """parallelize: qwen3 as the trainer shards it; checkpointing: tied qwen3 with activation checkpointing;
    root_reshards: tied qwen3, the root resharding after forward, so backward needs FSDP's pre-backward hook."""
    (err, param), weight_type = distributed_errors["fsdp"][variant]
    print(f"FSDP2 {variant}: worst gradient {param} {err:.3g}, lm_head.weight after forward: {weight_type}")
    assert err <= FP32_RTOL, (variant, param, err)
    assert weight_type == ("DTensor" if variant == "root_reshards" else "Parameter")


# -------------------------------------------------------------------------------------- refusals, sizes


@pytest.mark.parametrize("family,variant,field", [("cohere", {}, "logit_scale"),
                                                  ("granite", {"logits_scaling": 8.0}, "logits_scaling")])
def test_logit_transforms_are_refused_at_install(family, variant, field):
    model = tiny_family_model(family, **variant)
    reason = supports_chunked_head(model)
    assert reason is not None and "transforms lm_head's output" in reason and field in reason, reason
    with pytest.raises(ChunkedHeadUnsupported, match="full-logits path"):
        install_chunked_head(model)


def test_a_transform_that_appears_after_install_is_refused_at_run_time():
    model = install_chunked_head(tiny_family_model("granite", logits_scaling=1.0))  # identity: supported
    model.config.logits_scaling = 8.0
    ids, labels, _ = make_batch()
    with pytest.raises(ChunkedHeadUnsupported, match="at run time"):
        model(input_ids=ids, token_stats=TokenStatsRequest(labels))


def test_a_head_that_is_not_a_plain_linear_is_refused():
    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = tiny_model("qwen3")
    model.lm_head = ScaledHead(64, 256, bias=False)
    assert "not a plain torch.nn.Linear" in supports_chunked_head(model)
    with pytest.raises(ChunkedHeadUnsupported):
        install_chunked_head(model)


@pytest.mark.parametrize("chunk", [0, -3])
def test_chunk_tokens_must_be_positive(chunk):
    model = install_chunked_head(tiny_model("qwen3"))
    ids, labels, _ = make_batch()
    with pytest.raises(ValueError, match="positive number of tokens per chunk.*auto_chunk_tokens"):
        model(input_ids=ids, token_stats=TokenStatsRequest(labels, chunk_tokens=chunk))
    with pytest.raises(ValueError, match="auto_chunk_tokens"):
        chunked_token_logprobs(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long),
                               chunk_tokens=chunk)


def test_auto_chunk_tokens():
    assert auto_chunk_tokens(152_064, torch.bfloat16) == 128  # the floor: one token is ~3 MB there
    chunk = auto_chunk_tokens(32_000)
    assert chunk % 128 == 0 and chunk * chunk_bytes_per_token(32_000) <= 256 * 2**20
    assert auto_chunk_tokens(32_000, n_tokens=100) == 100 and auto_chunk_tokens(32_000, n_tokens=0) == 1


def test_peak_memory_is_far_below_full_logits():
    from scripts.bench.measure import PeakMemory

    g = torch.Generator().manual_seed(0)
    n, vocab = 2048, 32_000
    hidden = torch.randn(n, 64, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, 64, generator=g) * 0.1).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    with PeakMemory(torch.device("cpu")) as full:
        F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum").backward()
    with PeakMemory(torch.device("cpu")) as chunked:
        (-chunked_token_logprobs(hidden, weight, targets)[0].sum()).backward()
    print(f"peak fwd+bwd, N={n} V={vocab} fp32: full logits {full.bytes / 2**20:.0f} MiB, "
          f"chunked {chunked.bytes / 2**20:.0f} MiB (chunk {auto_chunk_tokens(vocab, n_tokens=n)} tokens)")
    assert chunked.bytes < 0.5 * full.bytes, (chunked.bytes, full.bytes)
