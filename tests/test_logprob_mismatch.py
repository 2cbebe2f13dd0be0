"""The engine-trainer log-prob mismatch and its importance-sampling correction (trainer/rl/logprob_mismatch.py),
rollout.old_logprobs=trainer, and both under CP: loss and gradients at cp=2 equal cp=1."""

import math

import pytest
import torch

from tests.dist import run_distributed
from tests.test_rl import RL_FAST, compose_rl, fixed_rollouts
from trainer.rl.logprob_mismatch import is_weights, mismatch_sums
from trainer.rl.policy_losses import TokenBatch


def _batch(trainer_logp, engine_logp, seq_ids):
    mask = (torch.tensor(seq_ids) >= 0).float()[None]
    lengths = torch.bincount(torch.tensor([s for s in seq_ids if s >= 0]))
    batch = TokenBatch(torch.tensor([trainer_logp]), torch.zeros(1, len(seq_ids)), torch.zeros(1, len(seq_ids)),
                       mask, seq_ids=torch.tensor([seq_ids]), seq_lengths=lengths)
    return batch, torch.tensor([engine_logp])


def test_mismatch_sums_by_hand():
    # d = trainer - engine at the masked tokens: 0.1, -0.2 (the third token is a prompt position)
    batch, engine = _batch([-1.0, -2.0, -5.0], [-1.1, -1.8, -0.1], [0, 0, -1])
    sums = mismatch_sums(batch.logp, engine, batch.mask)
    assert math.isclose(sums["mismatch_abs"], 0.3, rel_tol=1e-6)
    k3 = (math.exp(0.1) - 1 - 0.1) + (math.exp(-0.2) - 1 + 0.2)
    assert math.isclose(sums["mismatch_k3"], k3, rel_tol=1e-5)
    assert math.isclose(sums["mismatch_ratio_max"], math.exp(0.1), rel_tol=1e-6)


@pytest.mark.parametrize("mode,expected", [
    # token log-ratios 1.5, -0.2 | 0.1 ; sequence sums 1.3 | 0.1 ; cap 3 (log 1.0986)
    ("token_truncate", [3.0, math.exp(-0.2), math.exp(0.1)]),
    ("token_mask", [0.0, math.exp(-0.2), math.exp(0.1)]),
    ("sequence_truncate", [3.0, 3.0, math.exp(0.1)]),
    ("sequence_mask", [0.0, 0.0, math.exp(0.1)]),
])
def test_importance_weights_by_hand(mode, expected):
    batch, engine = _batch([-1.0, -2.0, -3.0, -4.0], [-2.5, -1.8, -3.1, 0.0], [0, 0, 1, -1])
    weights, capped = is_weights(batch, engine, mode, cap=3.0)
    assert torch.allclose(weights[0, :3], torch.tensor(expected), atol=1e-6), weights
    assert weights[0, 3] == 0, "no weight outside the completion tokens"
    assert capped == (1 if mode.startswith("token") else 2)


def test_mask_drops_ratios_below_one_over_the_cap():
    batch, engine = _batch([-3.0], [-1.0], [0])  # ratio e^-2 < 1/3
    assert is_weights(batch, engine, "token_mask", cap=3.0)[0].item() == 0.0
    assert math.isclose(is_weights(batch, engine, "token_truncate", cap=3.0)[0].item(), math.exp(-2), rel_tol=1e-6)


def test_is_correction_needs_trainer_old_logprobs():
    from trainer import config
    with pytest.raises(ValueError, match="rollout.old_logprobs=trainer"):
        config.validate_rl(compose_rl(RL_FAST + ["rollout.is_correction=token_truncate"]), 2)
    config.validate_rl(compose_rl(RL_FAST + ["rollout.is_correction=token_truncate", "rollout.old_logprobs=trainer"]),
                       2)


