"""RL environments: the contract (base.py) and the built-ins; rollout.env names one.

    single_turn     base.SingleTurnEnv: the prompt, one completion, reward.functions (GRPO on prompts)
    calculator      calculator.CalculatorEnv: arithmetic past a small model's head, a `calculate` tool (tools.py)
    guess_number    guess.GuessNumberEnv: find a hidden number from higher / lower feedback over turns
    long_doc        long_doc.LongDocEnv: a fact in one of many long sections read through a tool: long episodes
    retry           retry.RetryEnv: any prompt with an answer, more attempts after "That is not correct"
    pkg.mod:Class   any class with reset / step / reward (base.py)
"""

from __future__ import annotations

import importlib

BUILTIN_ENVS = {"single_turn": "trainer.rl.envs.base:SingleTurnEnv",
                "calculator": "trainer.rl.envs.calculator:CalculatorEnv",
                "guess_number": "trainer.rl.envs.guess:GuessNumberEnv",
                "long_doc": "trainer.rl.envs.long_doc:LongDocEnv",
                "retry": "trainer.rl.envs.retry:RetryEnv"}
CONTRACT = ("reset", "step", "reward")


def resolve_env(spec: str) -> type:
    """rollout.env -> the environment class; ValueError naming the key when it cannot be found or lacks the
    contract's methods."""
    if spec.startswith("verifiers:"):
        raise ValueError(f"rollout.env={spec!r}: verifiers environments are not supported yet (the plan: "
                         "docs/design/verifiers_bridge.md); write the task as a cptrain environment "
                         "(trainer/rl/envs/base.py) meanwhile")
    path = BUILTIN_ENVS.get(spec, spec)
    module_name, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"rollout.env={spec!r}: choose a built-in ({', '.join(BUILTIN_ENVS)}) or 'pkg.module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"rollout.env={spec!r}: cannot load {path} ({err})") from err
    missing = [name for name in CONTRACT if not callable(getattr(cls, name, None))]
    if missing:
        raise ValueError(f"rollout.env={spec!r}: {cls.__name__} lacks {', '.join(missing)} (the environment contract: "
                         "reset(row) -> messages, step(messages, row) -> (replies, done), reward(messages, row))")
    return cls
