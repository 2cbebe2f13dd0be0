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
                micro-batches of <= seq_len/W tokens per rank (trainer/planning/token_budget.py), every one at degree W
    dynamic     ... and model.cp_dynamic=true: each micro-batch at its own degree, a divisor of W (short
                documents can run whole on one rank)
    dp-only     model.cp=1, data.max_tokens_per_rank=seq_len: no CP at all, each rank runs whole documents;
                needs seq_len tokens per rank (the memory column says what that costs)

on two length mixes: "long-tail" (80% of the documents short, 20% long: the case the feature is for) and a
"uniform" control (every document the same length; static vs dynamic only: dynamic must not be slower).

Data flow: one spawn per (model, W) (scripts/bench/launch.py spawn inits the gloo group;
trainer.run.runtime.init_distributed reuses it):

    per configuration: hydra compose(configs/sft.yaml + overrides) ─> build_trainer
    per (configuration, mix): PackedLoader(synthetic TokenizedDocs)
    step 0 (warm-up), 1..steps (timed), steps + 1 (memory, under bench.measure.PeakMemory); within a step
    index every (configuration, mix) runs once, the order rotated each step: barrier ─> sft_step, timed here
    (wall and process CPU time) ─> its metrics
    all_gather_object ─> rank 0 ─> the parent: per step, the slowest rank's wall time, the ranks' summed CPU
    time, the largest step peak (allocated bytes), the plan's micro_batches / load_imbalance / cp_degree_<d>_frac
    the parent also: the documents of each step (a shadow PackedLoader: real tokens, and the share of tokens in
    documents that need degree W at the budget, for the work ceiling), the plans recomputed with trainer.planning.token_budget.plan_step (fill, idle
    ranks; checked against sft_step's micro_batches), the code's commit and file hashes (before and after)
    ─> results.json, README.md (tables, goals, interpretation)

All configurations of a run share one process per rank: sft_step's peak_mem_gb (on CPU the process's peak RSS
during the step, which holds every configuration's weights and the allocator's cache) is not per configuration
there, so memory is the profiled step's allocation peak instead. Several ranks share the machine's cores (world 4 on 2 cores is oversubscribed) and other jobs may
share the machine: the ratios between configurations measured side by side are the result, not the absolute
tokens/s. One intra-op thread per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench package next to this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository (trainer, cp, models)

import torch
import torch.distributed as dist
from bench.launch import spawn

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks" / "dynamic_cp"

# Length mixes: (share of documents, low, high) — lengths uniform in [low, high].
MIXES = {
    "long-tail": [(0.8, 64, 512), (0.2, 2048, 8192)],
    "uniform": [(1.0, 4096, 4096)],
}
MODELS = {
    "tiny_qwen3": ["model=tiny_qwen3", "model.cp_style=ulysses", "model.tiny_hidden_size=256", "model.tiny_layers=4"],
    "tiny_qwen3_5": ["model=tiny_qwen3_5", "model.cp_style=ulysses", "model.tiny_hidden_size=256",
                     "model.tiny_layers=4"],
}
# runs: (model, world) pairs, one spawn each, in this order
FULL = {"seq_len": 4096, "rows_per_step": 4, "steps": 5, "docs": 400,
        "runs": [("tiny_qwen3", 2), ("tiny_qwen3", 4), ("tiny_qwen3_5", 2)]}
QUICK = {"seq_len": 2048, "rows_per_step": 4, "steps": 2, "docs": 200, "runs": [("tiny_qwen3", 2)]}
CONFIGS = ("static", "budget", "dynamic", "dp-only")
UNIFORM_CONFIGS = ("static", "dynamic")


# ---------------------------------------------------------------- what one configuration is


