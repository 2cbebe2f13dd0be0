"""State-passing CP for the recurrent mixers (issue 25, model.mixer_cp=state) vs Ulysses: bytes, memory, time.

    python scripts/bench_state_cp.py             # -> docs/benchmarks/state_cp/ (results.json, README.md), ~5 min
    python scripts/bench_state_cp.py --render    # rewrite README.md from results.json

bytes + memory   one mixer layer of real size (a Gated DeltaNet layer shaped like Qwen3-Next's linear attention:
                 32 value / 16 key heads of 128; a Mamba2 layer shaped like Nemotron-H-8B's: 128 heads of 64,
                 8 groups, state 128), bf16, one sequence of S tokens, forward + backward run by the trainer's own
                 code on torch's fake process group with meta tensors (trainer.planning.memory_sim.simulate_step:
                 nothing is computed, every collective is called): the bytes rank 0 sends, counted by
                 cp/collectives.py, and the activation peak the planner (python -m trainer.plan) predicts.
time             fwd + bwd of the tiny Qwen3.5-style hybrid (models/tiny: hidden 256, 3 Gated DeltaNet + 1 attention
                 layer per 4) on this CPU, world 2 (gloo): cp=1 (each rank its own sequence), Ulysses cp=2, state
                 cp=2, interleaved rounds, medians; per-token throughput vs cp=1 at equal world size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench package next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository (trainer, cp, models)

from bench.provenance import command_line, machine, machine_line, now  # noqa: E402
from bench.report import markdown_table  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "state_cp"
LENGTHS = (4096, 8192, 16384, 32768)
WIDE = ((8, 32768), (8, 131072))  # (cp, S) beyond what a CPU run measures: simulated the same way
MODES = ("ulysses", "state")


def layer_config(kind: str):
    """One mixer layer of real size (small vocabulary and MLP: they send nothing)."""
    from transformers import NemotronHConfig, Qwen3_5TextConfig

    if kind == "gated_deltanet":
        return Qwen3_5TextConfig(vocab_size=1024, hidden_size=2048, num_hidden_layers=1,
                                 layer_types=["linear_attention"], linear_num_value_heads=32, linear_num_key_heads=16,
                                 linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                                 num_attention_heads=16, num_key_value_heads=2, head_dim=256, intermediate_size=512)
    return NemotronHConfig(vocab_size=1024, hidden_size=4096, layers_block_type=["mamba"], mamba_num_heads=128,
                           mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4, chunk_size=128,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=512)


def simulate(kind: str, mode: str, cp_size: int, seq_len: int) -> dict:
    import torch

    import cp
    from cp.collectives import count_comm
    from trainer.config import ModelConfig
    from trainer.planning.memory_sim import fake_world, simulate_step

    with fake_world(cp_size):
        dims = cp.ParallelDims(world_size=cp_size, cp=cp_size, cp_style="ulysses")
        dims.build()
        with count_comm() as counter:
            peak = simulate_step(layer_config(kind), dims, ModelConfig(cp=cp_size, mixer_cp=mode), seq_len=seq_len,
                                 dtype=torch.bfloat16)
    return {"kind": kind, "mode": mode, "cp": cp_size, "seq_len": seq_len, "bytes": counter.total,
            "bytes_by_kind": dict(counter.bytes), "peak_bytes": peak.peak}


def time_rank(rank: int, world: int, seq_len: int, rounds: int) -> dict:
    import copy
    import time

    import torch
    import torch.distributed as dist

    import cp
    import models
    from models.tiny import tiny_model

    torch.set_num_threads(1)
    reference = tiny_model("qwen3_5", hidden_size=256, num_layers=4, seed=0)
    dims_cp = cp.ParallelDims(world_size=world, cp=world, cp_style="ulysses")
    dims_cp.build()
    dims_1 = cp.ParallelDims(world_size=world, cp=1, cp_style="ulysses")
    dims_1.build()
    configs = {"cp=1": (models.apply_cp(copy.deepcopy(reference), dims_1), dims_1),
               "ulysses": (models.apply_cp(copy.deepcopy(reference), dims_cp), dims_cp),
               "state": (models.apply_cp(copy.deepcopy(reference), dims_cp, mixer_cp="state"), dims_cp)}
    ids = torch.randint(0, 256, (1, seq_len), generator=torch.Generator().manual_seed(rank))  # cp=1: its own row
    shared = torch.randint(0, 256, (1, seq_len), generator=torch.Generator().manual_seed(99))  # cp=2: one row
    seq_lens = [[seq_len // 4, seq_len // 2, seq_len - seq_len // 4 - seq_len // 2]]  # documents cross the shards
    seconds = {name: [] for name in configs}
    for step in range(rounds + 1):  # round 0: warm-up
        order = list(configs)[step % 3:] + list(configs)[:step % 3]
        for name in order:
            model, dims = configs[name]
            batch = cp.setup_cp_params(ids if name == "cp=1" else shared, dims, seq_lens=seq_lens)
            dist.barrier()
            start = time.perf_counter()
            logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=batch.params,
                           use_cache=False).logits
            logits.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
            dist.barrier()
            if step:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def measure(args) -> dict:
    from bench.launch import spawn

    simulated = [simulate(kind, mode, cp_size, seq_len) for kind in ("gated_deltanet", "mamba2") for mode in MODES
                 for cp_size, seq_len in [(c, s) for c in (2, 4) for s in LENGTHS] + list(WIDE)]
    timing = spawn(time_rank, 2, "cpu", args.time_seq_len, args.rounds)
    return {"meta": {"date": now(), "machine": machine(), "command": command_line(__file__)},
            "simulated": simulated, "timing": {"world": 2, "seq_len": args.time_seq_len, "rounds": args.rounds,
                                               "median_s": timing}}


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def render(results: dict) -> str:
    meta, sims, timing = results["meta"], results["simulated"], results["timing"]
    by = {(s["kind"], s["mode"], s["cp"], s["seq_len"]): s for s in sims}
    lines = ["# State-passing CP vs Ulysses for the recurrent mixers", "",
             f"`{meta['command']}`, {meta['date']}; {machine_line(meta['machine'])}.", "",
             "`model.mixer_cp=state` (cp/state_passing.py): every rank keeps its contiguous shard of every head; one",
             "all-gather of each shard's summary (the state leaving it from zero, and how an entering state reaches its",
             "end) and of a (kernel - 1)-token conv halo per layer, the gradients back through one all-to-all.",
             "`ulysses`: all-to-alls of the layer's q/k/v/b/a (Mamba2: x/dt/B/C) to whole sequences of a head subset",
             "and of its output back, forward and backward.", "",
             "## Bytes sent per mixer layer and rank (forward + backward), and the planner's activation peak", "",
             "One layer of real size in bf16 (Gated DeltaNet: Qwen3-Next's linear-attention shape, 32 value / 16 key",
             "heads of 128; Mamba2: Nemotron-H-8B's, 128 heads of 64, 8 groups, state 128), one sequence of S tokens,",
             "run through the trainer's own forward and backward on torch's fake process group with meta tensors",
             "(trainer.planning.memory_sim: the real code path calls every collective, nothing is computed), the",
             "bytes counted by cp/collectives.py on rank 0. cp = 8 rows are **simulated the same way, not measured on",
             "8 devices**. Peak: the planner's activation peak for that layer (fused GPU kernels' buffers).", ""]
    for kind, title in (("gated_deltanet", "Gated DeltaNet"), ("mamba2", "Mamba2")):
        rows = []
        for cp_size, seq_len in [(c, s) for c in (2, 4) for s in LENGTHS] + list(WIDE):
            u, s = by[(kind, "ulysses", cp_size, seq_len)], by[(kind, "state", cp_size, seq_len)]
            rows.append([cp_size, f"{seq_len // 1024}k", _mib(u["bytes"]), _mib(s["bytes"]),
                         f"{u['bytes'] / s['bytes']:.1f}x", _mib(u["peak_bytes"]), _mib(s["peak_bytes"]),
                         f"{s['peak_bytes'] / u['peak_bytes']:.2f}"])
        lines += [f"**{title}**", ""] + markdown_table(
            ["cp", "S", "ulysses MiB", "state MiB", "ulysses / state", "ulysses peak MiB", "state peak MiB",
             "state / ulysses peak"], rows) + [""]
    median = timing["median_s"]
    tokens = timing["seq_len"]
    world_tokens = {name: tokens * (timing["world"] if name == "cp=1" else 1) for name in median}  # per step
    rate = {name: world_tokens[name] / median[name] for name in median}  # tokens/s of the world
    rows = [[name, f"{median[name] * 1e3:.0f}", f"{rate[name] / rate['cp=1']:.2f}"] for name in median]
    lines += ["## Forward + backward time on this CPU", "",
              f"The tiny Qwen3.5-style hybrid (hidden 256, 3 Gated DeltaNet layers + 1 attention layer), world "
              f"{timing['world']} (gloo), S = {tokens} in 3 documents crossing the shard boundary, one intra-op "
              f"thread per rank, {timing['rounds']} interleaved rounds after a warm-up, medians. cp=1: each rank runs "
              "its own sequence (the same ranks doing data parallelism); throughput per token of the world vs cp=1.",
              ""] + markdown_table(["run", "fwd+bwd ms", "throughput vs cp=1"], rows)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--time-seq-len", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--render", action="store_true")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.render:
        (args.out / "results.json").write_text(json.dumps(measure(args), indent=1))
    results = json.loads((args.out / "results.json").read_text())
    (args.out / "README.md").write_text(render(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
