"""LoRA (model.lora.*, models/adapters/lora.py) under CP: loss and every adapter gradient at cp=2 (ulysses, ring)
and world 4 (hybrid 2x2) equal cp=1 on packed documents (Qwen3 and the Qwen3.5 DeltaNet hybrid, mixer projections
adapted), the same for the GRPO loss; the base never changes (bitwise); dtypes and AdamW state; adapter-only
checkpoints and resume; the PEFT export reloads with peft and gives the trainer's logits; startup refusals."""

from __future__ import annotations

import json
import zlib

import pytest
import torch

from tests.dist import run_distributed
from tests.test_rl import RL_FAST, compose_rl, fixed_rollouts
from tests.test_sft import FAST, compose_cfg

pytest.importorskip("peft", reason="LoRA needs peft: pip install -e '.[lora]'")

LORA = ["model.lora.rank=4", "model.lora.alpha=8"]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _set_adapters(model) -> None:
    """Non-zero lora_A and lora_B, the same full values on every rank and at every cp (B = 0 at init would give
    lora_A no gradient): a function of the parameter's name, laid out by its DTensor placement."""
    from torch.distributed.tensor import distribute_tensor
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                full = torch.randn(p.shape, generator=g) * 0.05
                local = distribute_tensor(full, p.device_mesh, p.placements).to_local() if hasattr(p, "to_local") else full
                (p.to_local() if hasattr(p, "to_local") else p).copy_(local)


