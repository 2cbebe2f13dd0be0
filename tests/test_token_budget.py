"""Token-budget micro-batches and dynamic CP (data.max_tokens_per_rank, model.cp_dynamic; trainer/planning/token_budget.py).

    the plan         every document once, rows within d x budget, the smallest degree, world / d rows per
                     micro-batch, deterministic, balanced (imbalance <= 1.1 on a long-tailed mix), refusals
    SFT numerics     one step's loss and EVERY gradient (FSDP2, fp32): fixed rows at cp=1, fixed rows at static
                     cp, token budget at static cp, dynamic CP; the same documents; lengths that force every
                     degree (world 4, cp 4: degrees 1, 2 and 4); softmax (ulysses, ring) and Gated DeltaNet hybrid
    GRPO numerics    the policy loss and every gradient: static micro-batches vs dynamic, world 2 and 4
    resume           a dynamic run interrupted at step 2 resumes to the uninterrupted curve
    config errors    a budget <= 0, too small for data.seq_len / cp, cp_dynamic without a budget, a two-level style
"""

from __future__ import annotations

import random

import pytest

from tests.dist import run_distributed
from tests.test_rl import RL_FAST, compose_rl, fixed_rollouts
from tests.test_sft import FAST, assert_same_curve, compose_cfg, losses
from trainer.data.packing import PackedLoader
from trainer.planning.token_budget import CostModel, degree_for, plan_step

COST = CostModel(per_token=1.0, per_pair=0.01)


def _long_tailed(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(64, 512) if rng.random() < 0.8 else rng.randint(2048, 8192) for _ in range(count)]


