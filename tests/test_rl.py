"""GRPO: advantages, the clipped objective, packing, loss+gradient at cp=2 == cp=1, a short run."""

import json
import math
import random

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.dist import run_distributed
from tests.test_sft import ROOT
from trainer.rl import grpo

RL_FAST = ["model.name=tiny:qwen3_5", "model.tiny_hidden_size=64", "model.tiny_layers=2", "max_steps=2",
           "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=12", "rollout.eval_prompts=0",
           "data.seq_len=256", "checkpoint.export_hf=false", "wandb.mode=disabled", "timeout_s=60"]


def compose_rl(overrides):
    from trainer import config
    config.register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("rl", overrides=overrides)


def test_group_advantages_on_hand_made_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    centred = grpo.group_advantages(rewards, 4, scale=False)
    assert torch.allclose(centred, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    scaled = grpo.group_advantages(rewards, 4, scale=True)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    assert torch.allclose(scaled[:4], centred[:4] / (std + 1e-6), atol=1e-6)
    assert torch.equal(scaled[4:], torch.zeros(4)), "a group with equal rewards has no advantage"
    with pytest.raises(ValueError, match="groups of 3"):
        grpo.group_advantages(rewards, 3)


def test_clipped_objective_and_kl():
    logp = torch.tensor([0.0, math.log(2.0), math.log(0.5), math.log(2.0)])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped, kl = grpo.grpo_token_loss(logp, old, adv, clip_low=0.2, clip_high=0.3)
    # ratio 1: -A; ratio 2, A>0: clipped at 1.3; ratio 0.5, A<0: clipped at 0.8; ratio 2, A<0: unclipped 2
    assert torch.allclose(loss, torch.tensor([-1.0, -1.3, 0.8, 2.0]))
    assert clipped.tolist() == [False, True, True, False]
    assert torch.equal(kl, torch.zeros(4))
    _, _, kl = grpo.grpo_token_loss(logp, old, adv, clip_low=0.2, clip_high=0.3, ref_logp=old, kl_coef=0.1)
    assert (kl >= 0).all() and kl[0] == 0 and kl[1] > 0


def test_pack_rollouts_labels_only_completions_and_normalises_sequences():
    rollouts = [grpo.Rollout([1, 2, 3], [7, 8], [-0.5, -0.25], 1.0, advantage=0.5),
                grpo.Rollout([4, 5], [9, 10, 11, 12], [-1.0] * 4, 0.0, advantage=-0.5)]
    (rows,) = grpo.pack_rollouts(rollouts, seq_len=16, rows_per_batch=1, pad_id=0, sequence_norm=True)
    assert rows.seq_lens == [[5, 6, 5]]
    assert rows.labels[0, :11].tolist() == [-100, -100, 7, 8, -100, -100, 9, 10, 11, 12, -100]
    assert rows.old_logp[0, 2:4].tolist() == [-0.5, -0.25]
    assert rows.advantages[0, 6:10].tolist() == [-0.5] * 4
    assert math.isclose(float(rows.weights[0, :5].sum()), 1.0) and math.isclose(float(rows.weights[0, 5:].sum()), 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        grpo.pack_rollouts(rollouts, seq_len=4, rows_per_batch=1, pad_id=0, sequence_norm=False)


def fixed_rollouts(vocab: int, seed: int = 0, *, count: int = 6, prompt_lengths=None,
                   completion_lengths=(1, 15)) -> list:
    """`count` random rollouts: prompt lengths in [5, 20] (or drawn from `prompt_lengths`), completion lengths
    in the `completion_lengths` range, random old log-probs and advantages."""
    rng = random.Random(seed)
    rollouts = []
    for _ in range(count):
        length = rng.choice(prompt_lengths) if prompt_lengths else rng.randint(5, 20)
        prompt = [rng.randrange(vocab) for _ in range(length)]
        completion = [rng.randrange(vocab) for _ in range(rng.randint(*completion_lengths))]
        rollouts.append(grpo.Rollout(prompt, completion, [-rng.random() * 3 for _ in completion], 0.0,
                                     advantage=rng.uniform(-1, 1)))
    return rollouts


def multi_turn_rollouts(vocab: int, seed: int = 0, *, count: int = 6) -> list:
    """`count` random multi-turn trajectories: a prompt, then 3 sampled turns with environment replies between them
    (no loss: masked spans in the MIDDLE of each document), per-token versions, grouped by prompt."""
    rng = random.Random(seed)
    rollouts = []
    for i in range(count):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(5, 20))]
        ids, mask = [], []
        for turn in range(3):
            if turn:
                reply = rng.randint(4, 25)
                ids += [rng.randrange(vocab) for _ in range(reply)]
                mask += [False] * reply
            sampled = rng.randint(3, 18)
            ids += [rng.randrange(vocab) for _ in range(sampled)]
            mask += [True] * sampled
        rollouts.append(grpo.Rollout(prompt, ids, [-rng.random() * 3 if m else 0.0 for m in mask], 0.0,
                                     advantage=rng.uniform(-1, 1), loss_mask=mask,
                                     token_versions=[0 if m else -1 for m in mask], group=i // 2))
    return rollouts


def _loss_grad_worker(rank, world, overrides, multi_turn=False):
    from trainer.engine import build_trainer
    from trainer.rl.training import grpo_backward, micro_batches
    from trainer import config
    cfg = compose_rl(RL_FAST + overrides)
    trainer = build_trainer(cfg, validate=config.validate_rl)
    make = multi_turn_rollouts if multi_turn else fixed_rollouts
    batches = micro_batches(cfg, trainer, make(len(trainer.tokenizer)), pad_id=0)
    stats = grpo_backward(cfg, trainer, batches)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in trainer.model.named_parameters()}
    import torch.distributed as dist
    dist.destroy_process_group()
    return stats["loss"], grads


@pytest.mark.parametrize("model,style,norm", [("tiny:qwen3", "ulysses", "token"), ("tiny:qwen3", "ring", "sequence"),
                                              ("tiny:qwen3_5", "ulysses", "sequence")])
def test_grpo_loss_and_gradient_at_cp2_equal_cp1(model, style, norm):
    common = [f"model.name={model}", f"loss.normalization={norm}", "loss.kl_coef=0.05", "data.micro_batch_size=1",
              "rollout.prompts_per_step=2"]
    ref_loss, ref_grads = run_distributed(_loss_grad_worker, 1, common + ["model.cp=1"])[0]
    loss, grads = run_distributed(_loss_grad_worker, 2, common + ["model.cp=2", f"model.cp_style={style}"])[0]
    # fp32: CP changes only summation order; a wrong normaliser or leaked document is O(1e-2) or more
    _close(loss, grads, ref_loss, ref_grads)


def _close(loss, grads, ref_loss, ref_grads) -> None:
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), (loss, ref_loss)
    for name, g in grads.items():
        err = (g - ref_grads[name]).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref_grads[name].abs().max().item()), f"{name}: grad max abs err {err:.3g}"


