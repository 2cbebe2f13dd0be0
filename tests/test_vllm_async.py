"""Async GRPO on a real vLLM server (skipped without the vLLM venv, like tests/test_vllm_engine.py). The runs use
the session's shared server (tests/conftest.py: vllm_server) as an external server; every run syncs its weights first.

    lag bound   rollout.max_off_policy_steps=1 over 3 steps: at step 1 the trainer is slow (its optimizer step
                waits until the engine has queued step 2's rollouts: they train at lag 1), at step 3 the engine is
                slow (it holds the step's rollouts until the trainer has waited HOLD_S for them: idle time);
                every rollout that reaches a loss is at most 1 version old, none is dropped (the gate holds), the
                lag histogram sums to 1
    resume      a k=1 run resumed from a mid-run checkpoint regenerates the rollouts that were in flight: the
                resumed step trains on the same prompts as the uninterrupted run's
    in flight   a sync while completions are being sampled: each token's log-prob is the one of the weights its
                version span names
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from tests.dist import run_with_own_group
from tests.test_rl import RL_FAST, compose_rl
from tests.vllm_support import SKIP, VLLM_FAST

pytestmark = pytest.mark.skipif(SKIP is not None, reason=str(SKIP))

ASYNC = ["rollout.max_off_policy_steps=1", "rollout.eval_prompts=0"]
HOLD_S = 1.0  # how long the slowed engine lets the trainer wait for each of its batches


def _poll(condition, stop, timeout_s: float = 60.0) -> None:
    """Wait until condition() (or stop()), polling; a deadline instead of a hang."""
    deadline = time.monotonic() + timeout_s
    while not condition() and not stop():
        if time.monotonic() > deadline:
            raise TimeoutError("a slowed side waited past its deadline")
        time.sleep(0.02)


def _async_worker(rank, overrides, slow_trainer_steps=(), slow_engine_steps=()):
    """run_rl with k=1; returns the metrics and the lag of every rollout the engine delivered (before split_stale
    drops any: a bound checked after the filter could not fail). slow_trainer_steps:
    the optimizer step of these steps waits until the producer has queued the next batch; slow_engine_steps: the
    producer holds these steps' batches until the trainer has waited HOLD_S for them."""
    from trainer.rl import async_rollouts, loop

    seen = []
    split = async_rollouts.split_stale

    def recording_split(rollouts, group_size, *, trains_at, k):  # the lags of what the engine returned, unfiltered
        seen.extend(trains_at - r.version for r in rollouts)
        return split(rollouts, group_size, trains_at=trains_at, k=k)

    class SlowedProducer(async_rollouts.RolloutProducer):
        latest = None

        def __init__(self, make_batch, *args, **kwargs):
            super().__init__(self._held(make_batch), *args, **kwargs)
            self.waiting_since: dict[int, float] = {}
            SlowedProducer.latest = self

        def _held(self, make_batch):
            def held(step, prompts):
                batch = make_batch(step, prompts)
                if step in slow_engine_steps:
                    _poll(lambda: time.monotonic() - self.waiting_since.get(step, float("inf")) >= HOLD_S,
                          self.stop_event.is_set)
                return batch
            return held

        def take(self, step, timeout_s):
            self.waiting_since[step] = time.monotonic()
            return super().take(step, timeout_s)

    optimizer_step = loop.optimizer_step

    def slowed_optimizer_step(trainer):
        producer = SlowedProducer.latest
        if trainer.step + 1 in slow_trainer_steps:
            _poll(lambda: not producer.queue.empty(), producer.stop_event.is_set)
        return optimizer_step(trainer)

    loop.split_stale, loop.RolloutProducer, loop.optimizer_step = recording_split, SlowedProducer, slowed_optimizer_step
    history = loop.run_rl(compose_rl(RL_FAST + VLLM_FAST + ASYNC + overrides))
    return history, seen


def _shared(server, model) -> list[str]:
    return [f"model.name={model}", f"rollout.vllm.urls=[{server.url}]"]


def test_no_rollout_older_than_k_reaches_a_loss(tmp_path, shared_vllm):
    overrides = _shared(*shared_vllm) + ["max_steps=3", f"output_dir={tmp_path}"]
    results = run_with_own_group(_async_worker, 2, overrides, (1,), (3,), timeout=900)
    history = results[0][0]
    lags = [lag for _, seen in results for lag in seen]
    assert [h["step"] for h in history] == [1, 2, 3]
    assert lags and max(lags) <= 1 and min(lags) >= 0, lags
    for h in history:
        assert h["stale_dropped"] == 0
        assert abs(h["off_policy_lag_0_frac"] + h["off_policy_lag_1_frac"] - 1) < 1e-9, h
        assert "off_policy_lag_2_frac" not in h
    # the engine is ahead while the trainer is slow: step 2 trains rollouts sampled by step 1's weights
    assert history[1]["off_policy_lag_1_frac"] > 0, history
    # the trainer waits for a slow engine, and trainer_idle_s says so
    assert history[2]["trainer_idle_s"] >= HOLD_S, history


