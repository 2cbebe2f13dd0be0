"""The real-model GRPO runs: cptrain with each engine, and TRL's GRPOTrainer on the same model, prompts and settings.

    cptrain   torchrun --nproc-per-node 2 -m trainer.rl experiment=smollm2_arith rollout.engine=<engine>
              max_steps=<steps> output_dir=outputs/bench_rollout/run_<engine>   (cp=2 Ulysses, held-out accuracy on the
              last 100 prompts at the start, every 5 steps and at the end: eval.jsonl)
              -> its metrics.jsonl and eval.jsonl are copied to <out>/learn_<engine>/
    trl       scripts/bench/rollout/trl_peer.py in the TRL venv (scripts/install_trl_peer.sh): GRPOTrainer, one
              process, its own transformers generation, `trl_steps` optimizer steps -> <out>/trl.json
One after the other, each alone on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.rollout.common import ROOT, REAL_MODEL

TRL_PYTHON = Path(os.environ.get("TRL_VENV", ROOT / ".venv-trl")) / "bin" / "python"


LORA_RUN = ["model.lora.rank=16", "model.lora.alpha=32", "optim.lr=1e-4"]  # LoRA: ~10x full fine-tuning's lr


def run_cptrain(engine: str, steps: int, out: Path, log, *, k: int = 0, extra=(), name: str | None = None) -> dict:
    """One learning run; k = rollout.max_off_policy_steps (async GRPO), extra: more overrides; its results in
    learn_<name> (default <engine>[_k<k>])."""
    name = name or (engine if not k else f"{engine}_k{k}")
    run_dir = ROOT / "outputs" / "bench_rollout" / f"run_{name}"  # checkpoints: never under docs/
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "trainer.rl",
           "experiment=smollm2_arith", f"rollout.engine={engine}", f"max_steps={steps}", f"output_dir={run_dir}",
           "overwrite=true", "checkpoint.export_hf=false", "wandb.mode=disabled", f"rollout.max_off_policy_steps={k}",
           *extra]
    log(f"  {' '.join(cmd[2:])}")
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the {engine} run failed:\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    keep = out / f"learn_{name}"
    keep.mkdir(parents=True, exist_ok=True)
    for file in ("metrics.jsonl", "eval.jsonl"):
        shutil.copy(run_dir / file, keep / file)
    summary = next((line for line in done.stdout.splitlines() if line.startswith("rl done")), "")
    log(f"  {summary} ({seconds:.0f} s)")
    return {"engine": engine, "k": k, "name": name, "steps": steps, "wall_s": seconds, "summary": summary,
            "command": " ".join(cmd[2:])}


def run_trl(steps: int, out: Path, log) -> dict | None:
    if not TRL_PYTHON.exists():
        log(f"  TRL peer skipped: {TRL_PYTHON} missing (scripts/install_trl_peer.sh)")
        return None
    result = out / "trl.json"
    cmd = [str(TRL_PYTHON), str(ROOT / "scripts" / "bench" / "rollout" / "trl_peer.py"), "--model", str(REAL_MODEL),
           "--data", str(ROOT / "trainer" / "data" / "assets" / "small_arith.jsonl"), "--steps", str(steps),
           "--out", str(result)]
    log(f"  {' '.join(cmd)}")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the TRL peer failed:\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def read_run(out: Path, name: str) -> dict | None:
    """The copied metrics and evals of a finished run ("vllm", "hf", "vllm_k1", ...; None if it was not made)."""
    keep = out / f"learn_{name}"
    if not (keep / "metrics.jsonl").exists():
        return None
    load = lambda name: [json.loads(line) for line in (keep / name).read_text().splitlines() if line.strip()]
    return {"metrics": load("metrics.jsonl"), "evals": load("eval.jsonl")}
