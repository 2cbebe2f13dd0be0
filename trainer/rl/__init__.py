"""GRPO: `python -m trainer.rl` runs loop.py (the step, rollouts, Hydra main); the rest are its parts.

    loop.py           run_rl: rollouts, advantages, micro-batches, the policy-gradient step under CP
    prompts.py        RL prompts (built-in tasks or a dataset), held-out eval prompts, PromptSampler
    tasks.py          built-in verifiable tasks, rewards, final-answer extraction
    grpo.py           group advantages, the clipped per-token objective, packing rollouts into rows
    policy_losses.py  loss.type registry: grpo, dr_grpo, dapo, gspo
    rollout/          rollout engines, one module per engine (hf.py: transformers.generate on a plain copy)
"""