def test_a_resumed_async_run_regenerates_what_was_in_flight(tmp_path, shared_vllm):
    def prompts(path, step):
        return sorted(json.loads(line)["prompt"] for line in (path / "samples.jsonl").read_text().splitlines()
                      if json.loads(line)["step"] == step)

    run_dir, resumed_dir = tmp_path / "run", tmp_path / "resumed"
    common = _shared(*shared_vllm) + ["max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=0"]
    history = run_with_own_group(_async_worker, 2, common + [f"output_dir={run_dir}"], timeout=900)[0][0]
    assert [h["step"] for h in history] == [1, 2, 3]
    shutil.copytree(run_dir, resumed_dir, ignore=shutil.ignore_patterns("step_000003", "latest", "vllm_server.log"))
    again = run_with_own_group(_async_worker, 2, common + [f"output_dir={resumed_dir}", "resume=true"],
                               timeout=900)[0][0]
    assert [h["step"] for h in again] == [3]
    assert prompts(resumed_dir, 3) == prompts(run_dir, 3)  # step 3's prompts, regenerated from the checkpoint


def generated_tokens(client) -> float:
    """The server's count of generated tokens so far (Prometheus counter vllm:generation_tokens_total)."""
    from trainer.rl.rollout.vllm_client import prometheus_total
    return prometheus_total(client.get("/metrics")["text"], "vllm:generation_tokens_total")


def _perturb(trainer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.model.parameters():
            local = p.to_local()
            local.add_(torch.randn(local.shape, generator=generator) * 0.05)


def _in_flight_worker(rank, world, url, model_dir, attempts: int = 3):
    """Weights v_old on the server; long completions in flight; weights v_new synced with in_flight=True. Every
    token's log-prob must be the one of the weights its span names (v_old before the switch, v_new after). A machine
    too loaded to start the sync before the completions end (the sync must land mid-generation) tries again with
    the next two versions, up to `attempts` times; the report of the first attempt that switched is returned."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    import torch.distributed as dist
    import torch.nn.functional as F

    from trainer import config
    from trainer.engine import build_trainer
    from trainer.rl.prompts import make_prompts
    from trainer.rl.rollout.hf import HFRolloutEngine
    from trainer.rl.rollout.vllm_engine import VLLMRolloutEngine
    cfg = compose_rl(RL_FAST + VLLM_FAST + ["model.cp=1", f"model.name={model_dir}", f"rollout.vllm.urls=[{url}]"])
    trainer = build_trainer(cfg, validate=config.validate_rl)
    engine = VLLMRolloutEngine(cfg.rollout.vllm, model_path=model_dir, tokenizer=trainer.tokenizer,
                               dtype=torch.float32, max_model_len=512, seed=0, log_dir=str(model_dir))
    prompt = make_prompts("add", 1, seed=0, tokenizer=trainer.tokenizer)[0].input_ids
    params = {"n": 4, "temperature": 1.0, "max_tokens": 400, "logprobs": 0, "seed": 3, "ignore_eos": True}
    client, plain = engine.clients[0], HFRolloutEngine(trainer.model, trainer.tokenizer, trainer.device)
    for attempt in range(attempts):
        old, new = 2 * attempt + 1, 2 * attempt + 2
        _perturb(trainer, old)
        engine.sync(trainer.model, version=old)
        plain.sync(trainer.model, version=old)
        weights = {old: copy.deepcopy(plain.model)}
        _perturb(trainer, new)
        with ThreadPoolExecutor(1) as pool:
            before = generated_tokens(client)
            future = pool.submit(client.generate, prompt, params)
            _poll(lambda: generated_tokens(client) >= before + 40, future.done)  # the completions are under way
            start = time.perf_counter()
            stats = engine.sync(trainer.model, version=new, in_flight=True)
            sync_s = time.perf_counter() - start
            choices = future.result()
        plain.sync(trainer.model, version=new)
        weights[new] = plain.model
        report = []
        for choice in choices:
            tokens = choice["token_ids"]
            engine_logp = torch.tensor([e["logprob"] for e in choice["logprobs"]["content"]])
            ids = torch.tensor([prompt + tokens])
            own = {}
            for version, model in weights.items():
                with torch.no_grad():
                    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()  # [T, V]: predicts each token
                own[version] = F.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
            spans = [(s["start"], s["end"], int(s["version"])) for s in choice["weight_versions"]
                     if s["end"] > s["start"]]
            report.append({"spans": spans, "diffs": [
                {"version": v, "tokens": b - a, "own": float((engine_logp[a:b] - own[v][a:b]).abs().max()),
                 "other": float((engine_logp[a:b] - own[old + new - v][a:b]).abs().mean())} for a, b, v in spans]})
        if any([v for _, _, v in r["spans"]] == [old, new] for r in report):
            break
    engine.close()
    dist.destroy_process_group()
    return {"report": report, "sync_s": sync_s, "stats": stats, "versions": (old, new), "attempts": attempt + 1}


def test_in_flight_sync_continues_completions_on_the_new_weights(shared_vllm):
    """The choice this project made for a sync with requests in flight: frozen for the transfer, then continued on
    the new weights (no request is cut, none resubmitted); the tokens before and after carry their versions."""
    from tests.dist import run_distributed
    server, model = shared_vllm
    result = run_distributed(_in_flight_worker, 1, server.url, str(model), timeout=600)[0]
    switched = [r for r in result["report"] if [v for _, _, v in r["spans"]] == list(result["versions"])]
    assert switched, result  # the sync happened while the completions were being sampled
    for r in result["report"]:
        assert r["spans"][0][0] == 0 and r["spans"][-1][1] == 400, r  # every token has a version
        for d in r["diffs"]:
            assert d["own"] < 1e-3, r  # the weights its span names sampled it (fp32, different kernels)
            assert d["other"] > 1e-2 or d["tokens"] < 10, r  # and not the other weights