_MULTI_TURN_REFERENCE = {}


@pytest.mark.parametrize("world,style,norm", [(2, "ulysses", "token"), (2, "ring", "sequence"),
                                              (4, "ulysses", "sequence"), (4, "hybrid", "token")])
def test_multi_turn_grpo_loss_and_gradient_under_cp_equal_cp1(world, style, norm):
    """Trajectories with environment replies (masked spans mid-document) packed into rows whose documents cross the
    CP shard boundaries: loss and every gradient at cp 2 / 4, ulysses / ring / hybrid equal cp=1 (fp32)."""
    common = ["model.name=tiny:qwen3", f"loss.normalization={norm}", "loss.kl_coef=0.05", "data.micro_batch_size=1",
              f"rollout.prompts_per_step={world}"]
    if norm not in _MULTI_TURN_REFERENCE:
        _MULTI_TURN_REFERENCE[norm] = run_distributed(_loss_grad_worker, 1, common + ["model.cp=1"], True)[0]
    ref_loss, ref_grads = _MULTI_TURN_REFERENCE[norm]
    extra = ["model.cp_ulysses=2"] if style == "hybrid" else []
    loss, grads = run_distributed(_loss_grad_worker, world,
                                  common + [f"model.cp={world}", f"model.cp_style={style}", *extra], True)[0]
    _close(loss, grads, ref_loss, ref_grads)


def test_environment_tokens_carry_no_loss():
    """Packing a multi-turn trajectory: labels, old log-probs, weights and versions only where the token was
    sampled; sequence normalisation counts sampled tokens only."""
    [r] = multi_turn_rollouts(64, count=1)
    (rows,) = grpo.pack_rollouts([r], seq_len=256, rows_per_batch=1, pad_id=0, sequence_norm=True)
    p = len(r.prompt_ids)
    for i, sampled in enumerate(r.loss_mask):
        position = p - 1 + i
        assert (rows.labels[0, position].item() != -100) == sampled
        assert rows.weights[0, position].item() == (pytest.approx(1 / sum(r.loss_mask)) if sampled else 0.0)
        assert rows.versions[0, position].item() == (0 if sampled else -1)
    assert rows.seq_lengths.tolist() == [sum(r.loss_mask)]


def _run_worker(rank, world, overrides):
    from trainer.rl.loop import run_rl
    return run_rl(compose_rl(RL_FAST + overrides))


def test_short_grpo_run_writes_metrics_and_samples(tmp_path):
    history = run_distributed(_run_worker, 2, [f"output_dir={tmp_path}", "loss.kl_coef=0.01"], timeout=600)[0]
    assert [h["step"] for h in history] == [1, 2]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward_mean", "loss", "reward_correctness", "reward_format", "clip_frac", "kl", "entropy",
                "completion_len_mean", "adv_std", "tokens_per_s", "step_time_s", "peak_mem_gb"):
        assert all(isinstance(line[key], (int, float)) and math.isfinite(line[key]) for line in lines), key
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "completion", "answer", "reward"} <= set(samples[0])


