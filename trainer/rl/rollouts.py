"""The rollouts side of GRPO: prompts -> episodes (environment + engine) -> scored, grouped trajectories.

    RolloutMaker(cfg, tokenizer, rewards)            once per run: the environment class, budgets, reward weights
    .generate(engine, prompts, step)                 this rank's prompts of step `step` + 1
        episodes = EpisodeRunner.run               (trainer/rl/episodes.py: group_size episodes per prompt, token
                                                    in / token out; sampled tokens keep log-prob and version)
        synchronous loop: every sampled token must carry this step's weight version (check_versions)
        reward = sum_i w_i * reward.functions_i(prompt, last model turn, **columns, messages=)
                 + the environment's reward (its parts summed)
        rollout.truncated: keep | mask (no loss) | overlong_penalty (DAPO's soft punishment on the length)
        group advantages over each prompt's surviving episodes (a dropped episode leaves its group smaller)
        -> [grpo.Rollout] (prompt ids, every later id, loss mask = sampled, engine log-probs, versions), sums
    .evaluate(engine, prompts)                       greedy: single_turn the task's accuracy, else mean reward

Single-turn GRPO is the environment whose step ends the episode at once: its first-turn request is the same one
request of group_size samples per prompt it always was, so its numbers are unchanged.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from trainer.rl import grpo, tasks
from trainer.rl.envs import resolve_env
from trainer.rl.envs.base import SingleTurnEnv
from trainer.rl.episodes import Budgets, Episode, EpisodeRunner
from trainer.rl.rollout.base import Completion, RolloutEngine, SamplingSettings, check_versions, stop_token_ids

TRUNCATION_POLICIES = ("keep", "mask", "overlong_penalty")
SAMPLES_PER_STEP = 4  # rows of the W&B samples table per rank and step


def sampling_settings(cfg, step: int) -> SamplingSettings:
    """Sampling for the rollouts of step `step` + 1 (a seed per step and rank, the same in sync and async runs)."""
    r, rank = cfg.rollout, dist.get_rank()
    return SamplingSettings(n=r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                            top_p=r.top_p, seed=cfg.seed * 1_000_003 + step * 10_007 + rank * 101)


def group_advantages_by_prompt(rollouts: list[grpo.Rollout], *, scale: bool) -> None:
    """Advantages in place, each prompt's episodes (Rollout.group) compared among themselves."""
    for group in prompt_groups(rollouts, len(rollouts)):
        if len(group) == 1:  # the others were dropped: nothing to compare with
            group[0].advantage = 0.0
            continue
        advantages = grpo.group_advantages(torch.tensor([x.reward for x in group]), len(group), scale=scale)
        for rollout, adv in zip(group, advantages.tolist()):
            rollout.advantage = adv


def prompt_groups(rollouts: list[grpo.Rollout], group_size: int) -> list[list[grpo.Rollout]]:
    """The rollouts by prompt, in order: by Rollout.group, or (rollouts made without one) group_size consecutive."""
    if any(r.group < 0 for r in rollouts):
        return [rollouts[i:i + group_size] for i in range(0, len(rollouts), group_size)]
    groups: dict[int, list] = {}
    for rollout in rollouts:
        groups.setdefault(rollout.group, []).append(rollout)
    return list(groups.values())


