"""Engine vs trainer log-probs on the sampled tokens, fp32 and bf16, on the real model.

    2 trainer ranks (cp=2 Ulysses, model.dtype = the dtype), an owned vLLM server in the same dtype, synced;
    the server samples the prompts (T = 1, the whole vocabulary); the trainer's CP forward (what GRPO trains with,
    no grad) scores the same tokens; trainer.rl.logprob_mismatch.mismatch_sums over every completion token:
        mean |log p_trainer - log p_engine|, k3 KL(engine || trainer), max p_trainer / p_engine
    also the same numbers for the hf engine (the plain copy's generate) against the trainer.
bf16 matmuls run ~70x slower than fp32 on this CPU (no AVX-512 BF16 / AMX), so the bf16 case samples fewer tokens.
"""

from __future__ import annotations

import tempfile


def _score(cfg, trainer, prompt_ids, groups) -> dict:
    """The step's mismatch metrics for these completions, forward only, reduced over the ranks."""
    import torch

    import cp
    from trainer.engine import global_sum
    from trainer.loss import shard_logprobs
    from trainer.rl import grpo
    from trainer.rl.logprob_mismatch import mismatch_sums
    from trainer.rl.training import gather_cp_group, global_max, micro_batches

    rollouts = [grpo.Rollout(p, c.token_ids, c.logprobs, 0.0) for p, g in zip(prompt_ids, groups) for c in g]
    sums, ratio_max, tokens = {"mismatch_abs": 0.0, "mismatch_k3": 0.0}, 0.0, 0.0
    for rows, dims in micro_batches(cfg, trainer, gather_cp_group(rollouts, trainer), pad_id=0):
        batch = cp.setup_cp_params(rows.input_ids, dims, labels=rows.labels, seq_lens=rows.seq_lens)
        engine = cp.shard(rows.old_logp, batch.params)
        with torch.no_grad():
            logp, _ = shard_logprobs(trainer.model, batch, temperature=1.0)
        mask = (batch.labels != grpo.IGNORE_INDEX).float()
        found = mismatch_sums(logp, engine, mask)
        ratio_max = max(ratio_max, found.pop("mismatch_ratio_max"))
        for key, value in found.items():
            sums[key] += value
        tokens += float(mask.sum())
    total = max(global_sum(tokens, trainer), 1.0)
    return {"tokens": int(total), "abs_mean": global_sum(sums["mismatch_abs"], trainer) / total,
            "kl": global_sum(sums["mismatch_k3"], trainer) / total, "ratio_max": global_max(ratio_max)}


def _rank(rank: int, world: int, dtype_name: str, n_prompts: int, group: int, max_new_tokens: int) -> dict:
    import torch

    from bench.rollout.common import REAL_MODEL, prompts, rl_config, vllm_config
    from trainer import config, modeling
    from trainer.engine import build_trainer
    from trainer.rl.rollout.base import SamplingSettings
    from trainer.rl.rollout.hf import HFRolloutEngine
    from trainer.rl.rollout.vllm_engine import VLLMRolloutEngine

    cfg = rl_config([f"model.dtype={dtype_name}", "rollout.eval_prompts=0", "data.max_tokens_per_rank=null"])
    trainer = build_trainer(cfg, validate=config.validate_rl)
    dtype = modeling.compute_dtype(cfg.model)
    mine = prompts(n_prompts * world, trainer.tokenizer)[rank::world]
    settings = SamplingSettings(n=group, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, seed=rank)
    out = {"dtype": dtype_name}
    engine = VLLMRolloutEngine(vllm_config(), model_path=str(REAL_MODEL), tokenizer=trainer.tokenizer, dtype=dtype,
                               max_model_len=512, seed=0, log_dir=tempfile.gettempdir())
    try:
        engine.sync(trainer.model, 0)
        out["vllm"] = _score(cfg, trainer, mine, engine.sample(mine, settings))
    finally:
        engine.close()
    hf = HFRolloutEngine(trainer.model, trainer.tokenizer, trainer.device, dtype=dtype)
    hf.sync(trainer.model, 0)
    out["hf"] = _score(cfg, trainer, mine, hf.sample(mine, settings))
    return out


def measure(cases: list[tuple[str, int, int, int]], log) -> list[dict]:
    """cases: (dtype, prompts per rank, group size, max new tokens)."""
    from bench.launch import spawn

    rows = []
    for dtype_name, n_prompts, group, max_new in cases:
        row = spawn(_rank, 2, "cpu", dtype_name, n_prompts, group, max_new, timeout_s=3600)
        rows.append(row)
        for engine in ("vllm", "hf"):
            m = row[engine]
            log(f"  {dtype_name} {engine}: {m['tokens']} tokens, mean |dlogp| {m['abs_mean']:.3g}, "
                f"KL {m['kl']:.3g}, max ratio {m['ratio_max']:.4f}")
    return rows
