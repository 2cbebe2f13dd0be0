"""The rollout engine interface (DESIGN rule 13): the GRPO loop talks to this, never to an engine's internals.

    loop, every step (all trainer ranks):
      engine.sync(policy, version)           collective: the policy's weights become the engine's, tagged
                                             `version` (= optimizer steps applied; hf: a plain copy,
                                             vllm: buckets through vLLM's weight-transfer protocol)
      engine.sample(prompts, settings, routes)   this rank's prompts, ALL submitted at once ->
                                             per prompt, settings.n Completion(token_ids, logprobs, version);
                                             routes: a key per prompt, equal keys go to the same server (the
                                             turns of one episode: its prefix stays in that server's cache)
      check_versions(completions, version)   a completion sampled with other weights is refused, never trained on
    eval: engine.greedy(prompts, max_new_tokens) -> completion token ids per prompt
    end:  engine.close()                     stops what the engine owns (servers), also on failure

Log-probs are the engine's own, of each sampled token at the sampling temperature over the full vocabulary
(top_p < 1 samples from the truncated distribution, whose log-prob the engine reports), in the engine's
numerics: the trainer compares them with its own (trainer/rl/logprob_mismatch.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    n: int  # completions per prompt (the GRPO group)
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int  # this rank's step seed; engines derive one per prompt from it


@dataclass
class Completion:
    token_ids: list[int]  # up to and including the end-of-turn token, if sampled
    logprobs: list[float]  # the engine's log-prob of each token, under the weights that sampled it
    version: int  # the weight version that sampled its FIRST token (its oldest: what its lag is measured from)
    newest: int | None = None  # the version of its last token when weights changed mid-completion (async GRPO's
                               # in-flight updates); None: every token has `version`
    token_versions: list[int] | None = None  # per token, where they differ (None: every token has `version`)


class StaleRolloutError(RuntimeError):
    """A rollout sampled with other weights than the step trains: never used for a loss."""


def check_versions(completions: list[Completion], expected: int) -> None:
    """Refuse completions not sampled entirely with weight version `expected` (the synchronous loop: this step's)."""
    off = [c for c in completions if c.version != expected or c.newest not in (None, expected)]
    stale = sorted({v for c in off for v in (c.version, c.newest) if v is not None and v != expected})
    if off:
        raise StaleRolloutError(f"{len(off)} of {len(completions)} rollouts "
                                f"were sampled with weight version(s) {stale}, this step trains version {expected}: "
                                "refusing to train on them (did a weight sync fail, or another trainer share the "
                                "server? rollout.vllm.urls must name servers this run alone updates)")


class RolloutEngine(ABC):
    """A step's prompts (token ids) in; completions, their log-probs and weight version out; weights in after each
    optimizer step."""

    version: int = -1  # the weight version the engine holds (-1: never synced)

    @abstractmethod
    def sync(self, policy: torch.nn.Module, version: int) -> dict:
        """Make the policy's current weights the engine's (a collective over every trainer rank); returns
        statistics (bytes, seconds) for the step's metrics."""

    @abstractmethod
    def sample(self, prompts: list[list[int]], settings: SamplingSettings,
               routes: list[int] | None = None) -> list[list[Completion]]:
        """settings.n completions of each prompt, all prompts submitted together; routes: a server key per prompt
        (None: spread by position)."""

    @abstractmethod
    def greedy(self, prompts: list[list[int]], *, max_new_tokens: int) -> list[list[int]]:
        """The greedy completion (token ids) of each prompt."""

    def step_metrics(self) -> dict:
        """Engine-side metrics of the step so far (vLLM: the servers' prefix-cache hit rate); read once per step."""
        return {}

    def close(self) -> None:
        """Release what the engine owns (idempotent)."""


def end_of_turn_id(tokenizer) -> int:
    """The token that ends a turn: ChatML's <|im_end|> where the vocabulary has it, else eos."""
    vocab = tokenizer.get_vocab()
    return vocab["<|im_end|>"] if "<|im_end|>" in vocab else tokenizer.eos_token_id


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """The tokens that end a completion, the same for every engine: the end of turn and eos (a model may end
    with either; an engine that stopped at one set and another at a different one would train on completions
    the other could not have sampled)."""
    return tuple(dict.fromkeys(t for t in (end_of_turn_id(tokenizer), tokenizer.eos_token_id) if t is not None))


def cut_at_end(tokens: list[int], stop_ids) -> list[int]:
    """A completion up to and including its first stop token (stop_ids: one id or several)."""
    stops = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    end = next((i for i, t in enumerate(tokens) if t in stops), None)
    return tokens if end is None else tokens[:end + 1]
