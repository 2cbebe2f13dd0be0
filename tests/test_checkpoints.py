"""Checkpoints and faults lose nothing (issue 11, part 4).

- a non-finite gradient norm stops the step before optimizer.step(); nothing non-finite is saved
- `latest` is only followed when it names a complete checkpoint; a torn metrics.jsonl line does not
  block resume
- one SFT run's life in one output_dir (module fixture, 2 gloo ranks): retention, a refused fresh run,
  a resume that honours a new lr / max_steps, a resume at max_steps that rewrites nothing, refused
  layout changes with the diff, overwrite=true
- a slow HF export and a slow generating rank do not trip the collective timeout (timeout_s=10)
"""

import json
import math
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.dist import run_distributed, run_with_own_group
from tests.test_rl import RL_FAST, compose_rl
from tests.test_sft import FAST, compose_cfg

# ---------------------------------------------------------------- non-finite gradients


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _nan_gradient_worker(rank, world, output_dir):
    from trainer import loss
    from trainer.sft import run_sft
    original, calls = loss.shard_loss_sum, []

    def poisoned_at_step_2(model, shard, **kwargs):
        calls.append(1)
        value = original(model, shard, **kwargs)
        return _NanGradient.apply(value) if len(calls) == 2 else value

    loss.shard_loss_sum = poisoned_at_step_2
    with pytest.raises(FloatingPointError, match=r"non-finite gradient norm nan at step 2: stopped before the "
                                                 r"optimizer step, nothing saved after step 1"):
        run_sft(compose_cfg(FAST + ["max_steps=3", "checkpoint.every=1", f"output_dir={output_dir}"]))
    return "stopped"


def test_non_finite_gradient_norm_stops_before_the_optimizer_step(tmp_path):
    assert run_distributed(_nan_gradient_worker, 2, str(tmp_path), timeout=300) == ["stopped", "stopped"]
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"], "a checkpoint after the NaN step"
    assert (root / "latest").read_text() == "step_000001"
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(root / "step_000001", tmp_path / "step1.pt")
    state = torch.load(tmp_path / "step1.pt", weights_only=False)
    for name, tensor in state["model"].items():
        assert torch.isfinite(tensor).all(), f"saved parameter {name} is not finite"


# ---------------------------------------------------------------- markers and logs on disk


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"step_{step:06d}"
    path.mkdir(parents=True)
    if complete:
        (path / "complete.json").write_text(json.dumps({"step": step}))
    return path


@pytest.mark.parametrize("marker", ["", "step_0000", "step_000006", "step_000002\x00\x00", "step_\udcff"])
def test_latest_marker_empty_torn_or_naming_an_incomplete_checkpoint_is_not_followed(tmp_path, marker):
    from trainer.run.checkpoint import latest_checkpoint
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 2)
    newest = _fake_checkpoint(root, 4)
    _fake_checkpoint(root, 6, complete=False)  # a crash mid-save: some ranks' files only
    (root / "latest").write_bytes(marker.encode(errors="surrogateescape"))
    assert latest_checkpoint(str(tmp_path)) == newest
    (root / "latest").write_text("step_000002")
    assert latest_checkpoint(str(tmp_path)) == root / "step_000002", "a valid marker is followed"


def test_keep_last_deletes_old_complete_checkpoints_but_never_the_latest(tmp_path):
    from trainer.run.checkpoint import prune_checkpoints
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        _fake_checkpoint(root, step)
    (root / "latest").write_text("step_000002")  # e.g. the run crashed between rename and marker
    prune_checkpoints(str(tmp_path), keep_last=1)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002", "step_000004"]


def test_torn_last_metrics_line_does_not_block_resume(tmp_path):
    from trainer import config
    from trainer.run.metrics import MetricsLogger
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')  # crash mid-write
    cfg = OmegaConf.structured(config.SFTConfig(output_dir=str(tmp_path)))
    cfg.wandb.mode = "disabled"
    for rank in (1, 0):
        MetricsLogger(cfg, rank=rank, total_steps=6, start_step=3, job="sft").close("")
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines) + "\n"


# ---------------------------------------------------------------- one run's life in one output_dir


