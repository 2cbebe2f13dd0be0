"""The rollout benchmark (issue 22): scripts/bench_rollout.py is the command, these are its parts.

    common.py     the real model's config and prompts, a one-rank process group, an owned vLLM server
    engines.py    rollout tokens/s: hf one generate per prompt (before), hf one batched generate, vllm
    sync.py       weight sync time and bytes vs model size (vllm buckets; the hf engine's full gather)
    mismatch.py   engine vs trainer log-probs on the sampled tokens, fp32 and bf16
    train.py      the GRPO step's training half vs SFT on the same model and tokens (fixed rows, token budget)
    learn.py      the real-model GRPO runs (torchrun, experiment=smollm2_arith) with each engine; TRL's
                  GRPOTrainer on the same model, prompts and settings (trl_peer.py, in its own venv)
    report.py     docs/benchmarks/rollout/README.md and the learning-curve plot
"""
