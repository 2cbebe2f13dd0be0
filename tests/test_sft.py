"""SFT trainer: cp>1 reproduces the cp=1 loss curve; resume reproduces an uninterrupted run; logs,
checkpoints, the HF export and W&B files are written; bad configs, NaNs and dead ranks fail clearly."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.dist import free_port, process_context, run_distributed

ROOT = Path(__file__).resolve().parent.parent
FAST = ["max_steps=4", "data.seq_len=192", "data.micro_batch_size=1", "model.tiny_hidden_size=64", "model.tiny_layers=2", "optim.warmup_steps=1",
        "checkpoint.export_hf=false", "wandb.mode=disabled", "timeout_s=60"]
# Loss after a few AdamW steps, fp32: CP changes only the order of sums (blocked attention, chunked
# scans, gradient reduce-scatter), ~1e-6 relative; a CP bug (a leaked document, a wrong normaliser)
# moves the loss by >1e-2 at step 1 already.
LOSS_RTOL = 1e-4


def compose_cfg(overrides):
    from trainer import config
    config.register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("sft", overrides=overrides)


def _run_worker(rank, world, overrides):
    from trainer.sft import run_sft
    history = run_sft(compose_cfg(overrides))
    return [h["loss"] for h in history] + [h["grad_norm"] for h in history]  # AdamW hides a gradient scale


def losses(world, overrides):
    return run_distributed(_run_worker, world, overrides, timeout=600)[0]


def assert_same_curve(a, b, what):
    assert len(a) == len(b), (a, b)
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    assert worst <= LOSS_RTOL, f"{what}: loss curves differ (max rel {worst:.3g}): {a} vs {b}"


@pytest.mark.parametrize("model,style,world,extra", [
    ("tiny_qwen3_5", "ulysses", 2, []),
    ("tiny_qwen3", "ring", 2, []),
    ("tiny_qwen3", "hybrid", 4, ["model.cp_ulysses=2"]),
])
def test_cp_loss_curve_equals_cp1(tmp_path, model, style, world, extra):
    base = FAST + [f"model={model}"]
    ref = losses(1, base + ["model.cp=1", f"output_dir={tmp_path}/cp1", "model.cp_style=ulysses"])
    got = losses(world, base + [f"model.cp={world}", f"model.cp_style={style}", f"output_dir={tmp_path}/cp"] + extra)
    assert ref[3] < ref[0], f"loss should fall: {ref}"
    assert_same_curve(got, ref, f"{model} {style} cp={world}")


LONG_CONTEXT = ["model.tiled_mlp=true", "model.mlp_tile_tokens=24", "model.activation_checkpointing=true",
                "model.activation_offload=true", "model.head_chunk_tokens=37"]


@pytest.mark.parametrize("model", ["tiny_qwen3_5", "tiny_qwen3"])
def test_long_context_techniques_keep_the_loss_curve(tmp_path, model):
    """Full logits, plain MLPs, no checkpointing == chunked LM head + tiled MLP + checkpointing with offload
    (small chunks and tiles: many of each per micro-batch) at cp=2, a hybrid and a softmax family."""
    base = FAST + [f"model={model}", "model.cp=2", "model.cp_style=ulysses"]
    plain = losses(2, base + ["model.chunked_head=false", f"output_dir={tmp_path}/plain"])
    techniques = losses(2, base + LONG_CONTEXT + [f"output_dir={tmp_path}/techniques"])
    assert_same_curve(techniques, plain, f"{model} long-context techniques")


def _installed_worker(rank, world, overrides):
    from models.memory.activation_offload import OffloadedCheckpoint
    from models.memory.chunked_head import has_chunked_head
    from models.memory.tiled_mlp import TiledForward
    from trainer import config
    from trainer.engine import build_trainer
    trainer = build_trainer(compose_cfg(overrides), validate=config.validate_sft)
    layers = trainer.model.model.layers
    return {"chunked_head": has_chunked_head(trainer.model),
            "tiled": all(isinstance(layer.mlp.forward.__func__, TiledForward) for layer in layers),
            "offload": all(isinstance(getattr(layer, "_gradient_checkpointing_func", None), OffloadedCheckpoint)
                           for layer in layers)}


def test_the_default_run_uses_the_chunked_head_and_the_keys_install_each_technique():
    assert run_distributed(_installed_worker, 2, FAST)[0] == {"chunked_head": True, "tiled": False, "offload": False}
    assert run_distributed(_installed_worker, 2, FAST + LONG_CONTEXT)[0] == dict.fromkeys(
        ("chunked_head", "tiled", "offload"), True)


def test_data_parallel_times_cp_equals_data_parallel(tmp_path):
    """dp=2 x cp=2 on 4 ranks == dp=2 x cp=1 on 2 ranks (same global batch)."""
    base = FAST + ["model=tiny_qwen3_5", "data.micro_batch_size=1"]
    ref = losses(2, base + ["model.cp=1", f"output_dir={tmp_path}/dp2"])
    got = losses(4, base + ["model.cp=2", f"output_dir={tmp_path}/dp2cp2"])
    assert_same_curve(got, ref, "dp2 x cp2")


def test_resume_reproduces_uninterrupted_run_and_writes_logs(tmp_path):
    base = FAST + ["max_steps=6", "checkpoint.every=3", "wandb.mode=offline", "checkpoint.export_hf=true"]
    full = losses(2, base + [f"output_dir={tmp_path}/full"])
    # an interrupted run: what the full run had on disk right after step 3
    split = tmp_path / "split"
    (split / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_000003", split / "checkpoints" / "step_000003")
    (split / "checkpoints" / "latest").write_text("step_000003")
    metrics = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    (split / "metrics.jsonl").write_text("\n".join(metrics[:4]) + "\n")  # + a line written after the checkpoint
    resumed = losses(2, base + ["resume=true", f"output_dir={split}"])
    assert_same_curve(resumed, full[3:6] + full[9:], "resumed steps 4-6 (losses, grad norms)")
    lines = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "tokens_per_s", "peak_mem_gb", "lr", "grad_norm"):
        assert all(isinstance(m[key], float) for m in lines), key
    assert list((tmp_path / "full" / "wandb").glob("offline-run-*")), "W&B offline run directory missing"
    assert (tmp_path / "full" / "checkpoints" / "latest").read_text() == "step_000006"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "full" / "hf")
    ids = tokenizer("What is 2 + 3?", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def _config_error_worker(rank, world, overrides, match, output_dir):
    from trainer.sft import run_sft
    with pytest.raises(ValueError, match=match):
        run_sft(compose_cfg(FAST + overrides + [f"output_dir={output_dir}"]))
    return "raised"


@pytest.mark.parametrize("overrides,match", [
    (["model.cp=3"], "does not divide the world size 2"),
    (["model.cp_style=stripes"], "unknown model.cp_style=.stripes.; choose one of"),
    (["model.cp_style=hybrid"], "needs model.cp_ulysses"),
    (["model.cp_style=ring"], "use model.cp_style=ulysses"),  # default model is a Qwen3.5-style hybrid
    (["model.attn=flex_attention"], "BlockMask"),
    (["data.seq_len=2", "model=tiny_qwen3", "model.cp_style=ring"], "shorter than the 4 shards"),
    (["model.dtype=float16"], "model.dtype=bfloat16"),
    (["model.head_chunk_tokens=0"], "model.head_chunk_tokens=0 must be >= 1"),
    (["model.mlp_tile_tokens=-4"], "model.mlp_tile_tokens=-4 must be >= 1"),
    (["model.activation_offload=true"], "set model.activation_checkpointing=true too"),
])
def test_bad_configs_fail_before_training_with_the_key_named(tmp_path, overrides, match):
    assert run_distributed(_config_error_worker, 2, overrides, match, tmp_path, timeout=300) == ["raised", "raised"]


def test_unknown_override_key_is_named():
    with pytest.raises(Exception, match="optim.lrr"):
        compose_cfg(["optim.lrr=1"])


def _nan_worker(rank, world, output_dir):
    from trainer.sft import run_sft
    with pytest.raises(FloatingPointError, match=r"non-finite (loss|gradient norm) .* at step \d"):
        run_sft(compose_cfg(FAST + ["optim.lr=1e30", "optim.grad_clip=0", "optim.warmup_steps=0", "max_steps=8",
                                    f"output_dir={output_dir}"]))
    return "stopped"


def test_nan_loss_stops_the_run_with_the_step(tmp_path):
    assert run_distributed(_nan_worker, 2, tmp_path, timeout=300) == ["stopped", "stopped"]


def _dying_rank(rank, world, port, output_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import trainer.sft as sft
    original = sft.sft_step

    def step_then_die(trainer, loader):
        if rank == 1 and trainer.step == 1:
            os._exit(3)  # rank 1 disappears mid-run
        return original(trainer, loader)

    sft.sft_step = step_then_die
    sft.run_sft(compose_cfg(FAST + ["max_steps=20", "timeout_s=20", f"output_dir={output_dir}"]))


def test_a_dead_rank_makes_the_others_exit_with_an_error(tmp_path):
    ctx = process_context()
    port = free_port()
    procs = [ctx.Process(target=_dying_rank, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not any(alive), "a surviving rank hung after its peer died"
    assert procs[1].exitcode == 3 and procs[0].exitcode not in (0, None)
    assert time.monotonic() - start < 100


def test_torchrun_entry_point_runs_and_pins_hydra_dir(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "trainer.sft", *FAST, "max_steps=2", f"output_dir={tmp_path}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sft done: steps 1-2" in result.stdout
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (ROOT / "outputs").exists() or not list((ROOT / "outputs").glob("*/.hydra")), "hydra wrote elsewhere"


def test_peak_memory_is_per_step_after_a_reset():
    """peak_mem_gb is each step's peak (sft_step / rl_step reset it first): a large tensor freed before the
    reset does not show in the next reading. CPU: the process's VmHWM, reset through /proc/self/clear_refs."""
    from trainer.run import runtime

    cpu = torch.device("cpu")
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("this OS cannot reset the peak resident set size")
    runtime.reset_peak_memory(cpu)
    before = runtime.peak_memory_gb(cpu)
    big = torch.ones(64 * 2**20)  # 256 MiB, every page touched
    during = runtime.peak_memory_gb(cpu)
    del big
    runtime.reset_peak_memory(cpu)
    after = runtime.peak_memory_gb(cpu)
    assert during - before > 0.2 and after < during - 0.2, (before, during, after)
