"""Policy losses (trainer/rl/policy_losses.py): each against a hand-computed case, each at cp=2 == cp=1 (loss and
gradients, real gloo ranks), and the per-loss defaults (advantage scaling, dropping all-equal-reward groups)."""

import math
import random

import pytest
import torch
from omegaconf import OmegaConf

from tests.dist import run_distributed
from tests.test_rl import RL_FAST, compose_rl, fixed_rollouts
from trainer import config
from trainer.rl import grpo, policy_losses
from trainer.rl.policy_losses import POLICY_LOSSES, LossSettings, TokenBatch

SETTINGS = LossSettings(clip_low=0.2, clip_high=0.3)


def two_sequences():
    """Sequence 0: 2 tokens, logp - old = [log 2, 0], A = +1. Sequence 1: 3 tokens, [log 0.5, 0, 0], A = -1.
    One row [1, 6]: a prompt position (no label) first."""
    logp = torch.tensor([[0.0, math.log(2.0), 0.0, math.log(0.5), 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1, 1, 1, 1, 1]])
    adv = torch.tensor([[0.0, 1, 1, -1, -1, -1]])
    seq_ids = torch.tensor([[-1, 0, 0, 1, 1, 1]])
    return TokenBatch(logp, torch.zeros_like(logp), adv, mask, seq_ids=seq_ids, seq_lengths=torch.tensor([2, 3]))


def step_loss(name: str, batch: TokenBatch, cfg) -> torch.Tensor:
    """The trainer's reduction on one rank: weights as packed, N from the loss's normaliser."""
    loss = POLICY_LOSSES[name]
    lengths = batch.seq_lengths[batch.seq_ids.clamp(min=0)].float()
    weights = (1.0 / lengths if loss.uses_sequence_weights(cfg) else torch.ones_like(lengths)) * batch.mask
    token_loss, _ = loss.token_loss(batch, SETTINGS)
    return policy_losses.rank_loss(token_loss, weights, batch.mask, loss.normalizer(float(weights.sum()), cfg))


def loss_cfg(**rollout):
    return OmegaConf.create({"loss": {"normalization": "token", "scale_advantages": True, "type": "grpo"},
                             "rollout": {"prompts_per_step": 1, "group_size": 2, "max_new_tokens": 4,
                                         "skip_zero_advantage": None, **rollout}})


# per-token losses: seq 0: ratio 2 clipped at 1.3 -> -1.3, ratio 1 -> -1; seq 1: ratio 0.5, A < 0: the clipped
# 0.8 is the min -> 0.8, ratio 1 -> 1, 1; the sum is 0.5 over 5 tokens.
# gspo: s_0 = exp(log 2 / 2) = 1.414 clipped at 1.3 -> -1.3; s_1 = 0.5 ** (1/3) = 0.794 < 0.8, A < 0 -> 0.8
@pytest.mark.parametrize("name,expected", [
    ("grpo", 0.5 / 5),
    ("dr_grpo", 0.5 / (1 * 2 * 4)),  # constant N = prompts_per_step * group_size * max_new_tokens
    ("dapo", 0.5 / 5),
    ("gspo", (-1.3 + 0.8) / 2),  # mean over the 2 sequences
])
def test_each_loss_matches_a_hand_computed_case(name, expected):
    assert step_loss(name, two_sequences(), loss_cfg()).item() == pytest.approx(expected, abs=1e-6)