def _sft_worker(rank, world, overrides):
    import torch.distributed as dist

    import cp
    from trainer import config
    from trainer.engine import build_trainer, optimizer_step
    from trainer.sft import backward_on_shards, build_sft_loader, sft_step
    cfg = compose_cfg(FAST + LORA + overrides)
    trainer = build_trainer(cfg, validate=config.validate_sft)
    _set_adapters(trainer.model)
    loader = build_sft_loader(cfg, trainer)
    base_before = {n: _full(p) for n, p in trainer.model.named_parameters() if not p.requires_grad}
    batch = loader.next_batch()
    loss, _ = backward_on_shards(trainer, [cp.setup_cp_params(batch.input_ids, trainer.dims, labels=batch.labels,
                                                              seq_lens=batch.seq_lens, pad_token_id=0)])
    grads = {n: _full(p.grad) for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen_grads = [n for n, p in trainer.model.named_parameters() if not p.requires_grad and p.grad is not None]
    optimizer_step(trainer)
    trainer.step += 1
    losses = [loss] + [sft_step(trainer, loader)["loss"] for _ in range(2)]
    changed = [n for n, p in trainer.model.named_parameters() if not p.requires_grad and not torch.equal(_full(p), base_before[n])]
    state = trainer.optimizer.state
    result = {"losses": losses, "grads": grads, "frozen_grads": frozen_grads, "base_changed": changed,
              "base_dtypes": {str(p.dtype) for p in trainer.model.parameters() if not p.requires_grad},
              "adapter_dtypes": {str(p.dtype) for p in trainer.model.parameters() if p.requires_grad},
              "adam_params": len(state), "adapters": len(grads),
              "adam_dtypes": {str(v.dtype) for s in state.values() for k, v in s.items() if k.startswith("exp_avg")}}
    dist.destroy_process_group()
    return result


def _assert_same(result, ref, what):
    for a, b in zip(result["losses"], ref["losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (what, result["losses"], ref["losses"])
    assert set(result["grads"]) == set(ref["grads"])
    for name, g in result["grads"].items():
        r = ref["grads"][name]
        err = (g - r).abs().max().item()
        assert err <= 1e-5 * max(1.0, r.abs().max().item()), f"{what} {name}: grad max abs err {err:.3g}"


@pytest.mark.parametrize("model,style,world,extra", [
    ("tiny:qwen3", "ulysses", 2, []),
    ("tiny:qwen3", "ring", 2, []),
    ("tiny:qwen3_5", "ulysses", 2, []),
    ("tiny:qwen3", "hybrid", 4, ["model.cp_ulysses=2"]),
    ("tiny:qwen3_5", "ulysses", 2, ["model.tiled_mlp=true", "model.activation_checkpointing=true",
                                    "model.activation_offload=true"]),  # + the chunked head (default on)
    ("tiny:qwen3", "ring", 2, ["data.max_tokens_per_rank=96", "model.cp_dynamic=true"]),
])
def test_lora_loss_and_adapter_gradients_under_cp_equal_cp1(model, style, world, extra):
    """cp=1 (no long-context technique) is the reference; the CP runs add styles, the memory techniques and
    dynamic CP (token budgets: steps 2-3; step 1's gradients come from fixed rows)."""
    common = [f"model.name={model}"]
    ref = run_distributed(_sft_worker, 1, common + ["model.cp=1"], timeout=600)[0]
    got = run_distributed(_sft_worker, world, common + [f"model.cp={world}", f"model.cp_style={style}"] + extra,
                          timeout=600)[0]
    _assert_same(got, ref, f"{model} {style} world {world}")
    assert got["base_changed"] == [] and ref["base_changed"] == []  # bitwise, after 3 optimizer steps
    assert got["frozen_grads"] == []
    assert got["adam_params"] == got["adapters"]  # AdamW state for the adapters only
    if model == "tiny:qwen3_5":  # the DeltaNet mixer's projections carry adapters (and gradients)
        assert any("linear_attn.in_proj_qkv." in n for n in got["grads"]), sorted(got["grads"])[:8]
        assert any("linear_attn.out_proj" in n for n in got["grads"])


def test_bf16_keeps_the_base_in_bf16_and_the_adapters_and_adamw_in_fp32():
    got = run_distributed(_sft_worker, 2, ["model.name=tiny:qwen3", "model.dtype=bfloat16"], timeout=600)[0]
    assert got["base_dtypes"] == {"torch.bfloat16"}  # no fp32 master copy of frozen weights
    assert got["adapter_dtypes"] == {"torch.float32"} and got["adam_dtypes"] == {"torch.float32"}
    assert got["base_changed"] == []


def _grpo_worker(rank, world, overrides):
    import torch.distributed as dist

    from trainer import config
    from trainer.engine import build_trainer
    from trainer.rl.training import build_reference, grpo_backward, micro_batches
    cfg = compose_rl(RL_FAST + LORA + overrides)
    trainer = build_trainer(cfg, validate=config.validate_rl)
    _set_adapters(trainer.model)
    ref_model = build_reference(cfg, trainer)
    batches = micro_batches(cfg, trainer, fixed_rollouts(len(trainer.tokenizer)), pad_id=0)
    stats = grpo_backward(cfg, trainer, batches, ref_model)
    grads = {n: _full(p.grad) for n, p in trainer.model.named_parameters() if p.requires_grad}
    dist.destroy_process_group()
    return {"losses": [stats["loss"], stats["kl"]], "grads": grads, "ref_is_policy": ref_model is trainer.model}


@pytest.mark.parametrize("style", ["ulysses", "ring"])
def test_grpo_loss_with_the_adapters_off_reference_under_cp_equals_cp1(style):
    """KL to the base = the policy with its adapters disabled (no second model); loss, KL and adapter gradients
    at cp=2 equal cp=1, and the KL is not 0 (the adapters are non-zero: the reference really is the base)."""
    common = ["model.name=tiny:qwen3", "loss.kl_coef=0.05", "data.micro_batch_size=1"]
    ref = run_distributed(_grpo_worker, 1, common + ["model.cp=1"], timeout=600)[0]
    got = run_distributed(_grpo_worker, 2, common + ["model.cp=2", f"model.cp_style={style}"], timeout=600)[0]
    _assert_same(got, ref, f"grpo {style}")
    assert got["ref_is_policy"] and got["losses"][1] > 1e-6, got["losses"]


def _sft_run_worker(rank, world, overrides):
    from trainer.sft import run_sft
    return [h["loss"] for h in run_sft(compose_cfg(FAST + LORA + overrides))]


def test_adapter_checkpoints_hold_only_the_adapters_and_resume(tmp_path):
    """Checkpoints hold the adapters and their AdamW state, not the frozen base; a run resumed from step 2
    reproduces the uninterrupted run's steps 3-4."""
    import shutil

    from torch.distributed.checkpoint import FileSystemReader
    run = ["model.name=tiny:qwen3", "checkpoint.every=2", "checkpoint.keep_last=0"]
    full = run_distributed(_sft_run_worker, 2, run + [f"output_dir={tmp_path / 'run'}"], timeout=600)[0]
    meta = FileSystemReader(str(tmp_path / "run" / "checkpoints" / "step_000002")).read_metadata()
    model_keys = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys[:5]
    optim_keys = [k for k in meta.state_dict_metadata if k.startswith("optim.state.")]
    assert optim_keys and all(".lora_" in k for k in optim_keys), optim_keys[:5]
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed, ignore=shutil.ignore_patterns("step_000004", "latest"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[:2]
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    again = run_distributed(_sft_run_worker, 2, run + [f"output_dir={resumed}", "resume=true"], timeout=600)[0]
    assert again == pytest.approx(full[2:], rel=1e-6), (again, full)


def _export_worker(rank, world, out):
    """cp=2 trainer with non-zero adapters: its own log-probs of a 64-token sequence (the CP forward), then the
    adapter export and the merged export."""
    import torch.distributed as dist

    import cp
    from trainer import config
    from trainer.engine import build_trainer
    from trainer.loss import shard_logprobs
    from trainer.run import checkpoint
    cfg = compose_cfg(FAST + LORA + ["model.name=tiny:qwen3", f"output_dir={out}"])
    trainer = build_trainer(cfg, validate=config.validate_sft)
    _set_adapters(trainer.model)
    ids = torch.randint(0, len(trainer.tokenizer), (1, 64), generator=torch.Generator().manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)  # [1, 64]: the next token
    batch = cp.setup_cp_params(ids, trainer.dims, labels=labels, seq_lens=[[64]], pad_token_id=0)
    with torch.no_grad():
        logp, _ = shard_logprobs(trainer.model, batch)
    logp = cp.unshard(logp, batch.params)[:, :63]  # [1, S_local] -> [1, 64] -> the 63 labelled positions
    checkpoint.export_adapter(out, trainer.model, trainer.tokenizer, base_model="tiny:qwen3")
    checkpoint.export_hf(out, trainer.model, trainer.tokenizer)
    dist.destroy_process_group()
    return {"ids": ids, "logp": logp}


def test_the_peft_export_gives_the_trainers_log_probs(tmp_path):
    """output_dir/adapter is peft's format (adapter_config.json + adapter_model.safetensors): PeftModel.from_pretrained
    on the base gives the cp=2 trainer's log-probs; the merged export (output_dir/hf) gives them without peft."""
    import peft
    from transformers import AutoModelForCausalLM

    from models.tiny import tiny_model
    from trainer.data.tokenizer import load_tokenizer, resolve_tokenizer_name
    got = run_distributed(_export_worker, 2, str(tmp_path), timeout=600)[0]
    cfg = compose_cfg(FAST + LORA + ["model.name=tiny:qwen3"])
    tokenizer = load_tokenizer(resolve_tokenizer_name(cfg.data.tokenizer, cfg.model.name))
    base = tiny_model("qwen3", seed=cfg.seed, vocab_size=len(tokenizer), hidden_size=cfg.model.tiny_hidden_size,
                      num_layers=cfg.model.tiny_layers)
    base.save_pretrained(tmp_path / "base")
    adapter = tmp_path / "adapter"
    assert sorted(p.name for p in adapter.iterdir() if p.name.startswith("adapter")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == "tiny:qwen3"
    ids, expected = got["ids"], got["logp"]

    def logprobs(model):
        with torch.no_grad():
            logits = model.eval()(input_ids=ids).logits[:, :-1].float()  # [1, 63, V]
        return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]

    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapter)
    assert (logprobs(loaded) - expected).abs().max() < 1e-4
    assert (logprobs(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")) - expected).abs().max() < 1e-4
    assert (logprobs(AutoModelForCausalLM.from_pretrained(tmp_path / "base")) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("overrides,match", [
    (["model.lora.rank=0"], "must be >= 1"),
    (["model.lora.dropout=0.1"], "Set model.lora.dropout=0"),
    (["model.lora.target_modules=[]"], "adapts nothing"),
])
def test_bad_lora_keys_are_refused_by_validation(overrides, match):
    from trainer import config
    with pytest.raises(ValueError, match=match):
        config.validate_sft(compose_cfg(FAST + LORA + overrides), 2)


def _refusal_worker(rank, world, overrides):
    from trainer import config
    from trainer.engine import build_trainer
    build_trainer(compose_cfg(FAST + LORA + ["model.cp=1"] + overrides), validate=config.validate_sft)


@pytest.mark.parametrize("overrides,match", [
    (["model.lora.target_modules=[nope_proj]"], "matches no module"),
    (["model.lora.target_modules=[lm_head]"], "not a linear projection inside a decoder layer"),
    (["model.name=tiny:qwen3_5", "model.lora.target_modules=[conv1d]"], "not a linear projection"),
    (["model.name=tiny:glm4_moe", "checkpoint.export_hf=true"], "peft rewrites these targets"),
])
def test_targets_lora_cannot_adapt_exactly_are_refused_at_startup(overrides, match):
    """Including an export peft would load differently (GLM-4-MoE: peft turns the MLP names into expert parameters)."""
    with pytest.raises(Exception, match=match):
        run_distributed(_refusal_worker, 1, overrides, timeout=300)


def test_the_planner_counts_the_adapters_apply_lora_installs():
    """trainer.plan's LoRA counts equal the trainable parameters apply_lora installs (default targets, Qwen3.5
    hybrid: attention, MLP and mixer projections); per rank: the base in the compute dtype only, gradients and
    AdamW moments for the adapters only, no reference model."""
    from types import SimpleNamespace

    from models.adapters.lora import apply_lora
    from models.tiny import tiny_model
    from trainer.modeling import decoder_layers
    from trainer.planning.memory_plan import ParamCounts, lora_counts, state_bytes
    lcfg = SimpleNamespace(rank=8, alpha=16.0, dropout=0.0, target_modules=None)
    model = tiny_model("qwen3_5", seed=0, vocab_size=512, hidden_size=64, num_layers=2)
    planned = lora_counts(model, lcfg)
    apply_lora(model, lcfg, decoder_layers(model), torch.bfloat16)
    assert planned.total == sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = ParamCounts(total=8_000_000_000, largest_layer=200_000_000, root=1_200_000_000)
    adapters = ParamCounts(total=40_000_000, largest_layer=1_100_000, root=0)
    full = state_bytes(params, world=8, compute_bytes=2, trainer="rl", reference=True, rollout_copy=False)
    lora = state_bytes(params, world=8, compute_bytes=2, trainer="rl", reference=True, rollout_copy=False,
                       adapters=adapters)
    assert lora["optimizer"] == 8 * 5_000_000 and full["optimizer"] == 8 * 1_000_000_000
    working = 2 * (params.root + 2 * params.largest_layer)
    assert lora["weights"] == 2 * 1_000_000_000 + 4 * 5_000_000 + working + 2 * 2 * adapters.largest_layer
    assert full["weights"] == 4 * 1_000_000_000 + working + 4 * 1_000_000_000  # + the reference's fp32 shard
    assert lora["gradients"] == 4 * 5_000_000 + 4 * adapters.largest_layer


def length_reward(prompts, completions, **columns):
    """Varies with a random model's samples (the built-in rewards are all 0 for it): advantages are non-zero."""
    return [float(len(c)) for c in completions]


def _rl_run_worker(rank, world, overrides):
    from trainer.rl.loop import run_rl
    return run_rl(compose_rl(RL_FAST + LORA + overrides))


def test_grpo_with_lora_samples_from_the_merged_adapters(tmp_path):
    """rollout.engine=hf with LoRA: the rollout copy holds the merged weights (W + scale B A), so the engine's
    log-probs equal the trainer's after the adapters moved (step 2: ~1e-7 fp32; a copy without the adapters
    differs by 5e-3 at step 2); the KL to the adapters-off base grows from 0."""
    history = run_distributed(_rl_run_worker, 2, [f"output_dir={tmp_path}", "loss.kl_coef=0.05", "max_steps=3",
                                                  "optim.lr=0.01", "reward.functions=[tests.test_lora:length_reward]",
                                                  "reward.weights=[1.0]"], timeout=600)[0]
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(h["logp_mismatch_abs_mean"] < 1e-5 for h in history), [h["logp_mismatch_abs_mean"] for h in history]
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-7) and history[-1]["kl"] > 1e-6, [h["kl"] for h in history]


def test_default_targets_are_every_decoder_projection_of_every_family():
    """For each trainer family (tiny:<family>) the default targets cover the attention and MLP projections (and the
    mixers' where the family has them), never a router; apply_lora adapts exactly those modules."""
    from models.adapters.lora import apply_lora, default_target_modules
    from models.tiny import tiny_model
    from models.tiny.builders import TINY_FAMILIES
    from trainer.modeling import decoder_layers
    from types import SimpleNamespace
    for family in TINY_FAMILIES:
        model = tiny_model(family, seed=0, vocab_size=256, hidden_size=64, num_layers=2)
        layers = decoder_layers(model)
        targets = default_target_modules(model, layers)
        assert not {"gate", "router", "lm_head", "embed_tokens"} & set(targets), (family, targets)
        assert {"o_proj", "out_proj", "down_proj"} & set(targets) or "dense" in targets, (family, targets)
        apply_lora(model, SimpleNamespace(rank=2, alpha=4.0, dropout=0.0, target_modules=None), layers, torch.float32)
        adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".lora_A." in name}
        assert adapted == set(targets), (family, adapted, targets)


def _bf16_copy_worker(rank, world):
    """An early adapter update (B small, as after a few steps from B = 0) on a bf16 base: the hf engine's copy must
    carry it as the trainer applies it. Returns, per adapted projection, the relative error of the copy's update
    (W_eff - W) against scale B A in fp32, and whether the copy's adapters are the trainer's compute-dtype ones."""
    from trainer import config
    from trainer.engine import build_trainer
    from trainer.rl.rollout.hf import HFRolloutEngine
    cfg = compose_cfg(FAST + LORA + ["model.name=tiny:qwen3", "model.cp=1", "model.dtype=bfloat16"])
    trainer = build_trainer(cfg, validate=config.validate_sft)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if p.requires_grad:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.to_local().copy_(torch.randn(p.to_local().shape, generator=g) * (1e-3 if "lora_B" in name else 0.05))
    full = {n: _full(p) for n, p in trainer.model.named_parameters()}
    engine = HFRolloutEngine(trainer.model, trainer.tokenizer, trainer.device, dtype=torch.bfloat16)
    engine.sync(trainer.model, version=1)
    scale, errors, same = 8 / 4, {}, []
    for name in [n[:-len(".lora_A.default.weight")] for n in full if n.endswith(".lora_A.default.weight")]:
        exact = scale * full[f"{name}.lora_B.default.weight"].float() @ full[f"{name}.lora_A.default.weight"].float()
        module = engine.model.get_submodule(name)
        if hasattr(module, "lora_A"):  # unmerged: the update is the adapter path's
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            same.append(torch.equal(a, full[f"{name}.lora_A.default.weight"].to(a.dtype))
                        and torch.equal(b, full[f"{name}.lora_B.default.weight"].to(b.dtype)))
            got = scale * b.float() @ a.float()
        else:  # merged into the base
            got = module.weight.float() - full[f"{name}.base_layer.weight"].float()
        errors[name] = float((got - exact).norm() / exact.norm())
    return errors, same


def test_the_hf_copy_carries_an_early_adapter_update_in_bf16():
    """Merged into a bf16 base (W + scale B A rounded to bf16) an early update was ~90% lost, so the hf engine
    sampled from a policy the trainer did not have; the copy now holds the adapters unmerged, in the compute dtype
    as FSDP2 gives them to the trainer's forward (bf16 rounding of A and B alone: < 1% of the update)."""
    errors, same = run_distributed(_bf16_copy_worker, 1, timeout=300)[0]
    assert errors and max(errors.values()) < 0.01, errors
    assert same and all(same)


def test_merged_lora_sync_is_refused_below_fp32():
    from trainer import config
    cfg = compose_rl(RL_FAST + LORA + ["rollout.engine=vllm", "rollout.vllm.lora_sync=merged", "model.dtype=bfloat16"])
    with pytest.raises(ValueError, match="merged with model.dtype=bfloat16.*use rollout.vllm.lora_sync=adapter"):
        config.validate_rl(cfg, 2)
    config.validate_rl(compose_rl(RL_FAST + LORA + ["rollout.engine=vllm", "rollout.vllm.lora_sync=merged"]), 2)
