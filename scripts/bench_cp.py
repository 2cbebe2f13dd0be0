"""Benchmark cptrain's context parallelism: throughput vs cp=1, memory, bytes, communication wait.

    python scripts/bench_cp.py                      # the full CPU sweep -> docs/benchmarks/ (~10 min on 2 cores)
    python scripts/bench_cp.py --quick --out DIR    # a < 60 s sweep (CI smoke test)
    python scripts/bench_cp.py --device cuda --worlds 8 --out docs/benchmarks/gpu    # GPUs: NCCL, CUDA events
    torchrun --nproc-per-node 8 scripts/bench_cp.py --device cuda --out ...          # or under torchrun

At equal world size and equal tokens per step: at cp=c each CP group runs c sequences of S
tokens, so every rank handles S tokens per step at every cp, and cp=1 is the same ranks doing
data parallelism on their own sequences. Configs are measured side by side, interleaved (see
bench/sweep.py), on two workloads (bench/workloads.py): attention alone on packed documents, and
a Qwen3-style model's full fwd+bwd step; peers (bench/peers.py) run in the same loop.
Writes DIR/results.json, DIR/README.md (tables, method, machine, command) and DIR/*.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench package next to this file

from bench import hotspots, report  # noqa: E402
from bench.launch import init_rank, spawn, under_torchrun  # noqa: E402
from bench.provenance import command_line, machine, now  # noqa: E402
from bench.sweep import Options, run_rank  # noqa: E402

FULL = {"attention": [1024, 2048, 4096], "model": [1024, 2048, 4096]}
QUICK = {"attention": [256, 512], "model": [256, 512]}
# The default CPU run: world 2 in full, then world 4 (4 ranks time-share the 2 cores: its wall times
# and comm waits include that; its memory and bytes do not) at cp=4 only, shorter, for hybrid 2x2
# and the cp=4 point of the memory plot.
WORLD4 = {"cps": [4], "repeats": 3, "seq_lens": {"attention": [1024, 2048], "model": [1024, 2048]}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short sequences, 2 repeats: the CI smoke run")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--worlds", type=int, nargs="+", default=None,
                   help="world sizes to run, one after the other (default CPU: 2, then 4 at cp=4 (WORLD4); "
                        "quick: 2; cuda: all GPUs)")
    p.add_argument("--cps", type=int, nargs="+", default=None, help="cp degrees (default: every divisor > 1)")
    p.add_argument("--workloads", nargs="+", choices=["attention", "model"], default=["attention", "model"])
    p.add_argument("--attention-seq-lens", type=int, nargs="+", default=None)
    p.add_argument("--model-seq-lens", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--instrumented", type=int, default=None,
                   help="rounds with bytes and comm waits measured (default 2; quick 1)")
    p.add_argument("--peers", nargs="*", choices=["deepspeed", "torch_cp"], default=["deepspeed", "torch_cp"])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--ulysses-chunks", type=int, nargs="*", default=[],
                   help="model workload: also run Ulysses with these head chunks (model.ulysses_chunks)")
    p.add_argument("--model-kv-heads", type=int, default=None,
                   help="KV heads of the model workload (default 2; chunks need at least as many KV heads)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--mem-budget-mib", type=float, default=None,
                   help="memory budget per rank for the max-sequence-length plot (default: 256 CPU, 65536 CUDA)")
    p.add_argument("--no-hotspots", action="store_true", help="skip the one-process cp/ hotspot measurements")
    p.add_argument("--report-only", action="store_true",
                   help="re-write README.md and the plots from OUT/results.json without measuring")
    p.add_argument("--note", default="", help="a line added to the report (e.g. what else ran on the machine)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "benchmarks")
    return p.parse_args(argv)


def options(args) -> Options:
    lens = QUICK if args.quick else FULL
    return Options(
        device=args.device, dtype=args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
        workloads=args.workloads, cps=args.cps, warmup=args.warmup, peers=list(args.peers), threads=args.threads,
        seq_lens={"attention": args.attention_seq_lens or lens["attention"],
                  "model": args.model_seq_lens or lens["model"]},
        repeats=args.repeats or (2 if args.quick else 5), instrumented=args.instrumented or (1 if args.quick else 2),
        ulysses_chunks=list(args.ulysses_chunks),
        model={} if args.model_kv_heads is None else {"kv_heads": args.model_kv_heads})


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report_only:
        data = json.loads((args.out / "results.json").read_text())
        report.write(args.out, data["meta"], data["cells"], data.get("hotspots"))
        print(f"re-wrote {args.out} from results.json")
        return
    opts = options(args)
    started, load_start = time.time(), os.getloadavg()
    default = args.worlds is None and args.device == "cpu" and not args.quick and not under_torchrun()
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        init_rank(args.device, rank, world)
        cells = run_rank(rank, world, opts)
        if rank != 0:
            return
        worlds = [world]
    else:
        import torch

        worlds = args.worlds or ([torch.cuda.device_count()] if args.device == "cuda" else [2] + [4] * default)
        cells = []
        for world in worlds:
            world_opts = dataclasses.replace(opts, **WORLD4) if default and world == 4 else opts
            cells += spawn(run_rank, world, args.device, world_opts)
    hot = None
    if args.device == "cpu" and not (args.quick or args.no_hotspots) and "attention" in args.workloads:
        hot = hotspots.run(opts.seq_lens["attention"])
    overrides = {str(w): WORLD4 for w in worlds if w == 4 and default}
    meta = {"command": command_line(__file__), "options": dataclasses.asdict(opts), "worlds": worlds,
            "note": args.note, "world_overrides": overrides,
            "loadavg": {"start": load_start, "end": os.getloadavg()}, "elapsed_s": time.time() - started,
            "machine": machine(args.device), "date": now(),
            "mem_budget_mib": args.mem_budget_mib or (65536 if args.device == "cuda" else 256)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "cells": cells, "hotspots": hot}, indent=1))
    report.write(args.out, meta, cells, hot)
    print(f"wrote {args.out} in {meta['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
