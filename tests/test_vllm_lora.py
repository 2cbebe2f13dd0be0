"""LoRA with rollout.engine=vllm and rollout.vllm.lora_sync=adapter: only the adapters travel (skipped without the
vLLM venv or peft). A server with vLLM's LoRA (--enable-lora) holds the frozen base; after a sync its completions
under the new adapter equal the trainer's (greedy, and sampled log-probs vs the trainer's CP forward), every
completion carries the adapter's version, the bytes sent are the adapters' alone, and only the newest adapters
stay loaded."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed
from tests.test_rl import RL_FAST, compose_rl
from tests.vllm_support import SKIP, VLLM_FAST, export_tiny_llama, server_spec

pytestmark = pytest.mark.skipif(SKIP is not None, reason=str(SKIP))
pytest.importorskip("peft")


def _adapter_worker(rank, world, url, model_dir):
    import torch.distributed as dist

    from trainer import config
    from trainer.engine import build_trainer
    from trainer.rl import grpo
    from trainer.rl.training import grpo_backward, micro_batches
    from trainer.rl.prompts import make_prompts
    from trainer.rl.rollout.base import SamplingSettings, check_versions
    from trainer.rl.rollout.hf import HFRolloutEngine
    from trainer.rl.rollout.vllm_engine import VLLMRolloutEngine
    cfg = compose_rl(RL_FAST + VLLM_FAST + [f"model.name={model_dir}", f"rollout.vllm.urls=[{url}]",
                                            "model.lora.rank=4", "model.lora.alpha=8"])
    trainer = build_trainer(cfg, validate=config.validate_rl)
    engine = VLLMRolloutEngine(cfg.rollout.vllm, model_path=model_dir, tokenizer=trainer.tokenizer,
                               dtype=torch.float32, max_model_len=256, seed=0, log_dir=str(model_dir), lora_rank=4,
                               keep_adapters=2)
    hf = HFRolloutEngine(trainer.model, trainer.tokenizer, trainer.device)
    prompts = [p.input_ids for p in make_prompts("add", 4, seed=rank, tokenizer=trainer.tokenizer)]
    adapter_bytes = 4 * sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    results = []
    for version in (1, 2, 3):
        generator = torch.Generator().manual_seed(10 * version + rank)
        with torch.no_grad():  # the adapters move; the base is frozen (the server keeps it)
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.to_local().add_(torch.randn(p.to_local().shape, generator=generator) * 0.2)
        stats = engine.sync(trainer.model, version=version)
        hf.sync(trainer.model, version=version)
        greedy_equal = engine.greedy(prompts, max_new_tokens=12) == hf.greedy(prompts, max_new_tokens=12)
        groups = engine.sample(prompts, SamplingSettings(n=4, max_new_tokens=12, temperature=1.0, top_p=1.0,
                                                         seed=rank))
        completions = [c for g in groups for c in g]
        check_versions(completions, expected=version)
        rollouts = [grpo.Rollout(p, c.token_ids, c.logprobs, 0.0, advantage=0.0, version=c.version)
                    for p, g in zip(prompts, groups) for c in g]
        parts = [None] * world
        dist.all_gather_object(parts, rollouts)
        mismatch = grpo_backward(cfg, trainer, micro_batches(cfg, trainer, [r for part in parts for r in part], 0))
        trainer.optimizer.zero_grad(set_to_none=True)
        results.append({"stats": stats, "greedy_equal": greedy_equal, "mismatch": mismatch})
    loaded = sorted(m["id"] for m in engine.clients[0].get("/v1/models")["data"] if m["id"].startswith("cptrain-"))
    engine.close()
    dist.destroy_process_group()
    return {"results": results, "adapter_bytes": adapter_bytes, "loaded": loaded}


def test_adapter_sync_sends_only_the_adapters_and_samples_like_the_trainer(tmp_path):
    """The server was started on another base than the trainer's: the engine's first sync sends the frozen base
    once (adapters off), so the adapters apply to the policy's own base (it used to train on the server's)."""
    from trainer.rl.rollout.vllm_server import VLLMServer
    model = export_tiny_llama(tmp_path / "tiny")
    other = export_tiny_llama(tmp_path / "other", seed=2)  # the server starts on ANOTHER base: the sync fixes it
    # TCP on loopback (an external server given by http URL; the shared server is a private Unix socket)
    server = VLLMServer(server_spec(other, tmp_path / "server.log", lora_rank=4, max_loras=2, tcp=True)).start()
    try:
        out = run_distributed(_adapter_worker, 2, server.url, str(model), timeout=900)[0]
    finally:
        server.stop()
    for i, r in enumerate(out["results"]):
        assert r["greedy_equal"], "vLLM's greedy completions under the adapter differ from the trainer's"
        if i == 0:  # the first sync: the frozen base (once) and the adapters
            assert r["stats"]["sync_bytes"] > 10 * out["adapter_bytes"], r["stats"]
        else:
            assert r["stats"]["sync_bytes"] == out["adapter_bytes"]  # the adapters, not the model
        m = r["mismatch"]
        assert m["train_tokens"] > 50
        assert m["logp_mismatch_abs_mean"] < 1e-5 and m["logp_mismatch_ratio_max"] < 1 + 1e-4, m
    run = out["loaded"][0].split("-")[1]  # this run's token: a resumed run never reuses a loaded adapter's name
    assert out["loaded"] == [f"cptrain-{run}-v2", f"cptrain-{run}-v3"]  # the two newest; v1 unloaded


def _rl_worker(rank, world, overrides):
    from trainer.rl.loop import run_rl
    return run_rl(compose_rl(RL_FAST + VLLM_FAST + overrides))


def test_async_grpo_with_lora_adapters_on_an_owned_server(tmp_path):
    """The trainer starts its server with vLLM's LoRA (the base exported without adapters), syncs adapters only
    (sync_bytes: the adapters), generates one step ahead (k=1: each rollout's version is its adapter's), and the
    engine's log-probs stay the trainer's; the adapter directory is exported at the end."""
    overrides = ["model.name=tiny:llama", "model.lora.rank=4", "rollout.max_off_policy_steps=1", "max_steps=3",
                 f"output_dir={tmp_path}", "checkpoint.export_hf=true", "loss.kl_coef=0.05",
                 "reward.functions=[tests.test_lora:length_reward]", "reward.weights=[1.0]", "optim.lr=0.01"]
    history = run_distributed(_rl_worker, 2, overrides, timeout=900)[0]
    assert [h["step"] for h in history] == [1, 2, 3]
    for h in history:
        assert h["stale_dropped"] == 0 and h["off_policy_lag_0_frac"] + h["off_policy_lag_1_frac"] == 1
        assert h["logp_mismatch_abs_mean_lag0"] < 1e-5, h  # lag-0 rollouts: the engine's adapter = the policy
        assert h["sync_bytes"] < 200_000, h["sync_bytes"]  # tiny Llama: ~14 MB of weights, ~0.1 MB of adapters
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
