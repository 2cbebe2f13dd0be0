#!/usr/bin/env bash
# Optional peers for scripts/bench_cp.py, installed into the CURRENT environment (not project dependencies):
#   DeepSpeed (its Ulysses for HF models, UlyssesSPAttentionHF) without its heavy dependency set,
#   plus the few small packages its import and the HF Ulysses path need, and matplotlib for the plots.
# torch's native context_parallel ships with torch itself (nothing to install; it has no CPU SDPA
# sharding rule, so the benchmark skips it on CPU with the error it measured).
# On CPU, DeepSpeed JIT-builds its shared-memory comm op (deepspeed_shm_comm_op) the first time it
# initialises (about a minute on 2 cores, cached in ~/.cache/torch_extensions); the last line builds
# it now so a benchmark run does not spend that time.
# TRL (the GRPO rollout peer, scripts/bench/rollout/trl_peer.py) has its own venv: scripts/install_trl_peer.sh.
set -euo pipefail
python -m pip install matplotlib
python -m pip install --no-deps "deepspeed==0.19.8"
python -m pip install psutil py-cpuinfo hjson msgpack ninja pydantic einops
python - <<'PY'
import deepspeed
from deepspeed.comm.torch import build_shm_op
build_shm_op()
print("deepspeed", deepspeed.__version__, "ready")
PY
