"""Config keys that used to do nothing are wired or refused, and RL eval prompts are held out.

log_every sets the W&B / progress cadence; GRPO refuses optim.grad_accum, data.limit on the built-in
tasks and a negative or too small rollout.eval_prompts at validation (a data.source file is a prompt
dataset: tests/test_rl_prompts.py); the eval prompts cover every task of the
mix and never appear in the training prompt pool."""

import collections

import pytest
from omegaconf import OmegaConf

from tests.test_rl import RL_FAST, compose_rl
from trainer import config


@pytest.mark.parametrize("overrides,match", [
    (["optim.grad_accum=2"], r"optim.grad_accum=2 is not used by GRPO.*raise rollout.prompts_per_step"),
    (["data.limit=10"], r"data.limit=10 is not used with data.source=builtin .*set data.source to a prompt dataset"),
    (["data.source=my_data.jsonl", "rollout.eval_prompts=-1"], r"rollout.eval_prompts=-1 must be >= 0"),
    (["rollout.eval_prompts=-1"], r"rollout.eval_prompts=-1 must be 0 \(no eval\) or >= 3"),
    (["rollout.task=mixed", "rollout.eval_prompts=4"], r"rollout.eval_prompts=4 must be 0 .* or >= 5"),
    (["log_every=0"], r"log_every=0 must be >= 1"),
    (["checkpoint.keep_last=-1"], r"checkpoint.keep_last=-1 must be >= 0"),
    (["rollout.env=verifiers:my_tasks"], r"verifiers environments are not supported yet.*verifiers_bridge.md"),
    (["model.lora.rank=4", "model.dtype=bfloat16", "checkpoint.export_hf=true", "checkpoint.export_merged=true"],
     r"export_merged=true writes W \+ scale B A in bfloat16.*checkpoint.export_dtype=float32"),
    (["model.mixer_cp=scan"], r"model.mixer_cp='scan': choose ulysses or state"),
])
def test_rl_refuses_keys_it_would_ignore(overrides, match):
    cfg = compose_rl(RL_FAST + ["rollout.task=arithmetic"] + overrides)
    with pytest.raises(ValueError, match=match):
        config.validate_rl(cfg, 2)


def test_an_owned_server_is_refused_where_ranks_cannot_reach_it_or_others_can(monkeypatch):
    """The owned server listens on a private Unix socket: unreachable from other nodes (refused there unless TCP on
    a routable address is acknowledged with expose_control_plane); host/port without that opt-in would be ignored
    (refused); external servers may be TCP or Unix sockets."""
    vllm = RL_FAST + ["rollout.engine=vllm", "rollout.prompts_per_step=4"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"unreachable from the other nodes.*rollout.vllm.urls.*expose_control_plane"):
        config.validate_rl(compose_rl(vllm), 4)
    config.validate_rl(compose_rl(vllm), 2)  # one node
    for urls in ("[http://10.0.0.5:8000]", "[unix:/run/vllm/a.sock]"):  # the user's servers
        config.validate_rl(compose_rl(vllm + [f"rollout.vllm.urls={urls}"]), 4)
    with pytest.raises(ValueError, match="neither http"):
        config.validate_rl(compose_rl(vllm + ["rollout.vllm.urls=[ftp://a]"]), 2)
    for key in ("rollout.vllm.host=0.0.0.0", "rollout.vllm.port=8000"):
        with pytest.raises(ValueError, match="would be ignored.*Unix socket.*rollout.vllm.expose_control_plane=true"):
            config.validate_rl(compose_rl(vllm + [key]), 2)
    loopback_tcp = vllm + ["rollout.vllm.expose_control_plane=true"]
    config.validate_rl(compose_rl(loopback_tcp), 2)
    with pytest.raises(ValueError, match="unreachable from the other nodes"):
        config.validate_rl(compose_rl(loopback_tcp), 4)
    exposed = loopback_tcp + ["rollout.vllm.host=10.0.0.1"]
    config.validate_rl(compose_rl(exposed), 4)  # an address every node reaches, the exposure acknowledged


class _FakeRun:
    def __init__(self):
        self.steps = []

    def log(self, metrics, step):
        self.steps.append(step)


def test_log_every_sets_the_wandb_cadence_and_metrics_jsonl_keeps_every_step(tmp_path):
    from trainer.run.metrics import MetricsLogger
    cfg = OmegaConf.structured(config.SFTConfig(output_dir=str(tmp_path), log_every=2))
    cfg.wandb.mode = "disabled"
    logger = MetricsLogger(cfg, rank=0, total_steps=5, start_step=0, job="sft")
    logger.run = run = _FakeRun()
    for step in range(1, 6):
        logger.log(step, {"loss": 1.0 / step, "lr": 1e-3})
    logger.run = None
    logger.close("done")
    assert run.steps == [2, 4, 5], "W&B gets every log_every-th step and the last one"
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize("task,n", [("mixed", 10), ("arithmetic", 64), ("mul", 64)])
def test_eval_prompts_cover_every_task_and_are_disjoint_from_the_training_pool(task, n):
    from trainer.rl import tasks
    from trainer.rl.loop import build_prompt_sets
    from trainer.data.tokenizer import load_tokenizer
    cfg = compose_rl(RL_FAST + [f"rollout.task={task}", f"rollout.eval_prompts={n}"])
    pool, held_out = build_prompt_sets(cfg, load_tokenizer("builtin"))
    assert len(held_out) == n
    counts = collections.Counter(p.task for p in held_out)
    parts = tasks.task_components(task)
    assert set(counts) == set(parts), f"eval tasks {dict(counts)} do not cover {parts}"
    assert max(counts.values()) - min(counts.values()) <= 1, f"unequal shares {dict(counts)}"
    overlap = {p.prompt for p in pool} & {p.prompt for p in held_out}
    assert not overlap, f"{len(overlap)} eval prompts are also training prompts, e.g. {sorted(overlap)[:3]}"
    assert len(pool) == 4096
