#!/usr/bin/env bash
# TRL's GRPOTrainer in its own venv, for the peer benchmark scripts/bench/rollout/trl_peer.py (not a project
# dependency: TRL pins its own transformers / accelerate / datasets, so it does not share the trainer's venv).
#
#   scripts/install_trl_peer.sh                      # -> .venv-trl
#   TRL_VENV=/opt/trl-env scripts/install_trl_peer.sh
#   .venv-trl/bin/python scripts/bench/rollout/trl_peer.py --model pretrained/smollm2-135m-instruct --steps 2 ...
#
# torch 2.13.0 first (the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build), then TRL
# (TRL_SPEC, default the newest 1.x that resolves with that torch). No vLLM: the benchmark measures TRL's own
# transformers generation, what a user without vLLM gets. torchvision / torchaudio / torchcodec, if anything
# pulls them in, are removed: their compiled ops do not match this torch and break imports.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TRL_VENV:-.venv-trl}"
python="${PYTHON:-python3}"
spec="${TRL_SPEC:-trl==1.16.0}"
echo "install_trl_peer: torch==2.13.0, $spec -> $venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q "$spec" torch==2.13.0
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" - <<'PY'
import accelerate, datasets, torch, transformers, trl
from trl import GRPOConfig, GRPOTrainer  # noqa: F401  (the import the benchmark needs)
print(f"install_trl_peer: trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
      f"accelerate {accelerate.__version__}, datasets {datasets.__version__}")
PY