def _grpo_worker(rank, world, overrides):
    """One GRPO backward on fixed rollouts whose engine log-probs are the random-init model's (near-uniform:
    -log vocab) shifted by -0.7, 0 or +0.7 nats per token, so weights fall on both sides of the cap: loss, every
    gradient, the metrics."""
    import torch.distributed as dist

    from trainer import config
    from trainer.engine import build_trainer
    from trainer.rl.training import grpo_backward, micro_batches
    cfg = compose_rl(RL_FAST + overrides)
    trainer = build_trainer(cfg, validate=config.validate_rl)
    vocab = trainer.model.config.vocab_size
    rollouts = fixed_rollouts(len(trainer.tokenizer), seed=11)
    for r in rollouts:
        r.old_logp = [-math.log(vocab) + 0.7 * ((i * 7) % 3 - 1) for i in range(len(r.completion_ids))]
    stats = grpo_backward(cfg, trainer, micro_batches(cfg, trainer, rollouts, pad_id=0))
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in trainer.model.named_parameters()}
    dist.destroy_process_group()
    return stats, grads


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_is_correction_at_cp2_equals_cp1(mode):
    """rollout.old_logprobs=trainer with each correction level: the loss, every gradient and the IS statistics
    at cp=2 (Ulysses; sequence weights summed across the shards) equal cp=1."""
    common = ["model.name=tiny:qwen3", "rollout.old_logprobs=trainer", f"rollout.is_correction={mode}",
              "rollout.is_cap=1.8", "data.micro_batch_size=1", "rollout.prompts_per_step=2"]
    ref_stats, ref_grads = run_distributed(_grpo_worker, 1, common + ["model.cp=1"])[0]
    stats, grads = run_distributed(_grpo_worker, 2, common + ["model.cp=2"])[0]
    assert 0 < ref_stats["is_capped_frac"] < 1, ref_stats  # the cap acts on some tokens, not all
    for key in ("loss", "is_weight_mean", "is_capped_frac", "logp_mismatch_abs_mean", "logp_mismatch_kl"):
        assert math.isclose(stats[key], ref_stats[key], rel_tol=1e-5, abs_tol=1e-7), (key, stats[key], ref_stats[key])
    assert math.isclose(stats["logp_mismatch_ratio_max"], ref_stats["logp_mismatch_ratio_max"], rel_tol=1e-5)
    for name, g in grads.items():  # fp32: CP changes only summation order
        err = (g - ref_grads[name]).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref_grads[name].abs().max().item()), f"{name}: grad max abs err {err:.3g}"


def test_trainer_old_logprobs_make_the_first_ratio_one():
    """old_logprobs=trainer divides by the training forward's own log-probs, detached (bitwise a separate no-grad
    forward: the test below), so the ratio is exactly 1 and no token is clipped; with old_logprobs=engine the same
    rollouts' mismatch is clipped as if it were a policy change."""
    common = ["model.name=tiny:qwen3", "rollout.old_logprobs=trainer", "data.micro_batch_size=1",
              "rollout.prompts_per_step=2", "model.cp=2"]
    stats, _ = run_distributed(_grpo_worker, 2, common)[0]
    assert stats["clip_frac"] == 0.0, stats
    engine = run_distributed(_grpo_worker, 2, common[:1] + common[2:])[0][0]
    assert engine["clip_frac"] > 0, "with old_logprobs=engine the 0.7-nat mismatch is clipped as a policy change"


def _forward_twice_worker(rank, world):
    """The loss path's log-probs with grad (detached) vs a no-grad forward: the same kernels, the same numbers."""
    import torch.distributed as dist

    import cp
    from trainer import config
    from trainer.engine import build_trainer
    from trainer.loss import shard_logprobs
    from trainer.rl.training import micro_batches
    cfg = compose_rl(RL_FAST + ["model.name=tiny:qwen3", "model.cp=2", "data.micro_batch_size=1"])
    trainer = build_trainer(cfg, validate=config.validate_rl)
    (rows, dims), *_ = micro_batches(cfg, trainer, fixed_rollouts(len(trainer.tokenizer), seed=2), pad_id=0)
    batch = cp.setup_cp_params(rows.input_ids, dims, labels=rows.labels, seq_lens=rows.seq_lens)
    with_grad, _ = shard_logprobs(trainer.model, batch, temperature=1.0, entropy=True)
    with torch.no_grad():
        without, _ = shard_logprobs(trainer.model, batch, temperature=1.0)
    dist.destroy_process_group()
    return bool(torch.equal(with_grad.detach(), without))


