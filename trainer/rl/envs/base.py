"""The environment contract: what GRPO rolls out against, one instance per episode.

    class MyEnv:                                   rollout.env=pkg.mod:MyEnv (or a built-in name: envs/__init__.py)
        def __init__(self, **env_args)             rollout.env_args={...}
        def reset(self, row) -> list[dict]         the opening messages of this task (row: the dataset row)
        def step(self, messages, row) -> (list[dict], bool)
                                                   the conversation so far, ending with the model's latest turn ->
                                                   (the environment's reply messages, role "user" or "tool"; may be
                                                   empty), episode over?
        def reward(self, messages, row) -> float | dict[str, float]
                                                   a dict's parts are logged apart (reward_env_<part>) and summed
    optional:
        tools: list[dict]                          JSON function schemas: the chat template renders them (tools=)
        metrics() -> dict[str, float]              counts summed over a step's episodes (tool_calls, ...)
        make_rows(n, seed) (classmethod)           a built-in environment's own task rows

Any of reset / step / reward may be `async def`: the episode runner (trainer/rl/episodes.py) runs a step's
episodes concurrently either way. The episode's token ids are never re-derived from the messages: the messages
are what the environment sees; the ids are what the engine was sent and returned (trainer/rl/rendering.py).

SingleTurnEnv is today's prompts: reset returns the prompt's messages, step ends the episode at once, and the
reward is reward.functions' alone (it adds no part of its own).
"""

from __future__ import annotations

import asyncio
import inspect


class SingleTurnEnv:
    """One model turn per episode: the prompt (row["prompt_messages"]) and the completion, scored by
    reward.functions."""

    tools = None

    def __init__(self, **env_args):
        if env_args:
            raise ValueError(f"rollout.env=single_turn takes no rollout.env_args (got {sorted(env_args)})")

    def reset(self, row: dict) -> list[dict]:
        self.tools = row.get("tools")  # a prompt dataset row's tool schemas, rendered as its prompt was
        return [dict(m) for m in row["prompt_messages"]]

    def step(self, messages: list[dict], row: dict) -> tuple[list[dict], bool]:
        return [], True

    def reward(self, messages: list[dict], row: dict) -> dict[str, float]:
        return {}


def call(method, *args):
    """A contract method's result, awaited if the environment wrote it `async def` (one event loop per call: the
    runner calls it from its worker threads)."""
    result = method(*args)
    return asyncio.run(result) if inspect.isawaitable(result) else result


def check_messages(replies, env_class: str, what: str) -> list[dict]:
    """An environment's messages must be a list of {"role", "content"} dicts: anything else names the class."""
    if not isinstance(replies, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), str)
            for m in replies):
        raise TypeError(f"environment {env_class}.{what} must return a list of {{'role', 'content'}} message dicts; "
                        f"it returned {replies!r:.200}")
    return [dict(m) for m in replies]
