"""Async GRPO: the next steps' rollouts generate while this step trains (rollout.max_off_policy_steps = k >= 1).

    main thread (every rank)                          producer thread (every rank: its own prompts)
    ────────────────────────                          ──────────────────────────────────────────────
                                                      for j = s0+1, s0+2, ...:
                                                        wait until engine.version >= j - 1 - k    (gate)
                                                        prompts of step j (its own PromptSampler copy)
                                                        engine.sample(prompts)  ── vLLM server ──
                                                        rewards, group advantages
                                                        queue <- Batch(j, rollouts, timings)
    step j: batch = queue.get()      (trainer idle while it waits)
      drop groups with a rollout older than k versions (counted; cannot happen while the gate holds)
      sampler.next_prompts() must equal the batch's prompts (the checkpointed sampler = what was consumed)
      train (CP, FSDP) -> optimizer step -> version j
      engine.sync(policy, j, in_flight=True): the server freezes its requests for the transfer (/pause?mode=keep),
        loads the weights, tags them j and goes on (/resume): a completion in flight when the weights changed
        keeps its earlier tokens' version and gets j for the rest (a partial rollout, as PipelineRL / slime do);
        its lag is measured from its OLDEST token: lag = (version it trains at) - (oldest token's version)

    The gate keeps every rollout within k versions of the policy that trains on it: generation for step j starts
    only once the weights of version j-1-k are on the server. k = 0 is not this module: the synchronous loop.

Old log-probs: the engine's (rollout.old_logprobs=engine: the behaviour policy of each token, whatever version
sampled it) or, with rollout.old_logprobs=trainer, the policy's own at THIS step's weights (the proximal policy
of decoupled PPO, AReaL) with rollout.is_correction weighing p_trainer / p_engine, which then corrects the lag
and the engine mismatch together; the mismatch metrics are logged apart for rollouts of lag 0 (engine mismatch
alone) and lag >= 1 (lag + mismatch). Resume: the checkpoint holds the sampler as consumed, so rollouts that were
in flight are regenerated (with the resumed weights), not saved.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
import traceback
from dataclasses import dataclass


@dataclass
class Batch:
    """One step's rollouts from the producer."""

    step: int
    prompts: list  # this rank's Prompt objects
    rollouts: list  # grpo.Rollout, group by group, advantages assigned
    sums: dict  # reward sums for logging (rollouts.RolloutMaker.generate)
    generate_s: float
    ready_at: float  # time.perf_counter() when it was queued
    error: str | None = None


class RolloutProducer:
    """A thread that generates the rollouts of the next steps, at most k weight versions ahead."""

    def __init__(self, make_batch, engine, sampler, *, first_step: int, k: int):
        """make_batch(step, prompts) -> (rollouts, sums); engine: .version is read for the gate; sampler: a
        PromptSampler positioned at first_step's prompts (copied: the trainer's own advances on consumption)."""
        self.make_batch, self.engine, self.k = make_batch, engine, k
        self.sampler = copy.deepcopy(sampler)
        self.next_step = first_step
        self.queue: queue.Queue = queue.Queue(maxsize=k + 1)
        self.engine_idle_s, self.idle_lock = 0.0, threading.Lock()  # time at the gate: nothing of ours in flight
        self.stop_event = threading.Event()
        self.version_changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)

    def start(self) -> "RolloutProducer":
        self.thread.start()
        return self

    def notify_version(self) -> None:
        """The main thread synced new weights: the gate may open."""
        with self.version_changed:
            self.version_changed.notify_all()

    def _wait_gate(self, step: int) -> None:
        start = time.perf_counter()
        with self.version_changed:
            while self.engine.version < step - 1 - self.k and not self.stop_event.is_set():
                self.version_changed.wait(timeout=0.5)
        with self.idle_lock:
            self.engine_idle_s += time.perf_counter() - start

    def pop_engine_idle(self) -> float:
        """Seconds the producer waited at the gate since the last call."""
        with self.idle_lock:
            idle, self.engine_idle_s = self.engine_idle_s, 0.0
        return idle

    def _run(self) -> None:
        while not self.stop_event.is_set():
            step = self.next_step
            try:
                self._wait_gate(step)
                if self.stop_event.is_set():
                    return
                prompts = self.sampler.next_prompts()
                start = time.perf_counter()
                rollouts, sums = self.make_batch(step, prompts)
                batch = Batch(step, prompts, rollouts, sums, time.perf_counter() - start, time.perf_counter())
            except Exception as exc:  # reported to the main thread, which raises it
                batch = Batch(step, [], [], {}, 0.0, time.perf_counter(),
                              error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            start = time.perf_counter()
            while not self.stop_event.is_set():
                try:
                    self.queue.put(batch, timeout=0.5)
                    break
                except queue.Full:
                    continue
            with self.idle_lock:  # a full queue: the trainer is behind, nothing of ours in flight either
                self.engine_idle_s += time.perf_counter() - start
            if batch.error:
                return
            self.next_step += 1

    def take(self, step: int, timeout_s: float) -> tuple[Batch, float]:
        """Step `step`'s batch and how long the trainer waited for it."""
        start = time.perf_counter()
        try:
            batch = self.queue.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no rollouts for step {step} within rollout.timeout_s={timeout_s:.0f} s") from None
        if batch.error:
            raise RuntimeError(f"the rollout producer failed at step {batch.step}: {batch.error}")
        if batch.step != step:
            raise RuntimeError(f"the rollout producer delivered step {batch.step}, the trainer is at {step}")
        return batch, time.perf_counter() - start

    def close(self) -> None:
        self.stop_event.set()
        self.notify_version()
        self.thread.join(timeout=60)


def split_stale(rollouts: list, group_size: int, *, trains_at: int, k: int) -> tuple[list, int]:
    """(rollouts to train on, rollouts dropped): a group is dropped whole when one of its rollouts is older than
    k versions of the policy it trains at (group advantages need the whole group)."""
    from trainer.rl.rollouts import prompt_groups
    kept, dropped = [], 0
    for group in prompt_groups(rollouts, group_size):
        if max(trains_at - r.version for r in group) > k:
            dropped += len(group)
        else:
            kept += group
    return kept, dropped


def lag_histogram(rollouts: list, *, trains_at: int, k: int) -> dict[int, float]:
    """lag -> number of rollouts (lag = trains_at - the version of the rollout's oldest token), lags 0..k."""
    counts = dict.fromkeys(range(k + 1), 0.0)
    for r in rollouts:
        counts[min(max(trains_at - r.version, 0), k)] += 1
    return counts