def test_a_multi_turn_grpo_run_logs_its_episodes(tmp_path):
    """rollout.env=guess_number on the hf engine at cp=2: episode metrics per step, and rollouts.jsonl holds each
    logged episode as trained (ids, loss mask, log-probs and versions aligned; sampled tokens at the step's
    version; environment tokens with none)."""
    overrides = [f"output_dir={tmp_path}", "rollout.env=guess_number", "rollout.max_turns=3",
                 "rollout.max_new_tokens=8", "rollout.eval_prompts=2", "rollout.log_episodes=3",
                 "reward.functions=[format]", "reward.weights=[0.1]", "rollout.truncated=overlong_penalty"]
    history = run_distributed(_run_worker, 2, overrides, timeout=600)[0]
    for h in history:
        for key in ("turns_mean", "env_token_frac", "truncated_frac", "episode_len_mean", "episode_len_max",
                    "episodes_dropped", "reward_env_solved", "reward_env_efficiency", "reward_format"):
            assert isinstance(h[key], (int, float)) and math.isfinite(h[key]), key
        assert h["turns_mean"] >= 1 and h["episodes_dropped"] == 0
    episodes = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert [e["step"] for e in episodes] == [1, 1, 1, 2, 2, 2]
    for e in episodes:
        n = len(e["token_ids"])
        assert n == len(e["loss_mask"]) == len(e["logprobs"]) == len(e["versions"]) and any(e["loss_mask"])
        assert all(v == e["step"] - 1 for v, m in zip(e["versions"], e["loss_mask"]) if m)
        assert all(v == -1 and lp == 0.0 for v, lp, m in zip(e["versions"], e["logprobs"], e["loss_mask"]) if not m)
        assert e["messages"][0]["role"] == "system" and e["task"] == "guess_number"
        assert set(e["reward_parts"]) == {"format", "env_solved", "env_efficiency"}
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    for e in evals:  # the score is the mean total reward: its parts, weighted (format: reward.weights=[0.1])
        assert {"reward_env_solved", "reward_env_efficiency", "reward_format"} <= set(e)
        total = e["reward_env_solved"] + e["reward_env_efficiency"] + 0.1 * e["reward_format"]
        assert e["accuracy"] == pytest.approx(total)


def test_missing_sft_checkpoint_is_named():
    from trainer.rl.loop import check_init_model
    with pytest.raises(ValueError, match="run the SFT default first"):
        check_init_model(compose_rl(["model.name=outputs/does_not_exist/hf"]))


def _direction_worker(rank, world):
    """One GRPO step raises the log-likelihood of positive-advantage completions and lowers the others."""
    from trainer import config
    from trainer.engine import build_trainer, optimizer_step
    from trainer.loss import token_logprobs
    from trainer.rl.training import grpo_backward, micro_batches
    import cp
    import torch.distributed as dist
    cfg = compose_rl(RL_FAST + ["model.name=tiny:qwen3", "model.cp=2", "optim.lr=1e-3", "optim.warmup_steps=0",
                                "optim.grad_clip=0"])
    trainer = build_trainer(cfg, validate=config.validate_rl)
    rollouts = fixed_rollouts(len(trainer.tokenizer), seed=3)
    for i, r in enumerate(rollouts):
        r.advantage = 1.0 if i % 2 == 0 else -1.0
        r.old_logp = [0.0] * len(r.completion_ids)  # unused at ratio 1 except through clipping: keep it off
    cfg.loss.clip_eps_low = cfg.loss.clip_eps_high = 1e9

    def seq_logp():
        out = []
        for r in rollouts:
            ((rows, _),) = micro_batches(cfg, trainer, [r], pad_id=0)
            batch = cp.setup_cp_params(rows.input_ids, trainer.dims, labels=rows.labels, seq_lens=rows.seq_lens)
            with torch.no_grad():
                logits = trainer.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                       cp_params=batch.params).logits
            logp, _ = token_logprobs(logits, batch.labels, 1.0)
            total = (logp * (batch.labels != -100)).sum()
            dist.all_reduce(total, group=trainer.dims.cp_group)
            out.append(float(total))
        return out

    before = seq_logp()
    grpo_backward(cfg, trainer, micro_batches(cfg, trainer, rollouts, pad_id=0))
    optimizer_step(trainer)
    after = seq_logp()
    dist.destroy_process_group()
    return [a - b for a, b in zip(after, before)]


def test_grpo_step_moves_likelihood_in_the_direction_of_the_advantage():
    deltas = run_distributed(_direction_worker, 2)[0]
    assert all(d > 0 for d in deltas[0::2]), deltas
    assert all(d < 0 for d in deltas[1::2]), deltas