def overlong_penalty(length: int, most: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to most - buffer tokens, then falling linearly to -1 at `most`."""
    if length <= most - buffer:
        return 0.0
    return max(-1.0, ((most - buffer) - length) / buffer)


def episode_record(e: Episode, reward: float, parts: dict) -> dict:
    """One episode as a line of output_dir/rollouts.jsonl."""
    return {"messages": e.messages, "prompt_ids": e.prompt_ids, "token_ids": e.ids, "loss_mask": e.sampled,
            "logprobs": e.logprobs, "versions": e.versions, "reward": reward, "reward_parts": parts,
            "turns": e.turns, "truncated": e.truncated, "task": e.row.get("task", "")}


class RolloutMaker:
    def __init__(self, cfg, tokenizer, rewards: list):
        """rewards: resolved reward.functions (batched or per-sample; adapted here)."""
        r = cfg.rollout
        self.env_class, self.env_args = resolve_env(r.env), dict(r.env_args)
        if "tokenizer" in inspect.signature(self.env_class).parameters and "tokenizer" not in self.env_args:
            self.env_args["tokenizer"] = tokenizer  # a tool environment renders its tools where the template cannot
        self.single_turn = self.env_class is SingleTurnEnv
        self.budget = r.max_episode_tokens or cfg.data.seq_len
        self.budgets = Budgets(max_turns=1 if self.single_turn else r.max_turns, max_new_tokens=r.max_new_tokens,
                               max_episode_tokens=self.budget, max_failed_fraction=r.max_failed_episodes)
        self.runner = EpisodeRunner(lambda: self.env_class(**self.env_args), tokenizer, stop_token_ids(tokenizer),
                                    self.budgets)
        self.rewards = [tasks.as_batched(fn) for fn in rewards]
        self.names, self.weights = list(cfg.reward.functions), list(cfg.reward.weights)
        self.truncated, self.overlong_buffer = r.truncated, r.overlong_buffer
        self.log_episodes, self.cfg = r.log_episodes, cfg
        from trainer.rl import policy_losses
        self.scale_advantages = policy_losses.scale_advantages(cfg)

    def close(self) -> None:
        self.runner.close()

    def _score(self, prompts: list, episodes: list[Episode]) -> tuple[list[float], list[dict]]:
        """(total reward, parts) per episode: reward.functions on the last model turn (+ messages=) weighted, plus
        the environment's reward."""
        owners = [prompts[e.group] for e in episodes]
        columns = [p.reward_columns() for p in owners]
        names = list(dict.fromkeys(k for row in columns for k in row))
        batched = {k: [row.get(k) for row in columns] for k in names}
        batched["messages"] = [e.messages for e in episodes]
        scores = tasks.score(self.rewards, [p.prompt for p in owners], [e.last_reply() for e in episodes], batched)
        totals, parts = [], []
        for j, e in enumerate(episodes):
            part = {name: values[j] for name, values in zip(self.names, scores)}
            env = e.reward if isinstance(e.reward, dict) else ({} if e.reward is None else {"": e.reward})
            part.update({f"env_{k}".rstrip("_"): float(v) for k, v in env.items()})
            totals.append(sum(w * part[name] for w, name in zip(self.weights, self.names))
                          + sum(float(v) for v in env.values()))
            parts.append(part)
        return totals, parts

    def _most_after_prompt(self, e: Episode) -> int:
        """The most tokens the episode could have had after its prompt (DAPO's L_max)."""
        turns = self.budgets.max_turns
        return min(self.budget - len(e.prompt_ids), turns * self.budgets.max_new_tokens + e.env_tokens)

    def generate(self, engine: RolloutEngine, prompts: list, step: int, *,
                 synchronous: bool = True) -> tuple[list[grpo.Rollout], dict]:
        """This rank's rollouts for step `step` + 1 and their sums for logging (every rank's keys may differ:
        reward_metrics gathers them as objects)."""
        settings = sampling_settings(self.cfg, step)
        base = dist.get_rank() * len(prompts)
        episodes = self.runner.run(engine, [p.env_row() for p in prompts], settings,
                                   routes=[base + i for i in range(len(prompts))])
        kept = [e for e in episodes if e.error is None]
        if synchronous:
            check_versions([Completion(e.ids, e.logprobs, e.oldest_version(),
                                       e.newest_version() if e.newest_version() != e.oldest_version() else None)
                            for e in kept], expected=step)
        totals, parts = self._score(prompts, kept)
        rollouts = []
        for e, total in zip(kept, totals):
            mask = list(e.sampled)
            if e.truncated and self.truncated == "mask":
                mask = [False] * len(mask)
            if self.truncated == "overlong_penalty":
                most = self._most_after_prompt(e)
                total += overlong_penalty(len(e.ids), most, self.overlong_buffer or max(1, most // 4))
            rollouts.append(grpo.Rollout(e.prompt_ids, e.ids, e.logprobs, total, version=e.oldest_version(),
                                         loss_mask=mask, token_versions=e.versions, group=e.group))
        group_advantages_by_prompt(rollouts, scale=self.scale_advantages)
        return rollouts, self._sums(prompts, episodes, kept, rollouts, parts)

    def _sums(self, prompts, episodes, kept, rollouts, parts) -> dict:
        sums = {"reward": 0.0, "reward_sq": 0.0, "n": 0.0, "length": 0.0, "max_length": 0.0, "turns": 0.0,
                "env_tokens": 0.0, "episode_tokens": 0.0, "max_episode_tokens": 0.0, "truncated": 0.0,
                "episodes": float(len(episodes)), "dropped": float(len(episodes) - len(kept))}
        samples, records = [], []
        for e, rollout, part in zip(kept, rollouts, parts):
            sampled = sum(e.sampled)
            for name, value in part.items():
                sums[f"reward_{name}"] = sums.get(f"reward_{name}", 0.0) + value
            sums.update(reward=sums["reward"] + rollout.reward, reward_sq=sums["reward_sq"] + rollout.reward ** 2,
                        n=sums["n"] + 1, length=sums["length"] + sampled, max_length=max(sums["max_length"], sampled),
                        turns=sums["turns"] + e.turns, env_tokens=sums["env_tokens"] + e.env_tokens,
                        episode_tokens=sums["episode_tokens"] + e.length,
                        max_episode_tokens=max(sums["max_episode_tokens"], e.length),
                        truncated=sums["truncated"] + bool(e.truncated))
            if len(samples) < SAMPLES_PER_STEP:
                samples.append([prompts[e.group].prompt, e.last_reply(), prompts[e.group].answer, rollout.reward])
            if len(records) < self.log_episodes:
                records.append(episode_record(e, rollout.reward, part))
        for e in kept:
            for key, value in (e.env.metrics() if hasattr(e.env, "metrics") else {}).items():
                sums[f"env_{key}"] = sums.get(f"env_{key}", 0.0) + float(value)
        return {**sums, "samples": samples, "episode_records": records}

    def evaluate(self, engine: RolloutEngine, prompts: list, *,
                 open_answers: bool) -> tuple[float, float, dict[str, float]]:
        """(score sum, count, reward part sums) of greedy episodes on this rank's eval prompts: single_turn, the
        task's accuracy (the <answer> tag; a user dataset: the open-answer check; no parts); other environments,
        the reward as trained and each of its parts (reward_<part>)."""
        if self.single_turn:
            grade = tasks.open_correctness_reward if open_answers else tasks.correctness_reward
            completions = engine.greedy([p.input_ids for p in prompts], max_new_tokens=self.budgets.max_new_tokens)
            decode = self.runner.tokenizer.decode
            return float(sum(grade(p.prompt, decode(c, skip_special_tokens=True), p.answer)
                             for p, c in zip(prompts, completions))), float(len(prompts)), {}
        settings = SamplingSettings(n=1, max_new_tokens=self.budgets.max_new_tokens, temperature=1.0, top_p=1.0,
                                    seed=0)
        episodes = self.runner.run(engine, [p.env_row() for p in prompts], settings,
                                   routes=list(range(len(prompts))), greedy=True)
        kept = [e for e in episodes if e.error is None]
        totals, parts = self._score(prompts, kept)
        part_sums: dict[str, float] = {}
        for part in parts:
            for name, value in part.items():
                part_sums[f"reward_{name}"] = part_sums.get(f"reward_{name}", 0.0) + value
        return float(sum(totals)), float(len(episodes)), part_sums


def reward_metrics(sums: dict, rollouts: list, group=None) -> dict:
    """Reward, advantage, length and episode statistics over ALL ranks' rollouts (each counted once). The sums'
    keys may differ between ranks (an environment's reward parts, tool counters): gathered as objects."""
    adv = [r.advantage for r in rollouts]
    local = {**{k: v for k, v in sums.items() if k not in ("samples", "episode_records")},
             "adv": sum(adv), "adv_abs": sum(abs(a) for a in adv), "adv_sq": sum(a * a for a in adv)}
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    totals: dict[str, float] = {}
    for part in gathered:
        for key, value in part.items():
            totals[key] = max(totals.get(key, value), value) if key.startswith("max_") else totals.get(key, 0) + value
    n = max(totals["n"], 1.0)
    mean, adv_mean = totals["reward"] / n, totals["adv"] / n
    std = lambda sq, m: max(sq / n - m * m, 0.0) ** 0.5
    metrics = {"reward_mean": mean, "reward_std": std(totals["reward_sq"], mean),
               "completion_len_mean": totals["length"] / n, "completion_len_max": totals["max_length"],
               "adv_mean": adv_mean, "adv_abs_mean": totals["adv_abs"] / n, "adv_std": std(totals["adv_sq"], adv_mean),
               "turns_mean": totals["turns"] / n, "truncated_frac": totals["truncated"] / n,
               "env_token_frac": totals["env_tokens"] / max(totals["env_tokens"] + totals["length"], 1.0),
               "episode_len_mean": totals["episode_tokens"] / n, "episode_len_max": totals["max_episode_tokens"],
               "episodes_dropped": totals["dropped"]}
    metrics.update({key: totals[key] / n for key in sorted(totals) if key.startswith("reward_") and key != "reward_sq"})
    if totals.get("env_tool_calls"):
        metrics["tool_call_success"] = totals.get("env_tool_call_successes", 0.0) / totals["env_tool_calls"]
    metrics.update({key: totals[key] for key in sorted(totals) if key.startswith("env_")})
    return metrics
