"""Weight sync time against model size: the FSDP2 policy on 2 ranks (gloo) to an owned vLLM server, bucket by
bucket through the weight-transfer protocol (rollout.vllm.sync_bucket_mb), and the hf engine's sync (a full
state-dict gather onto every rank, loaded into its plain copy) for the same model. Llama-shaped models with
SmolLM2's vocabulary (49152) and head size (64), random weights (the time does not depend on the values):

    size       hidden  layers  heads / KV heads
    S          256     4       4 / 2
    M          576     10      9 / 3
    smollm2    576     30      9 / 3      (SmolLM2-135M's shape)
    L          1024    16      16 / 4

Median of `repeats` syncs after one warm-up sync, on rank 0; bytes = what crossed to the server.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

SIZES = {"S": (256, 4, 4, 2), "M": (576, 10, 9, 3), "smollm2": (576, 30, 9, 3), "L": (1024, 16, 16, 4)}


def _model_dir(name: str, root: Path) -> Path:
    """A Llama of the size `name` with SmolLM2's tokenizer, saved as an HF directory (the server starts from it)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bench.rollout.common import REAL_MODEL
    hidden, layers, heads, kv_heads = SIZES[name]
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=64, tie_word_embeddings=True, max_position_embeddings=2048)
    path = root / name
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(REAL_MODEL).save_pretrained(path)
    return path


def _rank(rank: int, world: int, model_dir: str, repeats: int, bucket_mb: float) -> dict:
    import torch

    from bench.rollout.common import rl_config, vllm_config
    from trainer import config
    from trainer.engine import build_trainer
    from trainer.rl.rollout.hf import HFRolloutEngine
    from trainer.rl.rollout.vllm_engine import VLLMRolloutEngine

    cfg = rl_config([f"model.name={model_dir}", "rollout.eval_prompts=0"])
    trainer = build_trainer(cfg, validate=config.validate_rl)
    params = sum(p.numel() for p in trainer.model.parameters())
    out = {"parameters": params}
    hf = HFRolloutEngine(trainer.model, trainer.tokenizer, trainer.device)
    times = []
    for version in range(repeats + 1):
        start = time.perf_counter()
        hf.sync(trainer.model, version)
        times.append(time.perf_counter() - start)
    out["hf_sync_s"] = statistics.median(times[1:])
    del hf
    engine = VLLMRolloutEngine(vllm_config(sync_bucket_mb=bucket_mb), model_path=model_dir,
                               tokenizer=trainer.tokenizer, dtype=torch.float32, max_model_len=512, seed=0,
                               log_dir=tempfile.gettempdir())
    try:
        stats = [engine.sync(trainer.model, version) for version in range(repeats + 1)][1:]
    finally:
        engine.close()
    out.update(vllm_sync_s=statistics.median(s["sync_s"] for s in stats), sync_bytes=stats[0]["sync_bytes"],
               sync_buckets=stats[0]["sync_buckets"])
    return out


def measure(sizes: list[str], repeats: int, bucket_mb: float, log) -> list[dict]:
    from bench.launch import spawn

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in sizes:
            model_dir = _model_dir(name, Path(tmp))
            row = {"size": name, **spawn(_rank, 2, "cpu", str(model_dir), repeats, bucket_mb, timeout_s=1800)}
            rows.append(row)
            log(f"  {name}: {row['parameters'] / 1e6:.0f}M parameters, vllm sync {row['vllm_sync_s']:.2f} s "
                f"({row['sync_bytes'] / 2**20:.0f} MiB, {row['sync_buckets']:.0f} buckets), hf sync {row['hf_sync_s']:.2f} s")
    return rows
