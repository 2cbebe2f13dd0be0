"""Long-context memory: peak per rank vs sequence length, each technique off/on, and what each costs in time.

    python scripts/bench_memory.py                 # the CPU run -> docs/benchmarks/memory/ (~10 min on 2 cores)
    python scripts/bench_memory.py --quick --out DIR
    python scripts/bench_memory.py --predict       # the planner's columns only, for the cells already measured

Workload: a Qwen3-style decoder with a realistic vocabulary (bench.workloads.model_config, vocab 49152),
fp32, one document per row, fwd + loss + bwd under models.apply_cp (Ulysses) at cp = 1, 2 (world 2) and
cp = 4 (world 4), for each technique set (trainer.modeling.install_long_context, the trainers' own path;
the loss through trainer.loss.shard_loss_sum, the SFT trainer's):

    off          full logits [S/cp, V] in fp32 + their gradient; plain MLP; no checkpointing
    chunked      model.chunked_head: the LM head in token chunks, recomputed in backward
    +tiled       ... and model.tiled_mlp: MLP activations O(tile)
    +ckpt        ... and model.activation_checkpointing: a layer keeps only its input until backward

Peak = the bytes allocated during one step above what was live at its start (scripts/bench/measure.py
PeakMemory: weights, inputs and gradient buffers are excluded), the worst rank. Per technique set the peak
is fitted linearly in the tokens per rank (S/cp): the slope is bytes per token per rank; the intercept is
what does not grow with S (a logits chunk, a tile, gradient accumulators). The max trainable S/cp within a
budget comes from the fit (extrapolated past the measured range; labelled). Step time: the sets run
interleaved at one length, ratio vs off. Activation offload is not measured here: on CPU the host is the
device (the copy frees nothing); its exactness is tested in tests/test_activation_offload.py.

Planner: every memory cell is also predicted by trainer.planning.memory_sim (the planner's engine: the same step on the
meta device in a fake process group), reported next to the measurement; and trainer.plan's tables for two runs
this machine cannot make (Qwen3-8B at 128k tokens and a Qwen3.5-style hybrid at 256k, on 8 GPUs of 80 GB).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench package next to this file

import torch  # noqa: E402
from bench.launch import spawn  # noqa: E402
from bench.measure import PeakMemory, StepTimer  # noqa: E402
from bench.provenance import command_line, now  # noqa: E402
from bench.workloads import build_model, lm_batch, model_config  # noqa: E402

import cp  # noqa: E402
import models  # noqa: E402
from trainer.loss import shard_loss_sum  # noqa: E402
from trainer.planning.memory_sim import fake_world, simulate_step  # noqa: E402
from trainer.modeling import install_long_context  # noqa: E402
from trainer.planning.memory_plan import compose_run_config, render  # noqa: E402
from trainer.planning.memory_plan import plan as plan_memory  # noqa: E402

VOCAB = 49152  # a realistic vocabulary (SmolLM2's): large enough that the logits term shows
MODEL = {"hidden": 256, "heads": 8, "kv_heads": 2, "head_dim": 64, "intermediate": 1024, "layers": 4}
TECHNIQUES = {
    "off": {"chunked_head": False, "tiled_mlp": False, "activation_checkpointing": False},
    "chunked": {"chunked_head": True, "tiled_mlp": False, "activation_checkpointing": False},
    "+tiled": {"chunked_head": True, "tiled_mlp": True, "activation_checkpointing": False},
    "+ckpt": {"chunked_head": True, "tiled_mlp": True, "activation_checkpointing": True},
}
FULL = {"tokens_per_rank": [512, 1024, 2048, 4096], "cp4_tokens_per_rank": [512, 1024, 2048], "time_tokens": 2048}
QUICK = {"tokens_per_rank": [256, 512], "cp4_tokens_per_rank": [], "time_tokens": 256}
MIB = 2 ** 20


def technique_config(name: str) -> SimpleNamespace:
    """The model.* keys install_long_context reads, for one technique set (automatic chunk / tile sizes)."""
    return SimpleNamespace(**TECHNIQUES[name], activation_offload=False, head_chunk_tokens=None,
                           mlp_tile_tokens=None, ulysses_chunks=1)


def _model(dims, name: str, config):
    model = models.apply_cp(build_model(config, "sdpa", torch.device("cpu"), torch.float32), dims, attn="sdpa")
    return install_long_context(model, technique_config(name))


def _step(model, dims, ids, labels, count) -> None:
    batch = cp.setup_cp_params(ids, dims, labels=labels)
    (shard_loss_sum(model, batch) / count).backward()
    model.zero_grad(set_to_none=False)  # gradient buffers stay allocated: the next step's peak is activations


def _worst(value: float) -> float:
    t = torch.tensor(float(value))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


def run_rank(rank: int, world: int, plan: dict) -> list[dict]:
    torch.set_num_threads(1)
    config = model_config(**MODEL, vocab=VOCAB)
    cells = []
    for cp_degree, tokens in plan["memory"][str(world)].items():
        dims = cp.ParallelDims(world_size=world, cp=int(cp_degree))
        dims.build()
        for name in TECHNIQUES:
            model = _model(dims, name, config)
            for per_rank in tokens:
                seq_len = per_rank * int(cp_degree)
                ids, labels, count = lm_batch(seq_len, VOCAB, seq_len + dims.dp_rank, torch.device("cpu"))
                _step(model, dims, ids, labels, count)  # warm-up: gradient buffers, plans, kernels
                gc.collect()  # what only the cyclic collector frees would otherwise count at random
                with PeakMemory(torch.device("cpu")) as peak:
                    _step(model, dims, ids, labels, count)
                cells.append({"kind": "memory", "world": world, "cp": int(cp_degree), "technique": name,
                              "tokens_per_rank": per_rank, "seq_len": seq_len, "peak_bytes": _worst(peak.bytes)})
            del model
    if str(world) in plan["time"]:
        cells += _time_rank(world, plan["time"][str(world)], config, plan["rounds"])
    return cells


def _time_rank(world: int, per_rank: int, config, rounds: int) -> list[dict]:
    """Every technique set at one length, interleaved round by round (machine load hits them alike)."""
    dims = cp.ParallelDims(world_size=world, cp=world)
    dims.build()
    runners = {name: _model(dims, name, config) for name in TECHNIQUES}
    seq_len = per_rank * world
    ids, labels, count = lm_batch(seq_len, VOCAB, seq_len, torch.device("cpu"))
    times = {name: [] for name in TECHNIQUES}
    for round_ in range(rounds + 1):
        for name, model in runners.items():
            with StepTimer(torch.device("cpu")) as timer:
                _step(model, dims, ids, labels, count)
            if round_:  # round 0 is the warm-up
                times[name].append(_worst(timer.seconds))
    return [{"kind": "time", "world": world, "cp": world, "technique": name, "tokens_per_rank": per_rank,
             "seq_len": seq_len, "step_s": times[name]} for name in TECHNIQUES]


def predict(cells: list[dict]) -> None:
    """The planner's prediction (trainer.planning.memory_sim, meta device, fake world of the same size) for every
    memory cell: cell["predicted_bytes"]."""
    config = model_config(**MODEL, vocab=VOCAB)
    for world in sorted({c["world"] for c in cells if c["kind"] == "memory"}):
        with fake_world(world):
            for c in cells:
                if c["kind"] != "memory" or c["world"] != world:
                    continue
                dims = cp.ParallelDims(world_size=world, cp=c["cp"])
                dims.build()
                c["predicted_bytes"] = simulate_step(config, dims, technique_config(c["technique"]),
                                                     seq_len=c["seq_len"], dtype=torch.float32).peak


# The paper targets: the planner's prediction for runs this machine cannot make (python -m trainer.plan)
TARGETS = {
    "Qwen3-8B, 128k tokens, 8 x 80 GB": ["model.name=configs/plan/qwen3_8b", "model.dtype=bfloat16",
                                          "data.seq_len=131072", "data.micro_batch_size=1", "model.cp=8"],
    "Qwen3.5-style hybrid (configs/plan/qwen3_5_hybrid), 256k tokens, 8 x 80 GB": [
        "model.name=configs/plan/qwen3_5_hybrid", "model.dtype=bfloat16", "data.seq_len=262144",
        "data.micro_batch_size=1", "model.cp=8"],
}
TARGET_WORLD, TARGET_BUDGET_GB = 8, 80


def plan_targets() -> dict[str, dict]:
    """{target: {"command", "table"}}: trainer.plan's table for each paper target."""
    out = {}
    for name, overrides in TARGETS.items():
        cfg = compose_run_config("sft", overrides, TARGET_WORLD)
        estimates, refusals = plan_memory(cfg, world=TARGET_WORLD)
        command = shlex.join(["python", "-m", "trainer.plan", "--world-size", str(TARGET_WORLD), "--budget-gb",
                              str(TARGET_BUDGET_GB), *overrides])
        out[name] = {"command": command, "table": render(cfg, estimates, refusals, world=TARGET_WORLD,
                                                         budget=TARGET_BUDGET_GB * 2 ** 30, trainer="sft")}
    return out


