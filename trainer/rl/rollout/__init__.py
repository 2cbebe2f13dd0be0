"""Rollout engines: a step's prompts in, sampled completions and their log-probs out; weights in after each step.

One module per engine behind one interface (base.py, DESIGN rule 13); the GRPO loop (trainer/rl/loop.py) does
not know which one runs.

    base.py          the interface: SamplingSettings, Completion (token ids, log-probs, weight version),
                     RolloutEngine (sync / sample / greedy / close), check_versions
    hf.py            rollout.engine=hf: transformers.generate on a plain copy of the gathered weights, in process
    vllm_engine.py   rollout.engine=vllm: vLLM servers, owned (vllm_server.py) or given (rollout.vllm.urls);
                     HTTP in vllm_client.py; weights through vLLM's weight-transfer protocol (weights/)
"""

from __future__ import annotations


def build_engine(cfg, trainer, patient_group):
    """The rollout.engine for this run (a collective: every trainer rank calls it)."""
    from trainer import modeling

    dtype = modeling.compute_dtype(cfg.model)
    if cfg.rollout.engine == "hf":
        from trainer.rl.rollout.hf import HFRolloutEngine

        return HFRolloutEngine(trainer.model, trainer.tokenizer, trainer.device, dtype=dtype)
    from trainer.rl.rollout.vllm_engine import VLLMRolloutEngine

    adapters = cfg.model.lora.rank is not None and cfg.rollout.vllm.lora_sync == "adapter"
    model_path = cfg.rollout.vllm.model or cfg.model.name
    if not cfg.rollout.vllm.urls and model_path.startswith(modeling.TINY_PREFIX):
        from trainer.run.checkpoint import export_hf

        # a random-init tiny model has no directory: the server starts from its exported initial weights (LoRA
        # adapters: the base alone, the adapters arrive as adapters)
        model_path = str(export_hf(cfg.output_dir, trainer.model, trainer.tokenizer, group=patient_group,
                                   name="vllm_model", merge=not adapters))
    return VLLMRolloutEngine(cfg.rollout.vllm, model_path=model_path, tokenizer=trainer.tokenizer, dtype=dtype,
                             max_model_len=cfg.data.seq_len, seed=cfg.seed, log_dir=cfg.output_dir,
                             patient_group=patient_group, lora_rank=cfg.model.lora.rank if adapters else None,
                             keep_adapters=cfg.rollout.max_off_policy_steps + 2)
