"""SFT and GRPO trainers built on the cp core and models: FSDP2 on a dp x cp mesh, Hydra configs, W&B.

    sft.py, rl.py, plan.py  entry points: python -m trainer.sft / trainer.rl (torchrun) / trainer.plan
    engine.py               what SFT and GRPO share: build, resume, checkpoint cadence, optimizer step, summary
    config.py               typed Hydra configs and the one validation pass after compose
    modeling.py             build the model, fp32 masters, apply_cp, long-context techniques, FSDP2
    loss.py, optim.py       losses / log-probs on CP shards (global token normalisation); AdamW and its schedule
    data/                   tokenizer, records, chat template and loss mask, packing (SFT and GRPO rows)
    rl/                     GRPO: prompts, tasks and rewards, policy losses, rollouts/ (one module per engine)
    planning/               token-budget micro-batches and dynamic CP; the memory planner and its meta-device engine
    run/                    a run's process and files: distributed runtime, metrics, checkpoints and HF export

Imports only go downward (cp <- models <- trainer <- scripts) and no module imports itself back through
others, lazy imports included (tests/test_layout.py).
Old module paths (trainer.tasks, trainer.packing, ...) keep working with a warning naming the new place.
"""

from models.moved_modules import alias_moved_modules

MOVED_MODULES = {
    "trainer.chat": "trainer.data.chat", "trainer.records": "trainer.data.records",
    "trainer.tokenizer": "trainer.data.tokenizer", "trainer.packing": "trainer.data.packing",
    "trainer.prompts": "trainer.rl.prompts", "trainer.tasks": "trainer.rl.tasks", "trainer.grpo": "trainer.rl.grpo",
    "trainer.policy_losses": "trainer.rl.policy_losses", "trainer.rollout": "trainer.rl.rollout.hf",
    "trainer.token_budget": "trainer.planning.token_budget", "trainer.memory_sim": "trainer.planning.memory_sim",
    "trainer.runtime": "trainer.run.runtime", "trainer.metrics": "trainer.run.metrics",
    "trainer.checkpoint": "trainer.run.checkpoint",
}
alias_moved_modules(MOVED_MODULES)