def fit(cells: list[dict], technique: str) -> tuple[float, float]:
    """Least-squares peak = slope * tokens_per_rank + intercept over every cp (bytes)."""
    points = [(c["tokens_per_rank"], c["peak_bytes"]) for c in cells if c["kind"] == "memory"
              and c["technique"] == technique]
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def checkpointed_bytes_per_token() -> int:
    """What a checkpointed model must keep per token per rank: every layer's input hidden states (fp32)."""
    return MODEL["layers"] * MODEL["hidden"] * 4


def write_report(out: Path, meta: dict, cells: list[dict]) -> None:
    budget = meta["budget_mib"] * MIB
    lines = ["# Long-context memory: peak per rank vs length, each technique", "",
             f"Generated by `{meta['command']}` on {meta['date']} in {meta['elapsed_s'] / 60:.1f} min.", "",
             f"Workload: Qwen3-style decoder, hidden {MODEL['hidden']}, {MODEL['heads']} heads x "
             f"{MODEL['head_dim']}, {MODEL['kv_heads']} KV heads, MLP {MODEL['intermediate']}, {MODEL['layers']} "
             f"layers, vocabulary {VOCAB}, fp32, Ulysses; one document per row, fwd + loss + bwd through "
             "trainer.loss.shard_loss_sum (the SFT trainer's). Peak: bytes allocated during a step above its "
             "start (activations, logits, workspaces; not weights or gradient buffers), worst rank.", "",
             "## Peak MiB per rank", "", "| cp | tokens/rank | " + " | ".join(TECHNIQUES) + " |",
             "|---|---|" + "---|" * len(TECHNIQUES)]
    memory = [c for c in cells if c["kind"] == "memory"]
    for key in sorted({(c["cp"], c["tokens_per_rank"]) for c in memory}):
        row = {c["technique"]: c["peak_bytes"] for c in memory if (c["cp"], c["tokens_per_rank"]) == key}
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(f"{row[t] / MIB:.0f}" if t in row else "—"
                                                             for t in TECHNIQUES) + " |")
    lines += ["", f"## Fit over every cp: peak = slope x tokens/rank + intercept; max tokens/rank in "
              f"{meta['budget_mib']} MiB", "",
              "| technique | slope (KiB / token / rank) | intercept (MiB) | max tokens/rank in budget | vs off |",
              "|---|---|---|---|---|"]
    base = None
    for name in TECHNIQUES:
        slope, intercept = fit(cells, name)
        longest = max(c["tokens_per_rank"] for c in memory if c["technique"] == name)
        fits = int((budget - intercept) / slope)
        base = base or fits
        label = "measured range" if fits <= longest else "extrapolated"
        lines.append(f"| {name} | {slope / 1024:.1f} | {intercept / MIB:.1f} | {fits} ({label}) | "
                     f"{fits / base:.1f}x |")
    lines += ["", f"Checkpointed hidden states alone: {checkpointed_bytes_per_token() / 1024:.1f} KiB / token / "
              f"rank ({MODEL['layers']} layers x {MODEL['hidden']} x 4 bytes). The rest of the `+ckpt` slope is one "
              "layer's activations while it is recomputed in backward (its attention and projections, O(S/cp)).",
              ""]
    predicted = [c for c in memory if "predicted_bytes" in c]
    if predicted:
        errors = [c["predicted_bytes"] / c["peak_bytes"] - 1 for c in predicted]
        lines += ["## The planner's prediction vs the measurement (`python -m trainer.plan`; trainer/planning/memory_sim.py)", "",
                  f"Every cell above predicted on the meta device (no weights, no compute, a fake process group): "
                  f"error {min(errors):+.1%} .. {max(errors):+.1%}, mean |error| "
                  f"{statistics.fmean(abs(e) for e in errors):.1%} over {len(errors)} cells (tests/test_plan.py "
                  "holds a smaller workload to 15% at cp = 1, 2, 4).", "",
                  "Beyond 15%: " + (", ".join(f"cp={c['cp']} {c['technique']} {c['tokens_per_rank']} tokens/rank "
                                             f"({c['predicted_bytes'] / c['peak_bytes'] - 1:+.1%})" for c in predicted
                                             if abs(c["predicted_bytes"] / c["peak_bytes"] - 1) > 0.15) or "none") +
                  ". A measured peak includes what only Python's cyclic garbage collector frees (gloo work handles, "
                  "autograd graph cycles) if it has not run yet; the measurement runs gc.collect() before the step (as "
                  "tests/test_plan.py does), and the planner predicts what a collected heap holds.", "",
                  *meta.get("notes", []),
                  "| cp | tokens/rank | technique | measured MiB | predicted MiB | error |", "|---|---|---|---|---|---|"]
        for c in sorted(predicted, key=lambda c: (c["cp"], list(TECHNIQUES).index(c["technique"]), c["tokens_per_rank"])):
            lines.append(f"| {c['cp']} | {c['tokens_per_rank']} | {c['technique']} | {c['peak_bytes'] / MIB:.0f} | "
                         f"{c['predicted_bytes'] / MIB:.0f} | {c['predicted_bytes'] / c['peak_bytes'] - 1:+.1%} |")
        lines.append("")
    for name, target in meta.get("targets", {}).items():
        lines += [f"## Planned on paper: {name}", "", f"`{target['command']}`", "", target["table"], ""]
    timed = [c for c in cells if c["kind"] == "time"]
    if timed:
        base_times = next(c["step_s"] for c in timed if c["technique"] == "off")
        retime = meta.get("retime")
        source = (f"re-measured by `{retime['command']}` on {retime['date']}, load average {retime['loadavg'][0]:.1f} "
                  f"-> {retime['loadavg'][1]:.1f}" if retime else "measured in the run above")
        lines += [f"## Step time vs off (cp={timed[0]['cp']}, {timed[0]['tokens_per_rank']} tokens/rank, "
                  f"{len(base_times)} interleaved rounds, median of per-round ratios; {source})", "",
                  "| technique | step s (median) | time vs off |", "|---|---|---|"]
        for c in timed:
            ratio = statistics.median(t / b for t, b in zip(c["step_s"], base_times))
            lines.append(f"| {c['technique']} | {statistics.median(c['step_s']):.2f} | {ratio:.2f}x |")
    lines += ["", f"Machine: {meta['machine']}; load average at the start {meta['loadavg'][0]:.1f}, at the end "
              f"{meta['loadavg'][1]:.1f}.", ""]
    (out / "README.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds")
    p.add_argument("--budget-mib", type=float, default=1024, help="activation budget per rank for the max-length column")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--predict", action="store_true",
                   help="add the planner's predictions for OUT/results.json's cells and the paper targets (no measuring)")
    p.add_argument("--retime", action="store_true",
                   help="measure the step times again (e.g. on an idle machine) and merge them into OUT/results.json")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "memory")
    args = p.parse_args(argv)
    if args.report_only:
        data = json.loads((args.out / "results.json").read_text())
        write_report(args.out, data["meta"], data["cells"])
        return
    if args.predict:
        data = json.loads((args.out / "results.json").read_text())
        predict(data["cells"])
        data["meta"]["targets"] = plan_targets()
        (args.out / "results.json").write_text(json.dumps(data, indent=1))
        write_report(args.out, data["meta"], data["cells"])
        return
    sizes = QUICK if args.quick else FULL
    plan = {"memory": {"2": {"1": sizes["tokens_per_rank"], "2": sizes["tokens_per_rank"]}},
            "time": {"2": sizes["time_tokens"]}, "rounds": args.rounds}
    if sizes["cp4_tokens_per_rank"]:
        plan["memory"]["4"] = {"4": sizes["cp4_tokens_per_rank"]}
    started, load_start = time.time(), os.getloadavg()[0]
    command = command_line(__file__)
    if args.retime:  # the memory cells and their command stay; the step times and the retime command are new
        data = json.loads((args.out / "results.json").read_text())
        cells = [c for c in data["cells"] if c["kind"] == "memory"]
        cells += spawn(run_rank, 2, "cpu", {**plan, "memory": {"2": {}}})
        meta = {**data["meta"], "retime": {"command": command, "date": now(),
                                           "loadavg": [load_start, os.getloadavg()[0]]}}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1))
        write_report(args.out, meta, cells)
        print(f"re-timed {args.out} in {time.time() - started:.0f} s")
        return
    cells = []
    for world in sorted(int(w) for w in plan["memory"]):
        cells += spawn(run_rank, world, "cpu", plan)
    predict(cells)
    meta = {"command": command, "elapsed_s": time.time() - started,
            "date": now(), "budget_mib": args.budget_mib,
            "loadavg": [load_start, os.getloadavg()[0]],
            "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}", "targets": plan_targets()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1))
    write_report(args.out, meta, cells)
    print(f"wrote {args.out} in {meta['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
