"""Rollout tokens/s on the real model: the hf engine as it was (one generate per prompt group), the hf engine
now (all of a rank's prompts in one left-padded generate), and the vllm engine (an owned server), on the same
prompts and settings, one after the other in this process (every engine gets both cores: torch threads = cores
for hf; the server binds its OpenMP threads to every core).

    tokens/s = completion tokens sampled / wall time of the sample() call (the server's startup excluded)
"""

from __future__ import annotations

import os
import time

import torch

from bench.rollout.common import load_model, one_rank_group, prompts, vllm_config


def _timed(engine, batch, settings, per_prompt: bool) -> dict:
    start = time.perf_counter()
    if per_prompt:
        groups = [engine.sample([p], settings)[0] for p in batch]
    else:
        groups = engine.sample(batch, settings)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for g in groups for c in g)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def measure(n_prompts: int, group: int, max_new_tokens: int, log) -> dict:
    from trainer.rl.rollout.base import SamplingSettings
    from trainer.rl.rollout.hf import HFRolloutEngine
    from trainer.rl.rollout.vllm_engine import VLLMRolloutEngine

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model, tokenizer = load_model()
    batch = prompts(n_prompts, tokenizer)
    settings = SamplingSettings(n=group, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, seed=0)
    results = {"prompts": n_prompts, "group_size": group, "max_new_tokens": max_new_tokens, "dtype": "float32"}
    with one_rank_group():
        hf = HFRolloutEngine(model, tokenizer, torch.device("cpu"))
        hf.sync(model, 0)
        results["hf_per_prompt"] = _timed(hf, batch, settings, per_prompt=True)
        log(f"  hf, one generate per prompt: {results['hf_per_prompt']['tokens_per_s']:.1f} tok/s")
        results["hf_batched"] = _timed(hf, batch, settings, per_prompt=False)
        log(f"  hf, one batched generate: {results['hf_batched']['tokens_per_s']:.1f} tok/s")
        del hf
        start = time.perf_counter()
        engine = VLLMRolloutEngine(vllm_config(), model_path=str(model.name_or_path), tokenizer=tokenizer,
                                   dtype=torch.float32, max_model_len=1024, seed=0, log_dir="/tmp/cptrain-bench")
        try:
            results["vllm_startup_s"] = time.perf_counter() - start
            engine.sync(model, 0)
            _timed(engine, batch[:1], settings, per_prompt=False)  # warm-up: first requests compile nothing, but
            results["vllm"] = _timed(engine, batch, settings, per_prompt=False)  # allocate the KV cache blocks
        finally:
            engine.close()
        log(f"  vllm: {results['vllm']['tokens_per_s']:.1f} tok/s (server startup {results['vllm_startup_s']:.0f} s)")
    return results