def _assert_valid_plan(plan, lengths, world, degrees, budget):
    """Every document exactly once; each micro-batch's blocks tile the rank positions, aligned, at a degree of
    `degrees`, within degree x budget, at least each document's smallest degree; every rank finds its block."""
    assert sorted(i for mb in plan.micro_batches for row in mb.rows for i in row) == list(range(len(lengths)))
    for mb in plan.micro_batches:
        assert [p for block in mb.blocks for p in block.positions] == list(range(world))
        for block in mb.blocks:
            assert block.degree in degrees
            assert sum(lengths[i] for i in block.docs) <= block.degree * budget
            assert all(degree_for(lengths[i], degrees, budget) <= block.degree for i in block.docs)
    for position in range(world):  # CPSubgroup.slot at degree d is position // d
        assert len(plan.rows_for({d: position // d for d in degrees})) == len(plan.micro_batches)


@pytest.mark.parametrize("world,cp,dynamic", [(4, 4, True), (4, 2, True), (8, 4, True), (4, 4, False)])
def test_plan_places_every_document_once_within_capacity_at_the_smallest_degree(world, cp, dynamic):
    budget = 2048
    degrees = [d for d in range(1, cp + 1) if cp % d == 0] if dynamic else [cp]
    lengths = _long_tailed(60, seed=world * 10 + cp)
    lengths = [min(n, cp * budget) for n in lengths]
    plan = plan_step(lengths, world=world, degrees=degrees, budget=budget, cost=COST)
    _assert_valid_plan(plan, lengths, world, degrees, budget)
    assert plan_step(lengths, world=world, degrees=degrees, budget=budget, cost=COST).micro_batches == plan.micro_batches
    metrics = plan.metrics()
    assert abs(sum(v for k, v in metrics.items() if k.startswith("cp_degree_")) - 1) < 1e-9
    assert metrics["micro_batches"] == len(plan.micro_batches)


def test_random_steps_place_every_document_once_in_blocks_that_tile_the_ranks():
    """Random worlds (cp 1-8 with divisors that do not nest, like 2 and 3 of 6; dp 1-2), budgets, lengths and
    cost models: every document exactly once, blocks tiling the positions at a degree of `degrees`, within
    degree x budget, at least the document's smallest degree; every rank finds one block per micro-batch."""
    rng = random.Random(0)
    for _ in range(500):
        cp, dp = rng.choice([1, 2, 3, 4, 6, 8]), rng.choice([1, 2])
        world, budget = cp * dp, rng.randint(4, 64)
        degrees = [d for d in range(1, cp + 1) if cp % d == 0] if rng.random() < 0.8 else [cp]
        lengths = [rng.randint(1, cp * budget if rng.random() < 0.3 else budget) for _ in range(rng.randint(0, 40))]
        cost = CostModel(per_token=1.0, per_pair=rng.choice([0.0, 0.01]), gathered_per_pass=rng.choice([0, 100, 1e5]),
                         cp_token_elements=rng.choice([0, 1, 50]), ring=rng.random() < 0.5)
        _assert_valid_plan(plan_step(lengths, world=world, degrees=degrees, budget=budget, cost=cost), lengths,
                           world, degrees, budget)


def test_plan_is_balanced_on_a_long_tailed_mix():
    degrees = [1, 2, 4]
    lengths = [min(n, 4 * 2048) for n in _long_tailed(400, seed=1)]
    plan = plan_step(lengths, world=4, degrees=degrees, budget=2048, cost=CostModel.of(
        params=10_000_000, heads=8, head_dim=64, attention_layers=4))
    assert plan.imbalance <= 1.1, plan.imbalance
    static = plan_step(lengths, world=4, degrees=[4], budget=2048, cost=COST)
    assert static.metrics()["cp_degree_4_frac"] == 1.0
    assert plan.metrics()["cp_degree_1_frac"] > 0.1 and plan.metrics()["cp_degree_4_frac"] > 0


def test_plan_edge_cases_and_refusals():
    plan = plan_step([], world=2, degrees=[1, 2], budget=64, cost=COST)  # a step with nothing to train
    assert len(plan.micro_batches) == 1 and plan.micro_batches[0].rows == ((), ())
    assert plan_step([], world=4, degrees=[4], budget=64, cost=COST).micro_batches[0].rows == ((),)
    with pytest.raises(ValueError, match="raise data.max_tokens_per_rank to >= 150"):
        plan_step([300], world=2, degrees=[1, 2], budget=64, cost=COST)
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_step([3], world=2, degrees=[1, 2], budget=0, cost=COST)
    # a full last micro-batch is not required: the spare slots stay empty (those ranks run an empty pass)
    plan = plan_step([10, 10, 10], world=2, degrees=[1, 2], budget=10, cost=COST)
    assert [len([r for r in mb.rows if r]) for mb in plan.micro_batches] == [2, 1]


def test_short_documents_fill_the_spare_room_of_a_longer_micro_batch_when_that_saves_one():
    """120 tokens need both ranks (budget 100): its micro-batch has 80 tokens of room, which holds every short
    document: one micro-batch at degree 2 instead of two. With 90 short tokens nothing moves (no pass saved)."""
    plan = plan_step([120, 30, 30, 20], world=2, degrees=[1, 2], budget=100, cost=COST)
    assert [[(b.degree, b.docs) for b in mb.blocks] for mb in plan.micro_batches] == [[(2, (0, 1, 2, 3))]]
    plan = plan_step([120, 30, 30, 30], world=2, degrees=[1, 2], budget=100, cost=COST)
    assert sorted(mb.blocks[0].degree for mb in plan.micro_batches) == [1, 2]


def test_a_micro_batch_mixes_degrees_so_short_documents_run_whole_beside_a_split_one():
    """World 4, budget 100: 150 tokens need a block of 2 ranks; 90 and 80 run whole on the other two ranks in
    the same micro-batch (rather than in the degree-2 block's spare room, paying its all-to-alls)."""
    plan = plan_step([150, 90, 80], world=4, degrees=[1, 2, 4], budget=100, cost=COST)
    [mb] = plan.micro_batches
    assert sorted((b.degree, b.docs) for b in mb.blocks) == [(1, (1,)), (1, (2,)), (2, (0,))]
    assert plan.metrics()["cp_degree_1_frac"] == 170 / 320
    # each rank finds its own block: positions 0-1 hold the degree-2 block, 2 and 3 one degree-1 block each
    block = next(b for b in mb.blocks if b.degree == 2)
    ranks = {p: plan.rows_for({1: p, 2: p // 2, 4: 0})[0] for p in range(4)}
    assert ranks[block.positions[0]] == ranks[block.positions[1]] == (2, (0,))
    assert sorted(ranks[p] for p in range(4) if p not in block.positions) == [(1, (1,)), (1, (2,))]


def test_a_pass_is_saved_only_when_the_moved_tokens_cp_communication_costs_less_than_its_all_gathers():
    """World 2, budget 100: 120 tokens need both ranks (80 tokens of room); 40 + 40 fit that room. Moving them
    saves a pass (its all-gathers: half of gathered_per_pass per rank) but makes their 80 tokens pay the
    all-to-alls (80 / 2 tokens per rank x cp_token_elements x 1/2)."""
    cheap_comm = CostModel(per_token=1.0, per_pair=0.0, gathered_per_pass=1000.0, cp_token_elements=1.0)
    plan = plan_step([120, 40, 40], world=2, degrees=[1, 2], budget=100, cost=cheap_comm)
    assert [[(b.degree, b.docs) for b in mb.blocks] for mb in plan.micro_batches] == [[(2, (0, 1, 2))]]
    dear_comm = CostModel(per_token=1.0, per_pair=0.0, gathered_per_pass=1000.0, cp_token_elements=100.0)
    plan = plan_step([120, 40, 40], world=2, degrees=[1, 2], budget=100, cost=dear_comm)
    assert sorted(sorted((b.degree, b.docs) for b in mb.blocks) for mb in plan.micro_batches) == [
        [(1, (1,)), (1, (2,))], [(2, (0,))]]  # the short documents whole, one per rank, in their own pass
    assert dear_comm.cp_elements(80, 2) == 2000.0 and dear_comm.pass_elements(2) == 500.0
    assert CostModel.of(params=10, heads=4, head_dim=8, attention_layers=1, kv_heads=2, mixer_layers=3,
                        style="ring").cp_elements(80, 4) == 80 / 4 * 3 * (3 * 2 * 2 * 8) * 3  # shard x (d-1) x KV+dKV x layers


def test_a_pass_that_would_leave_ranks_idle_spreads_its_short_documents_over_them():
    plan = plan_step([300, 50, 50, 50, 50, 50, 50], world=4, degrees=[1, 2, 4], budget=100, cost=COST)
    assert len(plan.micro_batches) == 2
    short = next(mb for mb in plan.micro_batches if mb.blocks[0].degree == 1)
    assert sorted(len(b.docs) for b in short.blocks) == [1, 1, 2, 2]


# ---------------------------------------------------------------- SFT: one step's loss and every gradient

SFT_SEQ = 256


def _sft_docs(vocab: int, seed: int = 0):
    """Documents whose lengths force every degree at cp=4 with a budget of 64 tokens per rank: > 128 tokens
    (degree 4), 65..128 (degree 2), <= 64 (degree 1); next-fit rows of 256 tokens hold them in order."""
    from trainer.data.chat import TokenizedDoc

    rng = random.Random(seed)
    lengths = [17, 58, 30, 182, 57, 196, 90, 88, 238, 100, 79, 146, 164, 98, 250, 50]
    return [TokenizedDoc([rng.randrange(vocab) for _ in range(n)], [i > 2 for i in range(n)]) for n in lengths]


def _sft_grad_worker(rank, world, overrides, grad_accum):
    import torch.distributed as dist

    from trainer import config
    from trainer.engine import build_trainer
    from trainer.sft import backward_on_shards, fixed_row_shards, token_budget_shards
    from trainer.data.tokenizer import pad_token_id

    cfg = compose_cfg(FAST + [f"data.seq_len={SFT_SEQ}", f"optim.grad_accum={grad_accum}"] + overrides)
    trainer = build_trainer(cfg, validate=config.validate_sft)
    pad = pad_token_id(trainer.tokenizer)
    loader = PackedLoader(_sft_docs(len(trainer.tokenizer)), seq_len=SFT_SEQ, micro_batch_size=1,
                          dp_rank=trainer.dims.dp_rank, dp_size=trainer.dims.dp, pad_token_id=pad)
    shards, extra = (token_budget_shards if trainer.budget else fixed_row_shards)(trainer, loader, pad)
    loss, tokens = backward_on_shards(trainer, shards)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in trainer.model.named_parameters()}
    dist.destroy_process_group()
    return loss, tokens, grads, extra


def _assert_same_step(ref, got, what):
    (ref_loss, ref_tokens, ref_grads, _), (loss, tokens, grads, _) = ref, got
    assert tokens == ref_tokens, (what, tokens, ref_tokens)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (what, loss, ref_loss)
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for name, g in grads.items():  # fp32: only the order of sums changes
        err = float((g - ref_grads[name]).abs().max())
        assert err <= 1e-5 * scale, f"{what}: {name} differs by {err:.3g} (largest gradient {scale:.3g})"


@pytest.mark.parametrize("model,style,world,mixer_cp", [
    ("tiny_qwen3", "ulysses", 4, "ulysses"),
    ("tiny_qwen3_5", "ulysses", 4, "ulysses"),
    ("tiny_qwen3_5", "ulysses", 4, "state"),  # state-passing mixers in every sub-degree group
    pytest.param("tiny_qwen3", "ring", 2, "ulysses", marks=pytest.mark.slow),
    pytest.param("tiny_qwen3_5", "ulysses", 2, "ulysses", marks=pytest.mark.slow),
    pytest.param("tiny_qwen3", "hybrid", 4, "ulysses", marks=pytest.mark.slow),  # a token budget at static cp only
])
def test_sft_step_loss_and_gradients_equal_static_cp_and_cp1(model, style, world, mixer_cp):
    """The step's documents: 4 rows of 256 tokens (world 4: one row per dp rank at cp=1, grad_accum 4 at cp=4;
    world 2: 2 rows per rank / grad_accum 2 x 2); budget 64 (world 4) / 128 (world 2) tokens per rank."""
    base = [f"model={model}", f"model.cp_style={style}", f"model.mixer_cp={mixer_cp}"]
    base += ["model.cp_ulysses=2"] if style == "hybrid" else []
    rows = 4
    budget = SFT_SEQ // world
    cp1 = ["model.cp=1", "model.cp_style=ulysses", "model.cp_ulysses=null"]
    ref = run_distributed(_sft_grad_worker, world, base + cp1, rows // world)[0]
    static = run_distributed(_sft_grad_worker, world, base + [f"model.cp={world}"], rows)[0]
    budgeted = run_distributed(_sft_grad_worker, world, base + [f"model.cp={world}",
                                                                f"data.max_tokens_per_rank={budget}"], rows)[0]
    assert budgeted[3][f"cp_degree_{world}_frac"] == 1.0
    step_docs = PackedLoader(_sft_docs(vocab=256), seq_len=SFT_SEQ).next_step_docs(rows)
    assert ref[3]["step_tokens"] == sum(len(doc) for doc in step_docs) < rows * SFT_SEQ  # rows are padded
    runs = [("static cp", static), ("token budget", budgeted)]
    if style != "hybrid":  # dynamic degrees need a one-level style
        dynamic = run_distributed(_sft_grad_worker, world, base + [f"model.cp={world}", "model.cp_dynamic=true",
                                                                   f"data.max_tokens_per_rank={budget}"], rows)[0]
        ran = {k for k, v in dynamic[3].items() if k.startswith("cp_degree_") and v > 0}
        assert ran == {f"cp_degree_{d}_frac" for d in range(1, world + 1) if world % d == 0}, dynamic[3]
        runs.append(("dynamic cp", dynamic))
    for what, got in runs:
        _assert_same_step(ref, got, f"{model} {style} world {world} {what} vs cp=1")
        assert got[3]["step_tokens"] == ref[3]["step_tokens"], what  # tokens_per_s: documents, not padding


# ---------------------------------------------------------------- GRPO: the policy loss and every gradient


def _rollouts(vocab: int, rank: int):
    """This rank's rollouts: prompt + completion lengths from 9 to ~180, so that at a budget of 256 / world
    tokens per rank they need degrees 1 and 2 (world 2) and 1, 2 and 4 (world 4)."""
    return fixed_rollouts(vocab, 100 + rank, count=8, prompt_lengths=(5, 10, 20, 120),
                          completion_lengths=(4, 60))


def _grpo_grad_worker(rank, world, overrides):
    import torch.distributed as dist

    from trainer import config
    from trainer.engine import build_trainer
    from trainer.rl.training import gather_cp_group, grpo_backward, micro_batches, token_budget_micro_batches

    cfg = compose_rl(RL_FAST + overrides)
    trainer = build_trainer(cfg, validate=config.validate_rl)
    mine = _rollouts(len(trainer.tokenizer), rank)
    if trainer.budget:
        batches, extra = token_budget_micro_batches(cfg, trainer, mine, pad_id=0)
    else:  # the static path: cp=world (dp=1) gathers every rank's rollouts in the cp group
        batches, extra = micro_batches(cfg, trainer, gather_cp_group(mine, trainer), pad_id=0), {}
    stats = grpo_backward(cfg, trainer, batches)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in trainer.model.named_parameters()}
    dist.destroy_process_group()
    return stats["loss"], stats["train_tokens"], grads, extra


@pytest.mark.parametrize("model,norm,world", [("tiny:qwen3", "token", 2), ("tiny:qwen3_5", "sequence", 4)])
def test_grpo_loss_and_gradients_dynamic_equal_static(model, norm, world):
    common = [f"model.name={model}", f"loss.normalization={norm}", "data.micro_batch_size=1",
              f"rollout.prompts_per_step={world}", f"model.cp={world}", "model.cp_style=ulysses"]
    static = run_distributed(_grpo_grad_worker, world, common)[0]
    dynamic = run_distributed(_grpo_grad_worker, world, common + ["model.cp_dynamic=true",
                                                                   f"data.max_tokens_per_rank={256 // world}"])[0]
    assert dynamic[3]["cp_degree_1_frac"] > 0 and dynamic[3]["cp_degree_2_frac"] > 0, dynamic[3]
    _assert_same_step(static, dynamic, f"GRPO {model} world {world} dynamic vs static")


# ---------------------------------------------------------------- resume and config errors

DYNAMIC = ["model=tiny_qwen3", "model.cp_style=ulysses", "model.cp_dynamic=true", "data.max_tokens_per_rank=96",
           "data.micro_batch_size=2"]


def test_dynamic_run_resumes_to_the_uninterrupted_curve(tmp_path):
    import shutil

    base = FAST + DYNAMIC + ["checkpoint.every=2"]
    full = losses(2, base + [f"output_dir={tmp_path}/full"])
    split = tmp_path / "split"
    (split / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_000002", split / "checkpoints" / "step_000002")
    (split / "checkpoints" / "latest").write_text("step_000002")
    resumed = losses(2, base + ["resume=true", f"output_dir={split}"])
    assert_same_curve(resumed, full[2:4] + full[6:8], "dynamic CP resumed at step 2 (losses, grad norms)")
    static = losses(2, FAST + ["model=tiny_qwen3", "model.cp_style=ulysses", "data.micro_batch_size=2",
                               f"output_dir={tmp_path}/static"])
    assert_same_curve(full, static, "dynamic CP vs static CP over 4 steps")


@pytest.mark.parametrize("overrides,match", [
    (["data.max_tokens_per_rank=0"], "data.max_tokens_per_rank=0 must be >= 1"),
    (["data.max_tokens_per_rank=50"], r"cannot hold a data.seq_len=192 document on model.cp=2 ranks: raise it to >= 96"),
    (["model.cp_dynamic=true"], "set data.max_tokens_per_rank too"),
    (["model=tiny_qwen3", "model.cp_style=hybrid", "model.cp_ulysses=1", "model.cp_dynamic=true",
      "data.max_tokens_per_rank=96"], "use model.cp_style=ulysses or ring"),
])
def test_bad_token_budget_configs_fail_at_startup(overrides, match):
    """validate_sft runs before any collective (build_trainer; tests/test_sft.py shows the whole path)."""
    from trainer import config
    with pytest.raises(ValueError, match=match):
        config.validate_sft(compose_cfg(FAST + overrides), 2)