def scaled_mix(mix: str, seq_len: int) -> list[tuple[float, int, int]]:
    """The mix's length ranges scaled to seq_len (they are written for seq_len 8192)."""
    return [(share, max(2, low * seq_len // 8192), max(2, high * seq_len // 8192)) for share, low, high in MIXES[mix]]


def document_lengths(mix: str, seq_len: int, count: int, seed: int = 0) -> list[int]:
    """`count` lengths drawn from the mix (deterministic); the shares are exact, the order shuffled."""
    rng, lengths = random.Random(f"bench_dynamic_cp:{seed}"), []
    parts = scaled_mix(mix, seq_len)
    for k, (share, low, high) in enumerate(parts):
        n = count - len(lengths) if k == len(parts) - 1 else round(share * count)
        lengths += [rng.randint(low, high) for _ in range(n)]
    rng.shuffle(lengths)
    return lengths


def make_docs(lengths: list[int], vocab: int, seed: int = 0):
    """TokenizedDocs of the given lengths: random ids below the vocabulary, every token but the first a target."""
    from trainer.data.chat import TokenizedDoc

    rng = random.Random(f"bench_dynamic_cp:ids:{seed}")
    return [TokenizedDoc([rng.randrange(vocab) for _ in range(n)], [False] + [True] * (n - 1)) for n in lengths]


def overrides(model: str, config: str, world: int, seq_len: int, rows_per_step: int, steps: int,
              out_dir: str) -> list[str]:
    """Hydra overrides of one configuration. Every one consumes rows_per_step data.seq_len rows of documents
    per optimizer step: micro_batch_size 1, grad_accum x dp = rows_per_step."""
    cp_degree = 1 if config == "dp-only" else world
    grad_accum = rows_per_step // (world // cp_degree)
    items = [*MODELS[model], f"model.cp={cp_degree}", f"data.seq_len={seq_len}", "data.micro_batch_size=1",
             f"optim.grad_accum={grad_accum}", f"max_steps={steps}", "wandb.mode=disabled",
             "checkpoint.export_hf=false", f"output_dir={out_dir}", "overwrite=true"]
    if config in ("budget", "dynamic"):
        items.append(f"data.max_tokens_per_rank={seq_len // world}")
    if config == "dynamic":
        items.append("model.cp_dynamic=true")
    if config == "dp-only":
        items.append(f"data.max_tokens_per_rank={seq_len}")
    return items


def compose(items: list[str]):
    """configs/sft.yaml with the overrides (hydra's compose API, as trainer.plan.compose_run_config)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainer import config
    from trainer.engine import CONFIG_DIR

    config.register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return hydra_compose(config_name="sft", overrides=items)


def step_tokens(lengths: list[int], seq_len: int, rows_per_step: int, steps: int) -> list[list[int]]:
    """The document lengths each step consumes: a shadow PackedLoader (same documents, seed and packing)."""
    from trainer.data.packing import PackedLoader

    loader = PackedLoader([([0] * n, [True] * n) for n in lengths], seq_len=seq_len, micro_batch_size=1,
                          dp_rank=0, dp_size=1, seed=0)
    return [[len(doc) for doc in loader.next_step_docs(rows_per_step)] for _ in range(steps)]


def top_degree_share(lengths: list[int], world: int, budget: int) -> float:
    """Share of the tokens in documents whose smallest degree (trainer.planning.token_budget.degree_for over the divisors
    of `world`) is `world` itself: no choice of degrees can run them with less CP communication."""
    from trainer.planning.token_budget import degree_for

    degrees = [d for d in range(1, world + 1) if world % d == 0]
    return sum(n for n in lengths if degree_for(n, degrees, budget) == world) / max(sum(lengths), 1)


def plan_diagnostics(items: list[str], world: int, step_lengths: list[list[int]]) -> list[dict] | None:
    """The token-budget plan of each step, recomputed here (trainer/planning/token_budget.py is deterministic): per step,
    micro-batches, the mean fill of a rank's share (tokens / data.max_tokens_per_rank over every rank of every
    micro-batch, empty rows counted as 0) and the share of (micro-batch, rank) slots that run an empty pass.
    None for fixed rows."""
    from trainer.modeling import build_model
    from trainer.planning.token_budget import CostModel, plan_step
    from trainer.data.tokenizer import load_tokenizer

    cfg = compose(items)
    budget = cfg.data.max_tokens_per_rank
    if not budget:
        return None
    cost = CostModel.from_model(build_model(cfg.model, len(load_tokenizer("builtin")), seed=0), cfg.model.cp_style)
    degrees = [d for d in range(1, cfg.model.cp + 1) if cfg.model.cp % d == 0] if cfg.model.cp_dynamic else [
        cfg.model.cp]
    out = []
    for lengths in step_lengths:
        plan = plan_step(lengths, world=world, degrees=degrees, budget=budget, cost=cost)
        fills, empty = [], 0
        for mb in plan.micro_batches:
            for block in mb.blocks:
                tokens = sum(plan.lengths[i] for i in block.docs)
                fills += [tokens / block.degree / budget] * block.degree
                empty += block.degree * (not block.docs)
        out.append({"micro_batches": len(plan.micro_batches), "fill": statistics.fmean(fills),
                    "empty_slots": empty / len(fills),
                    "layout": [[[block.degree, sum(plan.lengths[i] for i in block.docs)] for block in mb.blocks]
                               for mb in plan.micro_batches]})
    return out


def code_state() -> dict:
    """The commit and the state of the code measured: uncommitted changes under trainer/, cp/, models/ and a
    hash of each file the feature lives in (compared at the start and the end: an edit during the run shows)."""
    import hashlib
    import subprocess

    def git(*argv):
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--", "trainer", "cp", "models") or ""
    files = ("trainer/planning/token_budget.py", "trainer/sft.py", "trainer/engine.py", "trainer/data/packing.py", "cp/dims.py")
    return {"commit": (git("rev-parse", "--short", "HEAD") or "?").strip(),
            "uncommitted": [line[3:] for line in status.splitlines()],
            "sha1": {f: hashlib.sha1((ROOT / f).read_bytes()).hexdigest()[:12] for f in files if (ROOT / f).exists()}}


def cost_model(model: str, seq_len: int) -> dict:
    """trainer/planning/token_budget.py's CostModel of the model, and the attention share of a seq_len document's cost."""
    from trainer.modeling import build_model
    from trainer.planning.token_budget import CostModel
    from trainer.data.tokenizer import load_tokenizer

    cfg = compose(MODELS[model])
    cost = CostModel.from_model(build_model(cfg.model, len(load_tokenizer("builtin")), seed=0))
    return {"per_token": cost.per_token, "per_pair": cost.per_pair,
            "attention_share": cost.per_pair * seq_len ** 2 / 2 / cost(seq_len)}


# ---------------------------------------------------------------- one spawn per world: every configuration


def run_rank(rank: int, world: int, job: dict) -> list[dict]:
    """Build one trainer per configuration of this world (all in this process), then run their steps
    interleaved: step i of every cell (a configuration on a length mix, with its own PackedLoader) before step
    i + 1 of any, the order rotated each step; the last step of every cell runs under PeakMemory. Rank 0
    returns every rank's records: [{"cell", "step", "wall_s", "cpu_s", metrics...}]."""
    torch.set_num_threads(job["threads"])
    from bench.measure import PeakMemory

    from trainer import config
    from trainer.engine import build_trainer
    from trainer.data.packing import PackedLoader
    from trainer.sft import sft_step
    from trainer.data.tokenizer import pad_token_id

    trainers = {}
    for name, items in job["configs"].items():
        cfg = compose(items)
        trainers[name] = build_trainer(cfg, validate=config.validate_sft)
    any_trainer = next(iter(trainers.values()))
    vocab = len(any_trainer.tokenizer)
    pad = pad_token_id(any_trainer.tokenizer)
    docs = {mix: make_docs(lengths, vocab) for mix, lengths in job["lengths"].items()}
    loaders = {}
    for cell in job["cells"]:
        trainer = trainers[cell["config"]]
        loaders[cell["key"]] = PackedLoader(docs[cell["mix"]], seq_len=trainer.cfg.data.seq_len,
                                            micro_batch_size=trainer.cfg.data.micro_batch_size,
                                            dp_rank=trainer.dims.dp_rank, dp_size=trainer.dims.dp, seed=0,
                                            pad_token_id=pad)
    records, cells, steps = [], job["cells"], job["steps"]
    for step in range(steps + 1):  # the last: memory
        shift = step % len(cells)
        for cell in cells[shift:] + cells[:shift]:
            trainer, loader = trainers[cell["config"]], loaders[cell["key"]]
            profiled = step == steps
            dist.barrier()
            cpu, wall = time.process_time(), time.perf_counter()
            if profiled:
                with PeakMemory(torch.device("cpu")) as peak:
                    metrics = sft_step(trainer, loader)
            else:
                metrics = sft_step(trainer, loader)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            record = {"cell": cell["key"], "step": step, "wall_s": wall, "cpu_s": cpu, "profiled": profiled,
                      **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
            if profiled:
                record["step_peak_bytes"] = peak.bytes
                record["step_peak_top"] = peak.top
            records.append(record)
    gathered = [None] * world
    dist.all_gather_object(gathered, records)
    return gathered


def merge_ranks(ranks: list[list[dict]], cell: dict) -> list[dict]:
    """One cell's steps: the slowest rank's wall time, the ranks' summed CPU time, the largest memory, the
    plan's metrics (identical on every rank)."""
    steps = []
    for per_rank in zip(*[[r for r in rank if r["cell"] == cell["key"]] for rank in ranks]):
        first = per_rank[0]
        top = max(per_rank, key=lambda r: r.get("step_peak_bytes", 0))
        steps.append({
            "step": first["step"], "profiled": first["profiled"],
            "wall_s": max(r["wall_s"] for r in per_rank), "cpu_s": sum(r["cpu_s"] for r in per_rank),
            "sft_step_time_s": max(r["step_time_s"] for r in per_rank),
            "rss_high_water_gb": max(r["peak_mem_gb"] for r in per_rank),
            "step_peak_bytes": top.get("step_peak_bytes"), "step_peak_top": top.get("step_peak_top"),
            "loss": first["loss"], "loss_tokens": first["loss_tokens"],
            "micro_batches": first.get("micro_batches", cell["grad_accum"]),
            "load_imbalance": first.get("load_imbalance"),
            "degree_frac": {k[len("cp_degree_"):-len("_frac")]: v for k, v in first.items()
                            if k.startswith("cp_degree_") and k.endswith("_frac")},
            "sft_tokens_per_s": first["tokens_per_s"],
        })
    return steps


# ---------------------------------------------------------------- the run


def cells_of(opts: dict) -> list[dict]:
    """Every (model, mix, world, configuration) to measure."""
    cells = []
    for model, world in opts["runs"]:
        for config in CONFIGS:
            cells.append({"model": model, "mix": "long-tail", "world": world, "config": config})
        for config in UNIFORM_CONFIGS:
            cells.append({"model": model, "mix": "uniform", "world": world, "config": config})
    for cell in cells:
        cell["key"] = f"{cell['model']}/{cell['mix']}/w{cell['world']}/{cell['config']}"
    return cells


def run(opts: dict, log) -> list[dict]:
    seq_len, rows, steps = opts["seq_len"], opts["rows_per_step"], opts["steps"] + 1  # + the warm-up step
    lengths = {mix: document_lengths(mix, seq_len, opts["docs"]) for mix in MIXES}
    tokens = {mix: step_tokens(lengths[mix], seq_len, rows, steps + 1) for mix in MIXES}  # + the memory step
    cells = cells_of(opts)
    for cell in cells:
        items = overrides(cell["model"], cell["config"], cell["world"], seq_len, rows, steps + 1,
                          f"/tmp/bench_dynamic_cp/{cell['model']}-w{cell['world']}-{cell['config']}")
        cell["overrides"] = items
        cell["grad_accum"] = int(next(o for o in items if o.startswith("optim.grad_accum=")).split("=")[1])
        cell["step_docs"] = [len(t) for t in tokens[cell["mix"]]]
        cell["step_tokens"] = [sum(t) for t in tokens[cell["mix"]]]
        cell["plans"] = plan_diagnostics(items, cell["world"], tokens[cell["mix"]])
        cell["top_degree_share"] = [top_degree_share(t, cell["world"], seq_len // cell["world"])
                                    for t in tokens[cell["mix"]]]
        cell["seq_len"] = seq_len
    for model, world in opts["runs"]:
        group = [c for c in cells if c["model"] == model and c["world"] == world]
        configs = {c["config"]: c["overrides"] for c in group}
        job = {"configs": configs, "steps": steps, "threads": opts["threads"],
               "lengths": {mix: lengths[mix] for mix in {c["mix"] for c in group}},
               "cells": [{k: c[k] for k in ("key", "config", "mix")} for c in group]}
        started, load = time.time(), os.getloadavg()[0]
        ranks = spawn(run_rank, world, "cpu", job)
        for cell in group:
            measured = merge_ranks(ranks, cell)
            for record, real in zip(measured, cell["step_tokens"]):
                record["real_tokens"] = real
                record["tokens_per_s"] = real / record["wall_s"]
            cell["steps"] = measured
            cell["loadavg"] = [load, os.getloadavg()[0]]
            cell["spawn_s"] = time.time() - started
            timed = [r for r in measured[1:] if not r["profiled"]]
            log(f"{cell['key']:42s} tok/s {statistics.median(r['tokens_per_s'] for r in timed):7.0f}  "
                f"step peak {measured[-1]['step_peak_bytes'] / 2 ** 20:7.1f} MiB  "
                f"mb {statistics.fmean(r['micro_batches'] for r in timed):.1f}")
        log(f"{model} world {world}: {time.time() - started:.0f} s, load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    return cells


def _mad_se(values: list[float]) -> float:
    """A robust standard error of the median: 1.4826 x MAD x 1.25 / sqrt(n) (0 for fewer than 2 values)."""
    if len(values) < 2:
        return 0.0
    med = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - med) for v in values) * 1.25 / len(values) ** 0.5


def summarise(cells: list[dict]) -> None:
    """cell["summary"]: medians over the timed steps, ratios vs static (same model, mix, world) paired step by
    step (the same documents, run next to each other)."""
    for cell in cells:
        timed = [r for r in cell["steps"][1:] if not r["profiled"]]
        memory = next(r for r in cell["steps"] if r["profiled"])
        fracs: dict[str, list[float]] = {}
        for r in timed:
            for d, f in r["degree_frac"].items():
                fracs.setdefault(d, []).append(f)
        imbalance = [r["load_imbalance"] for r in timed if r["load_imbalance"] is not None]
        plans = [cell["plans"][r["step"]] for r in timed] if cell["plans"] else None
        if plans and [p["micro_batches"] for p in plans] != [r["micro_batches"] for r in timed]:
            print(f"warning: {cell['key']}: the recomputed plans' micro-batch counts differ from sft_step's",
                  file=sys.stderr)
        tokens = sum(r["real_tokens"] for r in timed)
        cell["summary"] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "tokens_per_s_total": tokens / sum(r["wall_s"] for r in timed),
            "cpu_s_per_1k_tokens": 1000 * sum(r["cpu_s"] for r in timed) / tokens,
            # the share of the cores the ranks could use that they kept busy (1.0: all of them, all step)
            "core_use": statistics.median(r["cpu_s"] / r["wall_s"] / min(cell["world"], os.cpu_count() or 1)
                                          for r in timed),
            "step_peak_mib": memory["step_peak_bytes"] / 2 ** 20,
            "step_peak_top": memory["step_peak_top"],
            "rss_high_water_gb": max(r["rss_high_water_gb"] for r in cell["steps"]),
            "micro_batches": statistics.fmean(r["micro_batches"] for r in timed),
            "load_imbalance": statistics.fmean(imbalance) if imbalance else None,
            "load_imbalance_max": max(imbalance) if imbalance else None,
            "fill": (statistics.fmean(p["fill"] for p in plans) if plans else  # fixed rows: the padding
                     statistics.fmean(r["real_tokens"] / (cell["grad_accum"] * cell["seq_len"]) for r in timed)),
            "empty_slots": statistics.fmean(p["empty_slots"] for p in plans) if plans else None,
            "degree_frac": {d: statistics.fmean(v) for d, v in sorted(fracs.items(), key=lambda kv: int(kv[0]))},
            "real_tokens_per_step": statistics.fmean(r["real_tokens"] for r in timed),
            "docs_per_step": statistics.fmean(cell["step_docs"][1:len(cell["steps"]) - 1]),
            "timed_steps": len(timed),
            "top_degree_share": statistics.fmean(cell["top_degree_share"][r["step"]] for r in timed),
        }
    for cell in cells:
        base = next(c for c in cells if c["config"] == "static" and
                    all(c[k] == cell[k] for k in ("model", "mix", "world")))
        s, b = cell["summary"], base["summary"]
        paired = [r["tokens_per_s"] / q["tokens_per_s"] for r, q in zip(cell["steps"][1:], base["steps"][1:])
                  if not r["profiled"]]
        s["ratio_vs_static"] = s["tokens_per_s"] / b["tokens_per_s"]
        s["ratio_vs_static_total"] = s["tokens_per_s_total"] / b["tokens_per_s_total"]
        s["paired_ratios"] = paired
        s["paired_ratio_median"] = statistics.median(paired)
        s["paired_ratio_se"] = _mad_se(paired)
        s["cpu_ratio_vs_static"] = b["cpu_s_per_1k_tokens"] / s["cpu_s_per_1k_tokens"]
        s["step_peak_vs_static"] = s["step_peak_mib"] / b["step_peak_mib"]
        # the same documents: the same loss tokens every step, and the same first loss (same weights, same data)
        s["same_loss_tokens_as_static"] = [r["loss_tokens"] for r in cell["steps"]] == [
            r["loss_tokens"] for r in base["steps"]]
        s["first_loss_diff_vs_static"] = abs(cell["steps"][0]["loss"] - base["steps"][0]["loss"])


def work_ceiling(got: dict) -> float | None:
    """The most CPU work per token any choice of degrees can save against static at this budget (got: the
    summaries of one (model, world) on the long-tail mix by configuration; None without budget and dp-only).

    On the same documents, dp-only's work per token c_1 is compute alone; budget's c_W adds running every token at
    degree W (Ulysses moves a fixed number of bytes per token, whatever its document). A dynamic plan must run
    the top_degree_share s_W of the tokens at degree W and, holding W x budget tokens per micro-batch like the
    budget plan, at least as many micro-batches, so its work per token is >= c_1 + s_W (c_W - c_1) (documents of
    intermediate degrees counted at c_1: optimistic). ceiling = c_static / that."""
    if not {"static", "budget", "dp-only"} <= got.keys():
        return None
    c_1, c_w = got["dp-only"]["cpu_s_per_1k_tokens"], got["budget"]["cpu_s_per_1k_tokens"]
    return got["static"]["cpu_s_per_1k_tokens"] / (c_1 + got["static"]["top_degree_share"] * max(c_w - c_1, 0.0))


def goals(cells: list[dict]) -> list[dict]:
    """Issue 13's targets, each judged per (model, world)."""
    out = []

    def get(model, mix, world, config):
        return next((c["summary"] for c in cells if (c["model"], c["mix"], c["world"], c["config"]) ==
                     (model, mix, world, config)), None)

    for model in sorted({c["model"] for c in cells}):
        for world in sorted({c["world"] for c in cells if c["model"] == model}):
            dyn = get(model, "long-tail", world, "dynamic")
            got = {c["config"]: c["summary"] for c in cells
                   if (c["model"], c["mix"], c["world"]) == (model, "long-tail", world)}
            if dyn:
                # two estimates of the speed-up (ratio of medians, median of per-step paired ratios): met when
                # both clear 1.3, not met when neither does, inconclusive when they straddle it
                clears = [dyn["ratio_vs_static"] >= 1.3, dyn["paired_ratio_median"] >= 1.3]
                verdict = "yes" if all(clears) else "no" if not any(clears) else "inconclusive"
                if dyn["step_peak_vs_static"] > 1.05:
                    verdict = "no"
                out.append({"goal": "dynamic >= 1.3x static CP throughput at equal peak memory (long-tail)",
                            "model": model, "world": world, "value": round(dyn["ratio_vs_static"], 3),
                            "paired": round(dyn["paired_ratio_median"], 3),
                            "memory_vs_static": round(dyn["step_peak_vs_static"], 3),
                            "cpu_ratio": round(dyn["cpu_ratio_vs_static"], 3),
                            "ceiling": work_ceiling(got) and round(work_ceiling(got), 3),
                            "verdict": verdict, "met": verdict == "yes"})
                out.append({"goal": "load imbalance <= 1.1 (dynamic, long-tail; mean over steps)", "model": model,
                            "world": world, "value": round(dyn["load_imbalance"], 3),
                            "worst_step": round(dyn["load_imbalance_max"], 3), "met": dyn["load_imbalance"] <= 1.1})
            uni = get(model, "uniform", world, "dynamic")
            if uni:
                eps = 2 * uni["paired_ratio_se"]
                out.append({"goal": "dynamic not below static on uniform lengths (paired median >= 1 - 2 SE)",
                            "model": model, "world": world, "value": round(uni["paired_ratio_median"], 3),
                            "noise": round(eps, 3), "met": uni["paired_ratio_median"] >= 1 - eps})
    return out


# ---------------------------------------------------------------- the report


def _degrees(frac: dict) -> str:
    return " ".join(f"{d}: {f:.2f}" for d, f in frac.items() if f > 0) or "-"


def table(cells: list[dict], model: str, mix: str, world: int) -> list[str]:
    rows = [c for c in cells if (c["model"], c["mix"], c["world"]) == (model, mix, world)]
    if not rows:
        return []
    lines = [("| config | tokens/s (median) | vs static | paired per step: median [min, max] | "
             "CPU-s / 1k tok (static / this) | core use | step peak MiB (vs static) | micro-batches | fill (idle) | "
             "imbalance (worst) | degree: token share |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        s = c["summary"]
        paired = (f"{s['paired_ratio_median']:.2f} [{min(s['paired_ratios']):.2f}, {max(s['paired_ratios']):.2f}]"
                  if c["config"] != "static" else "-")
        imbalance = ("-" if s["load_imbalance"] is None
                     else f"{s['load_imbalance']:.3f} ({s['load_imbalance_max']:.3f})")
        fill = f"{s['fill']:.2f}" + (f" ({s['empty_slots']:.2f})" if s["empty_slots"] is not None else "")
        lines.append(f"| {c['config']} | {s['tokens_per_s']:.0f} | {s['ratio_vs_static']:.2f}x | {paired} | "
                     f"{s['cpu_s_per_1k_tokens']:.2f} ({s['cpu_ratio_vs_static']:.2f}x) | {s['core_use']:.2f} | "
                     f"{s['step_peak_mib']:.0f} ({s['step_peak_vs_static']:.2f}x) | {s['micro_batches']:.1f} | "
                     f"{fill} | {imbalance} | {_degrees(s['degree_frac'])} |")
    return lines


def write_report(out: Path, meta: dict, cells: list[dict], goal_rows: list[dict]) -> None:
    o = meta["options"]
    mixes = "; ".join(f"**{m}**: " + ", ".join(f"{share:.0%} uniform in [{lo}, {hi}] tokens" if lo != hi else
                                               f"{share:.0%} of {lo} tokens"
                                               for share, lo, hi in scaled_mix(m, o["seq_len"])) for m in MIXES)
    loads = [(c["model"], c["world"], *c["loadavg"]) for c in cells if c["config"] == "static" and
             c["mix"] == "long-tail"]
    lines = [
        "# Token-budget micro-batches and dynamic CP (issue 13)", "",
        (f"Generated by `{meta['command']}` on {meta['date']} in {meta['elapsed_s'] / 60:.1f} min "
        f"(script: `scripts/bench_dynamic_cp.py`; every number: `results.json`)."), "",
        (f"Code: commit {meta['code']['commit']}"
         + (f", uncommitted changes in {', '.join(meta['code']['uncommitted'])}" if meta["code"]["uncommitted"] else "")
         + " (file hashes in results.json)"
         + ("; **the code changed during the run**" if meta["code_changed_during_run"] else "") + "."),
        "",
        f"Machine: {meta['machine']}. Load average (1 min) at the start {meta['loadavg'][0]:.2f}, at the end "
        f"{meta['loadavg'][1]:.2f}; per spawn (start -> end): "
        + ", ".join(f"{m} world {w}: {a:.2f} -> {b:.2f}" for m, w, a, b in loads)
        + f". Other work on the machine shares its {os.cpu_count()} cores: the ratios between configurations, "
        "measured side by side, are the result; absolute tokens/s are not comparable between runs.", "",
        "## Setup", "",
        (f"- The real SFT trainer (`trainer.engine.build_trainer` + `trainer.sft.sft_step`: FSDP2, Ulysses CP, the "
        f"loss, clipping, AdamW), fp32 on CPU, gloo, {o['threads']} intra-op thread(s) per rank, the ranks spawned "
        "by `scripts/bench/launch.py`."),
        (f"- Runs (model, world): {', '.join(f'{m} x {w}' for m, w in o['runs'])}; models: "
         f"{', '.join(f'`{m}` (' + ' '.join(MODELS[m]) + ')' for m in dict.fromkeys(m for m, _ in o['runs']))}. "
         "Both: 4 heads x 16 dims, 2 KV heads, vocabulary 512 (the builtin tokenizer). tiny_qwen3: "
         "sliding-window (window 24) and full softmax-attention layers alternating; tiny_qwen3_5: Gated DeltaNet "
         "(linear attention) and full-attention layers (the cost model counts only full-attention layers as "
         "quadratic)."),
        (f"- data.seq_len={o['seq_len']} (the longest document). {o['docs']} synthetic documents per mix (random "
        "ids, every token but the first a target). Mixes (written for seq_len 8192, scaled linearly to "
        f"data.seq_len, the 80/20 long-tail shape kept): {mixes}."),
        (f"- Every configuration consumes the same documents per step: those of {o['rows_per_step']} next-fit "
        f"packed data.seq_len rows (data.micro_batch_size=1, optim.grad_accum x dp = {o['rows_per_step']})."),
        ("- Configurations (W = world): **static** model.cp=W, fixed rows (one row per micro-batch, split over W "
        "ranks: seq_len/W tokens per rank); **budget** model.cp=W, data.max_tokens_per_rank=seq_len/W (every "
        "micro-batch at degree W); **dynamic** ... and model.cp_dynamic=true; **dp-only** model.cp=1, "
        "data.max_tokens_per_rank=seq_len (whole documents per rank, seq_len tokens per rank). The uniform "
        "control runs static and dynamic only, on the same trainers as the long-tail mix (their own loaders)."),
        (f"- One spawn per (model, world) builds every configuration's trainer; then step i of every configuration "
        f"runs before step i + 1 of any (the order rotated each step), so machine load hits them alike: 1 warm-up "
        f"step, {o['steps']} timed steps, 1 memory step."),
        ("- tokens/s: the step's real document tokens (no padding; counted from a shadow PackedLoader, as "
        "`sft_step`'s own tokens_per_s) / the slowest rank's wall time of `sft_step` (the "
        "ranks start after a barrier); median over the timed steps. vs static: ratio of the medians. Paired: "
        "per step, this configuration's tokens/s / static's on the same documents; median [min, max]."),
        ("- CPU-s / 1k tok: process CPU time of all ranks (compute and gloo's threads) per 1000 real tokens; in "
        "brackets static's / this one's (> 1: less work than static). Less sensitive than wall time to other "
        "load on the machine, blind to time spent waiting."),
        ("- core use: the ranks' CPU time / (wall time x the cores they can use, min(W, cores)), median over the "
         "timed steps: near 1 the ranks kept every core busy; well below 1 they waited (on each other, or for "
         "cores other jobs on the machine held: then the wall-time columns are noisy)."),
        ("- step peak MiB: the memory step under `scripts/bench/measure.py` PeakMemory: bytes allocated during the "
        "step and live at its peak, above what was live at its start (activations, logits, workspaces, "
        "communication buffers; not weights, gradients or AdamW state, which are equal across configurations), "
        "the worst rank. `sft_step`'s own `peak_mem_gb` on CPU is the process's peak RSS during the step: with "
        "all configurations in one process it holds every configuration's weights and the allocator's cache, "
        "so it is not per configuration (kept in results.json as rss_high_water_gb). On CUDA `peak_mem_gb` is "
        "max_memory_allocated, which the allocation-based column here approximates."),
        ("- micro-batches / imbalance / degree share: `sft_step`'s `micro_batches`, `load_imbalance` (the plan's "
        "cost model: sum over micro-batches of the slowest rank's cost / the mean rank's; fixed rows have no "
        "plan: '-') and `cp_degree_<d>_frac` (share of the step's tokens run at CP degree d), means over the "
        "timed steps (imbalance: also the worst step)."),
        ("- fill (idle): how full the micro-batches are: the mean over every (micro-batch, rank) of the rank's "
         "tokens / data.max_tokens_per_rank (fixed rows: real tokens / row tokens, i.e. 1 - padding); idle: the "
         "share of (micro-batch, rank) slots that run an empty pass (positions no row fills). From "
         "the plans recomputed in the parent with trainer/planning/token_budget.py plan_step (checked against sft_step's "
         "micro_batches); per-step layouts in results.json (cells[].plans)."),
    ]
    if any(w > (os.cpu_count() or 1) for _, w in o["runs"]):
        lines.append(f"- World 4 runs 4 ranks on {os.cpu_count()} cores (oversubscribed): a rank blocked in a "
                     "collective yields its core to another, so wall-time ratios at world 4 reflect total CPU work "
                     "more than per-rank balance. World 2 is the cleaner reading of balance and communication.")
    lines += ["", "## Results", ""]
    for model in dict.fromkeys(m for m, _ in o["runs"]):
        for mix in MIXES:
            for world in [w for m, w in o["runs"] if m == model]:
                t = table(cells, model, mix, world)
                if t:
                    s = next(c["summary"] for c in cells if (c["model"], c["mix"], c["world"]) == (model, mix, world))
                    lines += [(f"### {model}, {mix}, world {world} ({s['docs_per_step']:.1f} documents, "
                              f"{s['real_tokens_per_step']:.0f} real tokens per step, {s['timed_steps']} timed "
                              "steps)"), "", *t, ""]
    same = all(c["summary"]["same_loss_tokens_as_static"] for c in cells)
    worst = max(c["summary"]["first_loss_diff_vs_static"] for c in cells)
    lines += [(f"Same documents check: every configuration's loss-token count equals static's at every step: "
              f"{'yes' if same else '**no**'}; first-step loss (same weights, same documents) differs from static's "
              f"by at most {worst:.1e}."), ""]
    lines += ["## Goals (issue 13)", "", "| goal | model | world | value | met |", "|---|---|---|---|---|"]
    for g in goal_rows:
        extra = ""
        if "memory_vs_static" in g:
            extra = f" (paired {g['paired']}; step peak {g['memory_vs_static']:.2f}x static"
            if g.get("ceiling"):
                extra += f"; CPU work {g['cpu_ratio']:.2f}x less, work ceiling {g['ceiling']:.2f}x"
            extra += ")"
        elif "worst_step" in g:
            extra = f" (worst step {g['worst_step']})"
        elif "noise" in g:
            extra = f" (noise {g['noise']})"
        verdict = g.get("verdict", "yes" if g["met"] else "no")
        lines.append(f"| {g['goal']} | {g['model']} | {g['world']} | {g['value']}{extra} | "
                     f"{verdict if verdict == 'yes' else f'**{verdict}**'} |")
    lines += ["", "## Interpretation", "", *meta.get("interpretation", ["(none)"]), "", "## Reading the numbers", "",
              ("- Micro-batches: the planner packs each degree's documents into rows of degree x budget tokens "
               "and places the rows side by side in micro-batches (a micro-batch can run a degree-2 row beside two "
               "degree-1 rows); a micro-batch moves into the spare room of the other micro-batches' rows when its "
               "documents fit and the CP communication they then pay at the higher degree is less than the pass's "
               "FSDP all-gathers (the cost model counts both in elements moved); a pass that still leaves ranks "
               "idle spreads its degree-1 documents over them. So the degree shares above are what the planner "
               "chose after that trade, not the documents' own degrees. The "
               "micro-batches, fill and idle columns show what each configuration pays; the plans of every step "
               "are in results.json (layout: [degree, tokens] per block)."),
              ("- CPU, not GPU: here a token's matmuls cost about the same however its document is split, and gloo "
               "collectives are slow and synchronous, so the differences measured are mostly communication and "
               "synchronisation (every Ulysses all-to-all waits for the slowest rank, on a machine other jobs "
               "share), padding (fixed rows) and the per-micro-batch fixed cost. On GPUs the all-to-alls are "
               "cheaper but short per-rank pieces use the device poorly: the ratios here do not transfer "
               "quantitatively."),
              ("- Work ceiling: the most CPU work per token any choice of degrees can save against static at this "
               "budget, from three measured configurations on the same documents: dp-only's CPU-s per token "
               "(compute without CP communication) plus, for the share of tokens in documents that need degree W "
               "(longer than the budget x the largest proper divisor of W), the extra that budget (degree W "
               "everywhere) pays per token; static's CPU-s per token over that. It assumes Ulysses moves a fixed "
               "number of bytes per token and that a plan holds no more tokens per micro-batch than the budget "
               "plan (true: W x budget at every degree); documents of intermediate degrees are counted at "
               "dp-only's cost, which only raises the ceiling. The wall-time ratio can exceed it only by keeping "
               "the cores busier than static does (the core use column). A ceiling below 1.3x means no plan reaches the "
               "goal on this machine with this mix at this memory."),
              *[f"- Cost model of {m}: {c['per_token']:.3g} FLOPs per token + {c['per_pair']:.3g} per causal pair: "
                f"a data.seq_len={o['seq_len']} document's attention pairs are {c['attention_share']:.0%} of its "
                "estimated cost (the rest is linear in tokens), so the quadratic term that makes long documents "
                "expensive to run unsplit is small in these tiny models." for m, c in meta["cost_models"].items()],
              ""]
    (out / "README.md").write_text("\n".join(lines))


def interpretation(cells: list[dict], goal_rows: list[dict]) -> list[str]:
    """Generated sentences from the numbers in the tables (the hand-written reading is in the report's notes)."""
    lines = []
    for model in sorted({c["model"] for c in cells}):
        for world in sorted({c["world"] for c in cells if c["model"] == model}):
            got = {c["config"]: c["summary"] for c in cells
                   if (c["model"], c["mix"], c["world"]) == (model, "long-tail", world)}
            if "dynamic" not in got:
                continue
            d, b, st = got["dynamic"], got.get("budget"), got["static"]
            text = (f"- {model}, world {world}, long-tail: dynamic {d['ratio_vs_static']:.2f}x static "
                    f"(paired {d['paired_ratio_median']:.2f}), {1 / d['cpu_ratio_vs_static']:.2f}x its CPU time per "
                    f"token, step peak {d['step_peak_vs_static']:.2f}x; "
                    f"{d['degree_frac'].get('1', 0):.0%} of the tokens at degree 1, {d['micro_batches']:.1f} "
                    f"micro-batches per step vs static's {st['micro_batches']:.1f}")
            if b:
                text += (f". The token budget alone (degree {world} everywhere) gives {b['ratio_vs_static']:.2f}x "
                         f"(paired {b['paired_ratio_median']:.2f}), so dynamic degrees add "
                         f"{d['ratio_vs_static'] / b['ratio_vs_static']:.2f}x on top")
            dp = got.get("dp-only")
            if dp:
                text += (f". dp-only {dp['ratio_vs_static']:.2f}x at {dp['step_peak_vs_static']:.2f}x static's step "
                         "peak memory")
            ceiling = work_ceiling(got)
            if ceiling:
                text += (f". Work ceiling: {ceiling:.2f}x ({st['top_degree_share']:.0%} of the tokens are in "
                         f"documents longer than the budget allows below degree {world}; dynamic does "
                         f"{d['cpu_ratio_vs_static']:.2f}x less CPU work than static)")
            uni = next((c["summary"] for c in cells if (c["model"], c["mix"], c["world"], c["config"]) ==
                        (model, "uniform", world, "dynamic")), None)
            if uni:
                text += (f". Uniform control: dynamic {uni['ratio_vs_static']:.2f}x static (paired "
                         f"{uni['paired_ratio_median']:.2f}), degree share {_degrees(uni['degree_frac'])}")
            lines.append(text + ".")
    met = [g for g in goal_rows if g["met"]]
    unsure = [g for g in goal_rows if g.get("verdict") == "inconclusive"]
    lines.append(f"- Goals met: {len(met)} of {len(goal_rows)}" + (f", {len(unsure)} inconclusive (the two speed-up "
                 "estimates straddle the target)" if unsure else "") + " (table above).")
    return lines


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


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        data = json.loads((args.out / "results.json").read_text())
        cells, meta = data["cells"], data["meta"]
        meta["options"]["runs"] = [tuple(run) for run in meta["options"]["runs"]]
        summarise(cells)
        goal_rows = goals(cells)
        meta["interpretation"] = interpretation(cells, goal_rows)
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "goals": goal_rows, "cells": cells},
                                                          indent=1))
        write_report(args.out, meta, cells, goal_rows)
        print(f"rewrote {args.out / 'README.md'}")
        return
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
    started, load_start, code = time.time(), os.getloadavg()[0], code_state()
    script = os.path.relpath(Path(__file__).resolve(), Path.cwd())
    command = shlex.join(["python", script, *(argv if argv is not None else sys.argv[1:])])
    cells = run(opts, lambda text: print(text, flush=True))
    summarise(cells)
    goal_rows = goals(cells)
    meta = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "elapsed_s": time.time() - started, "loadavg": [load_start, os.getloadavg()[0]],
            "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
                       f"torch {torch.__version__}, Python {platform.python_version()}", "options": opts,
            "code": code, "code_changed_during_run": code_state()["sha1"] != code["sha1"]}
    if meta["code_changed_during_run"]:
        print("warning: the trainer's code changed during the run: the configurations may have run different "
              "versions (see results.json meta.code)", file=sys.stderr)
    meta["interpretation"] = interpretation(cells, goal_rows)
    meta["cost_models"] = {m: cost_model(m, opts["seq_len"]) for m in dict.fromkeys(m for m, _ in opts["runs"])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "goals": goal_rows, "cells": cells}, indent=1))
    write_report(args.out, meta, cells, goal_rows)
    print(f"wrote {args.out} in {meta['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
