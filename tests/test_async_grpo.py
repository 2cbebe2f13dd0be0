"""Async GRPO (rollout.max_off_policy_steps, trainer/rl/async_rollouts.py): the producer's gate, staleness, lag
accounting and the startup checks, without a server; the vLLM runs are in tests/test_vllm_async.py."""

import threading
import time

import pytest

from tests.test_rl import RL_FAST, compose_rl
from trainer.rl import grpo
from trainer.rl.async_rollouts import RolloutProducer, lag_histogram, split_stale


class _Sampler:
    """A PromptSampler stand-in: step j's prompts are ["p<j>-0", "p<j>-1"]."""

    def __init__(self):
        self.steps = 0

    def next_prompts(self):
        self.steps += 1
        return [f"p{self.steps}-{i}" for i in range(2)]


class _Engine:
    version = 0


GATE_WINDOW_S = 0.3


def _wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met within the deadline"
        time.sleep(0.01)


def test_the_gate_keeps_generation_within_k_versions():
    """Step j is generated only once weights j-1-k are on the engine, whatever the trainer's pace: with k=1 and
    the trainer stuck at version 0, steps 1 and 2 are generated, step 3 waits until version 1."""
    engine, started = _Engine(), []

    def make_batch(step, prompts):
        started.append((step, engine.version))
        return [], {"samples": []}

    producer = RolloutProducer(make_batch, engine, _Sampler(), first_step=1, k=1).start()
    try:
        _wait_until(lambda: producer.next_step == 3)  # steps 1 and 2 queued: the producer is at step 3's gate
        time.sleep(GATE_WINDOW_S)  # a window in which step 3 could start if the gate did not hold
        assert [s for s, _ in started] == [1, 2], started  # step 3 needs version >= 1
        batch, _ = producer.take(1, timeout_s=5)
        assert batch.step == 1 and batch.prompts == ["p1-0", "p1-1"]
        engine.version = 1
        producer.notify_version()
        _wait_until(lambda: len(started) == 3)
        assert [s for s, _ in started] == [1, 2, 3]
        assert all(version >= step - 1 - 1 for step, version in started), started
        assert producer.pop_engine_idle() >= GATE_WINDOW_S  # it waited at the gate
    finally:
        producer.close()


def test_a_producer_failure_reaches_the_trainer():
    def make_batch(step, prompts):
        raise ConnectionError("server gone")

    producer = RolloutProducer(make_batch, _Engine(), _Sampler(), first_step=1, k=1).start()
    try:
        with pytest.raises(RuntimeError, match="server gone"):
            producer.take(1, timeout_s=10)
    finally:
        producer.close()


def test_take_names_a_missing_batch_after_the_timeout():
    gate = threading.Event()

    def make_batch(step, prompts):
        gate.wait(10)
        return [], {}

    producer = RolloutProducer(make_batch, _Engine(), _Sampler(), first_step=1, k=1).start()
    try:
        with pytest.raises(TimeoutError, match="rollout.timeout_s"):
            producer.take(1, timeout_s=0.5)
    finally:
        gate.set()
        producer.close()


def _rollout(version):
    return grpo.Rollout([1], [2], [-0.1], 0.0, version=version)


def test_groups_older_than_k_are_dropped_whole_and_counted():
    """Trains at version 5 with k=2: lag 0..2 kept; a group with one rollout of lag 3 (version 2) is dropped whole."""
    rollouts = [_rollout(5), _rollout(5), _rollout(3), _rollout(4), _rollout(2), _rollout(5)]
    kept, dropped = split_stale(rollouts, 2, trains_at=5, k=2)
    assert kept == rollouts[:4] and dropped == 2
    assert lag_histogram(kept, trains_at=5, k=2) == {0: 2.0, 1: 1.0, 2: 1.0}


def test_bad_async_settings_are_refused_at_startup():
    from trainer import config
    with pytest.raises(ValueError, match="must be >= 0"):
        config.validate_rl(compose_rl(RL_FAST + ["rollout.max_off_policy_steps=-1"]), 2)
    with pytest.raises(ValueError, match="rollout.engine=vllm"):
        config.validate_rl(compose_rl(RL_FAST + ["rollout.max_off_policy_steps=1"]), 2)
    config.validate_rl(compose_rl(RL_FAST + ["rollout.max_off_policy_steps=2", "rollout.engine=vllm"]), 2)
    # the trainer's own old log-probs make the ratio 1 for lagged tokens: only with a correction
    async_trainer = RL_FAST + ["rollout.max_off_policy_steps=1", "rollout.engine=vllm", "rollout.old_logprobs=trainer"]
    with pytest.raises(ValueError, match="trains lagged and in-flight tokens as on-policy.*rollout.is_correction"):
        config.validate_rl(compose_rl(async_trainer), 2)
    config.validate_rl(compose_rl(async_trainer + ["rollout.is_correction=token_truncate"]), 2)


TIMING = ("_s", "_per_s", "peak_mem_gb")  # wall-clock metrics: never equal across two runs


def test_k0_is_the_synchronous_loop_metric_for_metric(tmp_path):
    """rollout.max_off_policy_steps=0 runs the synchronous loop: no producer, no async metrics, and the same
    numbers as a run that never names the key (same seeds), step for step."""
    from tests.dist import run_distributed
    from tests.test_rl import _run_worker
    default = run_distributed(_run_worker, 2, [f"output_dir={tmp_path / 'a'}"], timeout=600)[0]
    k0 = run_distributed(_run_worker, 2, [f"output_dir={tmp_path / 'b'}", "rollout.max_off_policy_steps=0"],
                         timeout=600)[0]
    strip = lambda h: {k: v for k, v in h.items() if not k.endswith(TIMING)}
    assert [strip(h) for h in k0] == [strip(h) for h in default]
    assert not any(k.startswith(("off_policy_lag", "stale_dropped", "trainer_idle")) for h in k0 for k in h)