def _files(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def _checkpoint_names(output_dir: Path) -> list[str]:
    return sorted(p.name for p in (output_dir / "checkpoints").iterdir())


def _phase(obs: dict, name: str, fn):
    """Run one phase on every rank; an exception (a refusal) is recorded, not raised."""
    try:
        obs[name] = fn()
    except Exception as exc:
        obs[name] = f"{type(exc).__name__}: {exc}"


def _lifecycle_worker(rank, world, output_dir):
    import torch.distributed as dist

    from trainer.sft import run_sft
    out = Path(output_dir)
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda *a, **k: None  # several runs in one process group
    base = FAST + ["checkpoint.every=1", f"output_dir={out}"]

    def run(*overrides):  # -> the lr of every step this run trained
        return [h["lr"] for h in run_sft(compose_cfg(base + list(overrides)))]

    obs = {}
    try:
        _phase(obs, "run_a", lambda: run("max_steps=4", "optim.lr=3e-3"))
        obs["after_a"] = _checkpoint_names(out)
        _phase(obs, "fresh", lambda: run("max_steps=4", "optim.lr=1e-3"))
        if dist.get_rank() == 0:
            (out / "checkpoints" / "step_000009.tmp").mkdir()  # a crash mid-save left it: cleared at start
        dist.barrier()
        _phase(obs, "resumed", lambda: run("max_steps=6", "optim.lr=1e-3", "resume=true"))
        obs["after_resume"] = _checkpoint_names(out)
        dist.barrier()
        before = _files(out / "checkpoints")
        _phase(obs, "at_max", lambda: run("max_steps=6", "optim.lr=1e-3", "resume=true"))
        obs["rewritten"] = sorted(k for k, v in _files(out / "checkpoints").items() if before.get(k) != v)
        for key, change in (("cp_change", "model.cp=1"), ("seq_len_change", "data.seq_len=256")):
            _phase(obs, key, lambda: run("max_steps=8", "resume=true", change))
        _phase(obs, "overwrite", lambda: run("max_steps=2", "overwrite=true", "checkpoint.every=0"))
        obs["after_overwrite"] = _checkpoint_names(out)
        obs["metrics_steps"] = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    finally:
        dist.destroy_process_group = destroy
    return obs


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    out = tmp_path_factory.mktemp("lifecycle")
    return run_distributed(_lifecycle_worker, 2, str(out), timeout=600)[0]


def test_keep_last_retains_the_two_newest_checkpoints(lifecycle):
    assert lifecycle["after_a"] == ["latest", "step_000003", "step_000004"], "checkpoint.keep_last defaults to 2"


def test_fresh_run_into_a_directory_with_checkpoints_refuses(lifecycle):
    assert str(lifecycle["fresh"]).startswith("ValueError: output_dir="), lifecycle["fresh"]
    assert "set resume=true to continue it, overwrite=true" in lifecycle["fresh"]


def test_resume_takes_lr_and_max_steps_from_the_new_config(lifecycle):
    from trainer.optim import lr_factor
    assert isinstance(lifecycle["resumed"], list), lifecycle["resumed"]
    expected = [1e-3 * lr_factor(step, warmup=1, total=6, schedule="cosine", min_ratio=0.1) for step in (4, 5)]
    # metrics.jsonl rounds to 6 decimals; the old lr (3e-3) would be 3x off
    assert lifecycle["resumed"] == pytest.approx(expected, abs=1e-6), "lr must come from the config, not the checkpoint"
    assert lifecycle["after_resume"] == ["latest", "step_000005", "step_000006"], "stale step_N.tmp must be cleared"


def test_resume_at_max_steps_rewrites_no_checkpoint(lifecycle):
    assert lifecycle["at_max"] == []
    assert lifecycle["rewritten"] == [], f"files rewritten in place: {lifecycle['rewritten'][:5]}"


@pytest.mark.parametrize("key,diff", [("cp_change", "model.cp: 2 -> 1"),
                                      ("seq_len_change", "data.seq_len: 192 -> 256")])
def test_resume_refuses_a_layout_change_with_the_diff(lifecycle, key, diff):
    assert str(lifecycle[key]).startswith("ValueError: cannot resume"), lifecycle[key]
    assert diff in lifecycle[key]


def test_overwrite_clears_the_previous_run(lifecycle):
    assert lifecycle["overwrite"] and isinstance(lifecycle["overwrite"], list), lifecycle["overwrite"]
    assert lifecycle["after_overwrite"] == ["latest", "step_000002"]
    assert lifecycle["metrics_steps"] == [1, 2]


# ---------------------------------------------------------------- slow ranks vs the collective timeout


SLOW_S = 12  # longer than timeout_s=10 (the smallest allowed; gloo times out at 10 s), far below the patient waits


def _slow_export_rank(rank, output_dir):
    from transformers import PreTrainedModel

    from trainer.sft import run_sft
    if rank == 0:
        original = PreTrainedModel.save_pretrained

        def slow_save(self, *args, **kwargs):
            time.sleep(SLOW_S)  # a large model takes minutes to write
            return original(self, *args, **kwargs)

        PreTrainedModel.save_pretrained = slow_save
    run_sft(compose_cfg(FAST + ["max_steps=1", "timeout_s=10", "checkpoint.export_hf=true",
                                f"output_dir={output_dir}"]))
    return "done"


def test_slow_hf_export_does_not_time_out_the_other_ranks_and_replaces_the_old_export(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "stale.txt").write_text("from an earlier export")
    assert run_with_own_group(_slow_export_rank, 2, str(tmp_path)) == ["done", "done"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("hf")) == ["hf"], "temporary dir left"
    assert not (tmp_path / "hf" / "stale.txt").exists(), "the export must replace the directory, not write into it"
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.vocab_size > 0


def _slow_generation_rank(rank, output_dir):
    from trainer.rl.loop import run_rl
    from trainer.rl.rollout.hf import HFRolloutEngine
    if rank == 1:
        original, calls = HFRolloutEngine.sample, []

        def slow_sample(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                time.sleep(SLOW_S)  # a rank whose completions are longer
            return original(self, *args, **kwargs)

        HFRolloutEngine.sample = slow_sample
    history = run_rl(compose_rl(RL_FAST + ["max_steps=1", "timeout_s=10", f"output_dir={output_dir}"]))
    return [h["step"] for h in history]


def test_slow_generating_rank_does_not_trip_the_collective_timeout(tmp_path):
    assert run_with_own_group(_slow_generation_rank, 2, str(tmp_path))[0] == [1]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and math.isfinite(json.loads(lines[0])["loss"])
