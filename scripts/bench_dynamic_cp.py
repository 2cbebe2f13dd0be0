"""Token-budget micro-batches and dynamic CP (issue 13): throughput, memory and balance on long-tailed lengths.

    python scripts/bench_dynamic_cp.py                       # the CPU run -> docs/benchmarks/dynamic_cp/ (~8 min)
    python scripts/bench_dynamic_cp.py --quick --out /tmp/x  # a smoke run (about a minute)
    python scripts/bench_dynamic_cp.py --render              # rewrite README.md from results.json

What it measures: the real SFT trainer (trainer.engine.build_trainer + trainer.sft.sft_step: FSDP2, apply_cp,
the loss, clipping, AdamW) on synthetic documents, for each (model, world W) run (ranks on this machine, gloo),
in these configurations, every one consuming the SAME documents per step (PackedLoader's position bookkeeping
is identical in fixed-row and token-budget mode; checked: equal loss-token counts every step, equal first loss)
and the same number of steps:

    static      model.cp=W, fixed rows: grad_accum micro-batches of one data.seq_len row, each split over W ranks
    budget      model.cp=W, data.max_tokens_per_rank=seq_len/W: the step's documents re-planned into
                micro-batches of <= seq_len/W tokens per rank (trainer/planning/token_budget.py), every one at
                degree W
    dynamic     ... and model.cp_dynamic=true: each micro-batch at its own degree, a divisor of W (short
                documents can run whole on one rank)
    dp-only     model.cp=1, data.max_tokens_per_rank=seq_len: no CP at all, each rank runs whole documents;
                needs seq_len tokens per rank (the memory column says what that costs)

on two length mixes: "long-tail" (80% of the documents short, 20% long: the case the feature is for) and a
"uniform" control (every document the same length; static vs dynamic only: dynamic must not be slower).
Several ranks share the machine's cores (world 4 on 2 cores is oversubscribed) and other jobs may share the
machine: the ratios between configurations measured side by side are the result, not the absolute tokens/s.

This file is the command line; the benchmark is scripts/bench/dynamic_cp/ (workload.py what runs, run.py the
ranks and their measurements, summary.py and report.py the results), over the shared bench/ parts.
Writes OUT/results.json and OUT/README.md (tables, goals, interpretation, machine, command).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench package next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository (trainer, cp, models)

from bench.dynamic_cp import report, run  # noqa: E402
from bench.dynamic_cp.workload import MODELS  # noqa: E402
from bench.provenance import command_line  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "dynamic_cp"
# runs: (model, world) pairs, one spawn each, in this order
FULL = {"seq_len": 4096, "rows_per_step": 4, "steps": 5, "docs": 400,
        "runs": [("tiny_qwen3", 2), ("tiny_qwen3", 4), ("tiny_qwen3_5", 2)]}
QUICK = {"seq_len": 2048, "rows_per_step": 4, "steps": 2, "docs": 200, "runs": [("tiny_qwen3", 2)]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seq_len 2048, world 2, 2 timed steps: a smoke run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worlds", type=int, nargs="+", default=None, help="with --models: every model at every world "
                   "(default: the runs of FULL / QUICK)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    p.add_argument("--seq-len", type=int, default=None, help="data.seq_len; the mixes scale with it")
    p.add_argument("--steps", type=int, default=None, help="timed steps (after 1 warm-up step)")
    p.add_argument("--rows-per-step", type=int, default=None, help="data.seq_len rows of documents per step "
                   "(divisible by every world)")
    p.add_argument("--docs", type=int, default=None, help="documents in each mix's synthetic pool")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--render", action="store_true", help="only rewrite OUT/README.md from OUT/results.json (the "
                   "measurements and their command kept)")
    return p.parse_args(argv)


def options(args) -> dict:
    """FULL or QUICK with the flags that override them: {seq_len, rows_per_step, steps, docs, runs, threads}."""
    opts = dict(QUICK if args.quick else FULL)
    for key in ("seq_len", "steps", "rows_per_step", "docs"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    if args.models or args.worlds:
        models = args.models or list(dict.fromkeys(m for m, _ in opts["runs"]))
        worlds = args.worlds or sorted({w for _, w in opts["runs"]})
        opts["runs"] = [(m, w) for m in models for w in worlds]
    opts["threads"] = args.threads
    for _, world in opts["runs"]:
        if opts["rows_per_step"] % world:
            raise SystemExit(f"--rows-per-step {opts['rows_per_step']} must be divisible by world {world}")
    return opts


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        report.render(args.out)
        print(f"rewrote {args.out / 'README.md'}")
        return
    meta, cells = run.measure(options(args), command_line(__file__, argv), lambda text: print(text, flush=True))
    report.write(args.out, meta, cells)
    print(f"wrote {args.out} in {meta['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
