"""Async GRPO on a real vLLM server (skipped without the vLLM venv, like tests/test_vllm_engine.py).

    lag bound   rollout.max_off_policy_steps=1 with a slowed trainer (the engine works ahead: lag-1 rollouts
                appear) and with a slowed engine (the trainer waits: idle time): every rollout that reaches a
                loss is at most 1 version old, none is dropped (the gate holds), the lag histogram sums to 1
    resume      a k=1 run resumed from a mid-run checkpoint regenerates the rollouts that were in flight: the
                resumed step trains on the same prompts as the uninterrupted run's
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from tests.test_rl import RL_FAST, compose_rl
from tests.test_vllm_engine import SKIP, VLLM_FAST

pytestmark = pytest.mark.skipif(SKIP is not None, reason=str(SKIP))

ASYNC = ["model.name=tiny:llama", "rollout.max_off_policy_steps=1", "rollout.eval_prompts=0"]


def _async_worker(rank, overrides, slow):
    """run_rl with one side slowed; returns the metrics and the lag of every rollout that reached a loss."""
    from trainer.rl import async_rollouts, loop
    from trainer.rl.rollout.vllm_engine import VLLMRolloutEngine

    seen = []
    split = async_rollouts.split_stale

    def recording_split(rollouts, group_size, *, trains_at, k):
        kept, dropped = split(rollouts, group_size, trains_at=trains_at, k=k)
        seen.extend(trains_at - r.version for r in kept)
        return kept, dropped

    loop.split_stale = recording_split
    if slow == "trainer":
        step = loop.optimizer_step
        loop.optimizer_step = lambda trainer: (time.sleep(4), step(trainer))[1]
    elif slow == "engine":
        sample = VLLMRolloutEngine.sample
        VLLMRolloutEngine.sample = lambda self, *a, **kw: (time.sleep(4), sample(self, *a, **kw))[1]
    history = loop.run_rl(compose_rl(RL_FAST + VLLM_FAST + ASYNC + overrides))
    return history, seen


@pytest.mark.parametrize("slow", ["trainer", "engine"])
def test_no_rollout_older_than_k_reaches_a_loss(tmp_path, slow):
    from tests.test_checkpoints import run_with_own_group
    results = run_with_own_group(_async_worker, 2, ["max_steps=4", f"output_dir={tmp_path}"], slow, timeout=900)
    history = results[0][0]
    lags = [lag for _, seen in results for lag in seen]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert lags and max(lags) <= 1 and min(lags) >= 0, lags
    for h in history:
        assert h["stale_dropped"] == 0
        assert abs(h["off_policy_lag_0_frac"] + h["off_policy_lag_1_frac"] - 1) < 1e-9, h
        assert "off_policy_lag_2_frac" not in h
    if slow == "trainer":  # the engine is ahead: rollouts sampled by the previous weights train
        assert any(h["off_policy_lag_1_frac"] > 0 for h in history[1:]), history
    else:  # the trainer waits for the engine
        assert sum(h["trainer_idle_s"] for h in history) > 4, history


def test_a_resumed_async_run_regenerates_what_was_in_flight(tmp_path):
    from tests.test_checkpoints import run_with_own_group

    def prompts(path, step):
        return sorted(json.loads(line)["prompt"] for line in (path / "samples.jsonl").read_text().splitlines()
                      if json.loads(line)["step"] == step)

    run_dir, resumed_dir = tmp_path / "run", tmp_path / "resumed"
    common = ["max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=0"]
    history = run_with_own_group(_async_worker, 2, common + [f"output_dir={run_dir}"], "none", timeout=900)[0][0]
    assert [h["step"] for h in history] == [1, 2, 3]
    shutil.copytree(run_dir, resumed_dir, ignore=shutil.ignore_patterns("step_000003", "latest", "vllm_server.log"))
    again = run_with_own_group(_async_worker, 2, common + [f"output_dir={resumed_dir}", "resume=true"], "none",
                               timeout=900)[0][0]
    assert [h["step"] for h in again] == [3]
    assert prompts(resumed_dir, 3) == prompts(run_dir, 3)  # step 3's prompts, regenerated from the checkpoint


def _perturb(trainer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.model.parameters():
            local = p.to_local()
            local.add_(torch.randn(local.shape, generator=generator) * 0.05)


def _in_flight_worker(rank, world, url, model_dir):
    """Weights v1 on the server; long completions in flight; weights v2 synced with in_flight=True. Every token's
    log-prob must be the one of the weights its span names (v1 before the switch, v2 after)."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    import torch.distributed as dist
    import torch.nn.functional as F

    from trainer import config
    from trainer.engine import build_trainer
    from trainer.rl.prompts import make_prompts
    from trainer.rl.rollout.hf import HFRolloutEngine
    from trainer.rl.rollout.vllm_engine import VLLMRolloutEngine
    from tests.test_vllm_engine import VLLM_FAST
    cfg = compose_rl(RL_FAST + VLLM_FAST + ["model.cp=1", f"model.name={model_dir}", f"rollout.vllm.urls=[{url}]"])
    trainer = build_trainer(cfg, validate=config.validate_rl)
    engine = VLLMRolloutEngine(cfg.rollout.vllm, model_path=model_dir, tokenizer=trainer.tokenizer,
                               dtype=torch.float32, max_model_len=512, seed=0, log_dir=str(model_dir))
    _perturb(trainer, 1)
    engine.sync(trainer.model, version=1)
    plain = HFRolloutEngine(trainer.model, trainer.tokenizer, trainer.device)
    plain.sync(trainer.model, version=1)
    weights = {1: copy.deepcopy(plain.model)}
    _perturb(trainer, 2)
    prompt = make_prompts("add", 1, seed=0, tokenizer=trainer.tokenizer)[0].input_ids
    params = {"n": 4, "temperature": 1.0, "max_tokens": 400, "logprobs": 0, "seed": 3, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(engine.clients[0].generate, prompt, params)
        time.sleep(2.0)  # the completions are under way
        start = time.perf_counter()
        stats = engine.sync(trainer.model, version=2, in_flight=True)
        sync_s = time.perf_counter() - start
        choices = future.result()
    plain.sync(trainer.model, version=2)
    weights[2] = plain.model
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
        spans = [(s["start"], s["end"], int(s["version"])) for s in choice["weight_versions"] if s["end"] > s["start"]]
        report.append({"spans": spans, "diffs": [
            {"version": v, "tokens": b - a, "own": float((engine_logp[a:b] - own[v][a:b]).abs().max()),
             "other": float((engine_logp[a:b] - own[3 - v][a:b]).abs().mean())} for a, b, v in spans]})
    engine.close()
    dist.destroy_process_group()
    return {"report": report, "sync_s": sync_s, "stats": stats}


def test_in_flight_sync_continues_completions_on_the_new_weights(tmp_path):
    """The choice this project made for a sync with requests in flight: frozen for the transfer, then continued on
    the new weights (no request is cut, none resubmitted); the tokens before and after carry their versions."""
    from tests.dist import run_distributed
    from tests.test_vllm_engine import _export_tiny_llama, _spec
    from trainer.rl.rollout.vllm_server import VLLMServer
    model = _export_tiny_llama(tmp_path / "tiny")
    server = VLLMServer(_spec(model, tmp_path / "server.log")).start()
    try:
        result = run_distributed(_in_flight_worker, 1, server.url, str(model), timeout=600)[0]
    finally:
        server.stop()
    switched = [r for r in result["report"] if [v for _, _, v in r["spans"]] == [1, 2]]
    assert switched, result  # the sync happened while the completions were being sampled
    for r in result["report"]:
        assert r["spans"][0][0] == 0 and r["spans"][-1][1] == 400, r  # every token has a version
        for d in r["diffs"]:
            assert d["own"] < 1e-3, r  # the weights its span names sampled it (fp32, different kernels)
            assert d["other"] > 1e-2 or d["tokens"] < 10, r  # and not the other weights