def test_grpo_sequence_normalisation_and_gspo_gradient_by_hand():
    cfg = loss_cfg()
    cfg.loss.normalization = "sequence"
    # grpo sequence: seq 0 mean (-1.3 - 1) / 2, seq 1 mean (0.8 + 1 + 1) / 3, averaged over 2 sequences
    assert step_loss("grpo", two_sequences(), cfg).item() == pytest.approx(((-2.3 / 2) + (2.8 / 3)) / 2, abs=1e-6)
    # gspo, unclipped sequence (wide clip): loss_0 = -s_0 A / 2 with s_0 = exp(mean log-ratio), so
    # d loss / d logp_t = -s_0 / (2 * 2) for each of its 2 tokens (every token gets the sequence's gradient)
    batch = two_sequences()
    token_loss, _ = POLICY_LOSSES["gspo"].token_loss(batch, LossSettings(clip_low=0.9, clip_high=10.0))
    lengths = batch.seq_lengths[batch.seq_ids.clamp(min=0)].float()
    policy_losses.rank_loss(token_loss, batch.mask / lengths, batch.mask, 2.0).backward()
    s0, s1 = math.sqrt(2.0), 0.5 ** (1 / 3)
    expected = [0.0, -s0 / 4, -s0 / 4, s1 / 6, s1 / 6, s1 / 6]
    assert batch.logp.grad[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_grpo_entry_is_the_old_function():
    batch = two_sequences()
    loss, stats = POLICY_LOSSES["grpo"].token_loss(batch, SETTINGS)
    old, clipped, _ = grpo.grpo_token_loss(batch.logp, batch.old_logp, batch.advantages, clip_low=0.2, clip_high=0.3)
    assert torch.equal(loss, old) and torch.equal(stats["clipped"], clipped)


def test_loss_defaults_for_advantage_scaling_and_zero_advantage_groups():
    from trainer.rl.training import drop_zero_advantage_groups
    cfg = loss_cfg()
    assert policy_losses.scale_advantages(cfg) and not policy_losses.skip_zero_advantage(cfg)
    cfg.loss.type = "dr_grpo"
    assert not policy_losses.scale_advantages(cfg), "Dr. GRPO never divides by the group std"
    cfg.loss.type = "dapo"
    assert policy_losses.skip_zero_advantage(cfg), "DAPO drops all-equal-reward groups by default"
    rollouts = [grpo.Rollout([1], [2], [0.0], reward) for reward in (1.0, 1.0, 0.0, 1.0, 0.5, 0.5)]
    kept, groups, dropped = drop_zero_advantage_groups(cfg, rollouts)
    assert [r.reward for r in kept] == [0.0, 1.0] and (groups, dropped) == (3, 2)
    cfg.rollout.skip_zero_advantage = False
    assert drop_zero_advantage_groups(cfg, rollouts) == (rollouts, 0, 0)


@pytest.mark.parametrize("overrides,match", [
    (["loss.type=ppo"], r"loss.type='ppo': choose one of grpo, dr_grpo, dapo, gspo"),
    (["loss.type=gspo", "loss.normalization=sequence"], r"only used by loss.type=grpo; loss.type=gspo fixes"),
])
def test_config_refuses_unknown_losses_and_unused_normalisation(overrides, match):
    with pytest.raises(ValueError, match=match):
        config.validate_rl(compose_rl(RL_FAST + overrides), 2)


def _loss_grad_worker(rank, world, overrides):
    import torch.distributed as dist

    from trainer.engine import build_trainer
    from trainer.rl.training import build_reference, grpo_backward, micro_batches
    cfg = compose_rl(RL_FAST + overrides)
    trainer = build_trainer(cfg, validate=config.validate_rl)
    vocab = len(trainer.tokenizer)
    rollouts = fixed_rollouts(vocab, seed=5)
    rng = random.Random(1)
    for i, r in enumerate(rollouts):  # old log-probs near the random model's (ratio ~ 1, gradients flow); every
        # other sequence pushed past the clip on its advantage's side (clipped: no surrogate gradient)
        offset = -0.5 * math.copysign(1.0, r.advantage) if i % 2 == 0 else 0.0
        r.old_logp = [-math.log(vocab) + offset + rng.uniform(-0.2, 0.2) for _ in r.completion_ids]
    ref_model = build_reference(cfg, trainer)  # loss.kl_coef > 0: the KL path too
    stats = grpo_backward(cfg, trainer, micro_batches(cfg, trainer, rollouts, pad_id=0), ref_model)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in trainer.model.named_parameters()}
    dist.destroy_process_group()
    return stats, grads


# grpo: tests/test_rl.py. gspo on ring: its zigzag layout splits each sequence into non-contiguous pieces
@pytest.mark.parametrize("loss,style", [("dr_grpo", "ulysses"), ("dapo", "ring"), ("gspo", "ring")])
def test_loss_and_gradient_at_cp2_equal_cp1(loss, style):
    # seq_len 64 and 2 rows per micro-batch: several rows and micro-batches, sequences split across cp ranks
    common = ["model.name=tiny:qwen3", f"loss.type={loss}", "loss.kl_coef=0.05", "data.seq_len=64",
              "data.micro_batch_size=2"]
    ref_stats, ref_grads = run_distributed(_loss_grad_worker, 1, common + ["model.cp=1"])[0]
    stats, grads = run_distributed(_loss_grad_worker, 2, common + ["model.cp=2", f"model.cp_style={style}"])[0]
    assert 0 < ref_stats["clip_frac"] < 1, "the case should clip some tokens and not others"
    assert abs(stats["loss"] - ref_stats["loss"]) <= 1e-5 * max(1.0, abs(ref_stats["loss"])), (stats, ref_stats)
    assert stats["clip_frac"] == pytest.approx(ref_stats["clip_frac"], abs=1e-9)
    assert any(g.abs().max() > 0 for g in ref_grads.values())
    for name, g in grads.items():
        ref = ref_grads[name]
        err = (g - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"{name}: grad max abs err {err:.3g}"
