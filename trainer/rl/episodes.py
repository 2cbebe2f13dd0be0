"""Episodes: an environment and a rollout engine taking turns, token in / token out.

    per prompt row, group_size episodes, each with its own environment instance (rollout.env, rollout.env_args)
      messages = env.reset(row);  prompt ids = the chat template over them + the generation prompt
    turn loop, every live episode of the step in flight at once (one engine call per turn):
      turn 1: a group whose openings are equal is ONE request of group_size samples (as single-turn GRPO always
              sampled); otherwise, and from turn 2, one request per episode
      each episode's requests go to one server (routes: its prompt's index), so its growing prefix stays cached
      sampled ids are kept exactly as the engine returned them (the stop token included), with their log-probs and
              weight versions; the text the environment reads is their decoding
      ended without a stop token (max_new_tokens, or the episode's token budget) -> truncated, over
      (replies, over) = env.step(messages, row)
      over -> done;   turns == max_turns -> truncated, done
      reply ids = rendering.EpisodeRenderer.continuation (the replies ONLY, never a re-encoded turn): no loss
      prompt + everything so far + the replies must leave room in max_episode_tokens for one more sampled token
              (else truncated, done: the replies are not added)
    env.reward(messages, row) for every episode that did not fail

An environment that raises (reset, step, reward) drops its episode (Episode.error); more than
max_failed_fraction of a step's episodes dropped fails the step, naming the environment and the task. A reply
that is not a list of messages is an error naming the environment class, not a dropped episode.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from trainer.rl.envs.base import call, check_messages
from trainer.rl.rendering import EpisodeRenderer
from trainer.rl.rollout.base import Completion, RolloutEngine, SamplingSettings

TURN_SEED_STRIDE = 1_000_003  # turn t > 1 samples with settings.seed + t * stride (turn 1: settings.seed itself)


@dataclass(frozen=True)
class Budgets:
    max_turns: int  # model turns per episode
    max_new_tokens: int  # sampled tokens per turn
    max_episode_tokens: int  # the prompt and everything after it: the document the trainer packs
    max_failed_fraction: float = 0.25  # of a step's episodes whose environment raised, before the step fails


@dataclass
class Episode:
    group: int  # the index of its prompt row in this call
    row: dict
    env: object
    messages: list[dict] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # every token after the prompt: sampled turns and replies
    sampled: list[bool] = field(default_factory=list)  # per id: sampled by the engine (trained) or not
    logprobs: list[float] = field(default_factory=list)  # the engine's log-prob per id (0.0 where not sampled)
    versions: list[int] = field(default_factory=list)  # the weight version that sampled each id (-1: not sampled)
    turns: int = 0
    done: bool = False
    truncated: str | None = None  # max_turns | max_new_tokens | max_episode_tokens
    error: str | None = None  # the environment raised: the episode is dropped
    reward: float | dict | None = None  # env.reward's value
    renderer: EpisodeRenderer | None = None

    @property
    def live(self) -> bool:
        return not self.done and self.error is None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.ids)

    @property
    def env_tokens(self) -> int:
        return len(self.ids) - sum(self.sampled)

    def oldest_version(self) -> int:
        return min((v for v in self.versions if v >= 0), default=-1)

    def newest_version(self) -> int:
        return max(self.versions, default=-1)

    def last_reply(self) -> str:
        """The content of the model's last turn."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")