def test_detached_training_logprobs_equal_a_no_grad_forward_bitwise():
    assert run_distributed(_forward_twice_worker, 2) == [True, True]


def _top_p_worker(rank, world, top_p):
    """Step 1, same weights: the hf engine samples at rollout.top_p; the trainer's CP forward (cp=2, chunked head)
    computes the same tokens' log-probs; returns the mismatch statistics."""
    import torch.distributed as dist

    from trainer import config
    from trainer.engine import build_trainer
    from trainer.rl import grpo
    from trainer.rl.training import grpo_backward, micro_batches
    from trainer.rl.prompts import make_prompts
    from trainer.rl.rollout.base import SamplingSettings
    from trainer.rl.rollout.hf import HFRolloutEngine
    cfg = compose_rl(RL_FAST + ["model.name=tiny:qwen3", "model.cp=2", f"rollout.top_p={top_p}",
                                "rollout.temperature=0.7", "rollout.max_new_tokens=24"])
    trainer = build_trainer(cfg, validate=config.validate_rl)
    engine = HFRolloutEngine(trainer.model, trainer.tokenizer, trainer.device)
    engine.sync(trainer.model, version=0)
    prompts = [p.input_ids for p in make_prompts("add", 2, seed=rank, tokenizer=trainer.tokenizer)]
    groups = engine.sample(prompts, SamplingSettings(n=4, max_new_tokens=24, temperature=0.7, top_p=top_p, seed=rank))
    rollouts = [grpo.Rollout(p, c.token_ids, c.logprobs, 0.0, advantage=0.0) for p, g in zip(prompts, groups)
                for c in g]
    gaps = []  # engine log-prob - the full softmax's at T (teacher-forced on the engine's copy)
    for r in rollouts:
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([r.prompt_ids + r.completion_ids])).logits[0]
        full = torch.log_softmax(logits[len(r.prompt_ids) - 1:-1].float() / 0.7, -1)  # [T, V]
        gaps += (torch.tensor(r.old_logp) - full.gather(-1, torch.tensor(r.completion_ids)[:, None])[:, 0]).tolist()
    parts = [None] * world
    dist.all_gather_object(parts, rollouts)
    stats = grpo_backward(cfg, trainer, micro_batches(cfg, trainer, [r for part in parts for r in part], 0))
    dist.destroy_process_group()
    return {**stats, "nucleus_gap": sum(gaps) / len(gaps)}


def test_top_p_log_probs_are_the_sampled_distributions():
    """rollout.top_p=0.8: the engine samples from the nucleus and reports its renormalised log-probs; the trainer's
    log-probs (policy, old, reference) are of the same nucleus, so at step 1 the engine-trainer mismatch is what
    it is at top_p=1 (fp32, ~1e-7), not p_full / p_nucleus on every token (the full softmax: ~0.1 nats)."""
    full = run_distributed(_top_p_worker, 2, 1.0)[0]
    nucleus = run_distributed(_top_p_worker, 2, 0.8)[0]
    assert full["train_tokens"] > 50 and nucleus["train_tokens"] > 50
    for stats in (full, nucleus):
        assert stats["logp_mismatch_abs_mean"] < 1e-5 and stats["logp_mismatch_ratio_max"] < 1 + 1e-4, stats
    # the engine reports the nucleus's renormalised log-probs (above the full softmax's), not the full softmax's
    gaps = (full["nucleus_gap"], nucleus["nucleus_gap"])
    assert abs(gaps[0]) < 1e-5 and gaps[1] > 1e-2, gaps
