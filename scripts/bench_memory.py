"""Long-context memory: peak per rank vs sequence length, each technique off/on, and what each costs in time.

    python scripts/bench_memory.py                 # the CPU run -> docs/benchmarks/memory/ (~10 min on 2 cores)
    python scripts/bench_memory.py --quick --out DIR

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
"""

from __future__ import annotations

import argparse
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
from bench.workloads import build_model, lm_batch, model_config  # noqa: E402

import cp  # noqa: E402
import models  # noqa: E402
from trainer.loss import shard_loss_sum  # noqa: E402
from trainer.modeling import install_long_context  # noqa: E402

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
                           mlp_tile_tokens=None)


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
    p.add_argument("--retime", action="store_true",
                   help="measure the step times again (e.g. on an idle machine) and merge them into OUT/results.json")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "memory")
    args = p.parse_args(argv)
    if args.report_only:
        data = json.loads((args.out / "results.json").read_text())
        write_report(args.out, data["meta"], data["cells"])
        return
    sizes = QUICK if args.quick else FULL
    plan = {"memory": {"2": {"1": sizes["tokens_per_rank"], "2": sizes["tokens_per_rank"]}},
            "time": {"2": sizes["time_tokens"]}, "rounds": args.rounds}
    if sizes["cp4_tokens_per_rank"]:
        plan["memory"]["4"] = {"4": sizes["cp4_tokens_per_rank"]}
    started, load_start = time.time(), os.getloadavg()[0]
    script = os.path.relpath(Path(__file__).resolve(), Path.cwd())
    command = shlex.join(["python", script, *sys.argv[1:]])
    if args.retime:  # the memory cells and their command stay; the step times and the retime command are new
        data = json.loads((args.out / "results.json").read_text())
        cells = [c for c in data["cells"] if c["kind"] == "memory"]
        cells += spawn(run_rank, 2, "cpu", {**plan, "memory": {"2": {}}})
        meta = {**data["meta"], "retime": {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                           "loadavg": [load_start, os.getloadavg()[0]]}}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1))
        write_report(args.out, meta, cells)
        print(f"re-timed {args.out} in {time.time() - started:.0f} s")
        return
    cells = []
    for world in sorted(int(w) for w in plan["memory"]):
        cells += spawn(run_rank, world, "cpu", plan)
    meta = {"command": command, "elapsed_s": time.time() - started,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "budget_mib": args.budget_mib,
            "loadavg": [load_start, os.getloadavg()[0]],
            "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1))
    write_report(args.out, meta, cells)
    print(f"wrote {args.out} in {meta['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