class EpisodeRunner:
    def __init__(self, make_env: Callable[[], object], tokenizer, stop_ids, budgets: Budgets, *, workers: int = 16):
        """make_env: a new environment instance; stop_ids: the tokens a turn ends with (the engines' stop set)."""
        self.make_env, self.tokenizer, self.stop_ids, self.budgets = make_env, tokenizer, set(stop_ids), budgets
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="env")
        self.renderers: dict[str, EpisodeRenderer] = {}  # by the environment's tools

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _renderer(self, env) -> EpisodeRenderer:
        tools = getattr(env, "tools", None)
        key = json.dumps(tools, sort_keys=True) if tools else ""
        if key not in self.renderers:
            self.renderers[key] = EpisodeRenderer(self.tokenizer, self.stop_ids, tools)
        return self.renderers[key]

    def _each(self, fn, episodes: list[Episode]) -> None:
        """fn(episode) for every episode concurrently; an exception from the environment drops that episode,
        a TypeError from check_messages (a malformed reply) fails the call."""
        def guarded(episode):
            try:
                fn(episode)
            except TypeError as exc:
                if "must return a list of" in str(exc):
                    raise
                episode.error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                episode.error = f"{type(exc).__name__}: {exc}"
        list(self.pool.map(guarded, episodes))

    def run(self, engine: RolloutEngine, rows: list[dict], settings: SamplingSettings, *, routes: list[int],
            greedy: bool = False) -> list[Episode]:
        """settings.n episodes per row (greedy: one, temperature 0); routes: each row's server key."""
        n = 1 if greedy else settings.n
        episodes = [Episode(g, row, None) for g, row in enumerate(rows) for _ in range(n)]

        def reset(e: Episode) -> None:
            e.env = self.make_env()
            e.messages = check_messages(call(e.env.reset, e.row), type(e.env).__name__, "reset")
            e.renderer = self._renderer(e.env)
            e.prompt_ids = e.renderer.opening(e.messages)
            if len(e.prompt_ids) >= self.budgets.max_episode_tokens:
                raise ValueError(f"the opening messages are {len(e.prompt_ids)} tokens, no room left in "
                                 f"rollout.max_episode_tokens={self.budgets.max_episode_tokens} (null: data.seq_len): "
                                 "raise it")

        self._each(reset, episodes)
        turn = 0
        while any(e.live for e in episodes):
            live = [e for e in episodes if e.live]
            room = {id(e): self.budgets.max_episode_tokens - e.length for e in live}
            for e in live:
                if room[id(e)] < 1:
                    e.done, e.truncated = True, "max_episode_tokens"
            live = [e for e in live if e.live]
            if not live:
                break
            turn_settings = replace(settings, n=1, seed=settings.seed + turn * TURN_SEED_STRIDE,
                                    max_new_tokens=min(self.budgets.max_new_tokens, max(room[id(e)] for e in live)))
            completions = self._sample(engine, live, turn_settings, routes, greedy, first=turn == 0, n=n)
            for e, completion in zip(live, completions):
                self._add_turn(e, completion, room[id(e)])
            self._each(self._env_step, [e for e in live if e.live])
            turn += 1
        self._each(lambda e: setattr(e, "reward", call(e.env.reward, e.messages, e.row)),
                   [e for e in episodes if e.error is None])
        self._check_failures(episodes)
        return episodes

    def _sample(self, engine, live: list[Episode], settings: SamplingSettings, routes: list[int], greedy: bool, *,
                first: bool, n: int) -> list[Completion]:
        """One engine call for every live episode: on the first turn a group with equal openings is one request of
        n samples (the group's episodes in order), else one request per episode."""
        if greedy:
            outs = engine.greedy([e.prompt_ids + e.ids for e in live], max_new_tokens=settings.max_new_tokens)
            return [Completion(ids, [0.0] * len(ids), engine.version) for ids in outs]
        groups = [live[i:i + n] for i in range(0, len(live), n)] if first and n > 1 else []
        if groups and all(len(g) == n and len({tuple(e.prompt_ids) for e in g}) == 1
                          and len({e.group for e in g}) == 1 for g in groups):
            replies = engine.sample([g[0].prompt_ids for g in groups], replace(settings, n=n),
                                    routes=[routes[g[0].group] for g in groups])
            return [c for group in replies for c in group]
        replies = engine.sample([e.prompt_ids + e.ids for e in live], settings,
                                routes=[routes[e.group] for e in live])
        return [group[0] for group in replies]

    def _add_turn(self, e: Episode, completion: Completion, room: int) -> None:
        tokens = completion.token_ids[:room]
        versions = (completion.token_versions or [completion.version] * len(completion.token_ids))[:room]
        e.ids += tokens
        e.sampled += [True] * len(tokens)
        e.logprobs += completion.logprobs[:room]
        e.versions += versions
        e.turns += 1
        e.messages.append({"role": "assistant",
                           "content": self.tokenizer.decode(tokens, skip_special_tokens=True)})
        if not tokens or tokens[-1] not in self.stop_ids:
            e.done = True
            e.truncated = "max_episode_tokens" if len(completion.token_ids) > room else "max_new_tokens"

    def _env_step(self, e: Episode) -> None:
        replies, over = call(e.env.step, e.messages, e.row)
        replies = check_messages(replies, type(e.env).__name__, "step")
        conversation = list(e.messages)
        e.messages += replies
        if over:
            e.done = True
            return
        if e.turns >= self.budgets.max_turns:
            e.done, e.truncated = True, "max_turns"
            return
        reply_ids = e.renderer.continuation(conversation, replies)
        if e.length + len(reply_ids) >= self.budgets.max_episode_tokens:
            e.done, e.truncated = True, "max_episode_tokens"
            return
        e.ids += reply_ids
        e.sampled += [False] * len(reply_ids)
        e.logprobs += [0.0] * len(reply_ids)
        e.versions += [-1] * len(reply_ids)

    def _check_failures(self, episodes: list[Episode]) -> None:
        failed = [e for e in episodes if e.error is not None]
        if len(failed) > self.budgets.max_failed_fraction * len(episodes):
            first = failed[0]
            name = type(first.env).__name__ if first.env is not None else "the environment"
            task = first.row.get("task") or first.row.get("prompt", "")
            raise RuntimeError(f"{len(failed)} of {len(episodes)} episodes failed in environment {name} (more than "
                               f"rollout.max_failed_episodes={self.budgets.max_failed_fraction}); the first, on task "
                               f"{str(task)[:120]!r}: {first.error}")

