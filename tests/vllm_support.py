"""What the tests against real vLLM servers share (tests/test_vllm_*.py; skipped without scripts/install_vllm.sh's
venv).

    SKIP               None, or why no vLLM test can run here
    VLLM_FAST          the GRPO overrides of a small vLLM run (cp=2, tiny buckets so a sync takes several)
    export_tiny_llama  a tiny Llama with TIED embeddings and the bundled tokenizer, as an HF directory
    server_spec        a ServerSpec for a test server (CPU threads, 512 tokens)
    shared server      tests/conftest.py's `vllm_server` fixture: ONE plain server on export_tiny_llama's model for
                       the whole pytest session (~25 s to start), used as an external server (rollout.vllm.urls)
                       by every test that neither owns, kills nor reconfigures a server; each test syncs its own
                       weights first (a run syncs version 0 at startup: engine.version starts at -1)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

from trainer.rl.rollout.vllm_server import ServerSpec, resolve_python

try:
    VLLM_PYTHON = resolve_python(None)
    FIND = "import importlib.util as u, sys; sys.exit(not (u.find_spec('vllm') and u.find_spec('cptrain_vllm_plugin')))"
    _probe = subprocess.run([VLLM_PYTHON, "-c", FIND], check=False, capture_output=True, timeout=60)
    SKIP = None if _probe.returncode == 0 else f"{VLLM_PYTHON} has no vllm or no plugin (scripts/install_vllm.sh)"
except (ValueError, subprocess.TimeoutExpired) as exc:
    VLLM_PYTHON, SKIP = None, f"no vLLM environment ({exc}); build one with scripts/install_vllm.sh"

VLLM_FAST = ["model.cp=2", "rollout.engine=vllm", "rollout.vllm.sync_bucket_mb=0.05", "rollout.prompts_per_step=2",
             "rollout.group_size=4", "rollout.max_new_tokens=12", "data.seq_len=256"]


def export_tiny_llama(path: Path, seed: int = 1) -> Path:
    """A tiny Llama with TIED embeddings (as SmolLM2): a sync must reach lm_head too (vLLM's layerwise reload does
    not keep the tie), which an untied model would not show. seed: its weights."""
    from transformers import AutoModelForCausalLM

    from models.tiny import tiny_config
    from trainer.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer("builtin")
    config = tiny_config("llama", vocab_size=len(tokenizer))
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def server_spec(model: Path, log: Path, **kw) -> ServerSpec:
    from trainer.rl.rollout.vllm_engine import cpu_thread_env
    return ServerSpec(model=str(model), python=VLLM_PYTHON, log_file=str(log), max_model_len=512,
                      cpu=not torch.cuda.is_available(), env=cpu_thread_env(), startup_timeout_s=300, **kw)


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


def server_processes(marker: str) -> list[str]:
    """The vLLM processes whose command line names `marker` (a run's output directory)."""
    out = subprocess.run(["pgrep", "-af", marker], check=False, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "vllm" in line and "pgrep" not in line]
