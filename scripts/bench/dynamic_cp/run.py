"""bench_dynamic_cp.py's measurement: one spawn per (model, world), every configuration in it, steps interleaved.

    measure(opts): code_state (start) ─> run ─> code_state (end), machine, cost models ─> (meta, cells)
    run(opts):
        the parent, per cell (workload.py): overrides, the documents of each step (shadow PackedLoader), the
            recomputed plans, the top-degree shares
        per (model, W): bench.launch.spawn(run_rank) on W gloo ranks (trainer.run.runtime.init_distributed
            reuses the group)
    run_rank, on every rank:
        per configuration: compose(configs/sft.yaml + overrides) ─> build_trainer
        per cell (configuration, mix): PackedLoader(synthetic TokenizedDocs)
        step 0 (warm-up), 1..steps (timed), steps + 1 (memory, under bench.measure.PeakMemory); within a step
        index every cell runs once, the order rotated each step: bench.measure.StepTimer (barrier, wall and
        process CPU time) around sft_step ─> its metrics
        all_gather_object ─> rank 0 ─> the parent
    merge_ranks, in the parent: per step, the slowest rank's wall time, the ranks' summed CPU time, the largest
    step peak, the plan's micro_batches / load_imbalance / cp_degree_<d>_frac ─> cell["steps"]

All configurations of a run share one process per rank (so sft_step's peak_mem_gb, on CPU the process's peak RSS,
is not per configuration: the profiled step's allocation peak is the memory measured). One intra-op thread per
rank by default.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from bench.dynamic_cp.workload import (
    MIXES, cells_of, compose, cost_model, document_lengths, make_docs, overrides, plan_diagnostics, step_tokens,
    top_degree_share)
from bench.launch import spawn
from bench.measure import PeakMemory, StepTimer
from bench.provenance import code_state, machine, now

# the files the feature lives in: hashed at the start and the end of a run (results.json meta.code)
FEATURE_FILES = ("trainer/planning/token_budget.py", "trainer/sft.py", "trainer/engine.py", "trainer/data/packing.py",
                 "cp/dims.py")


def run_rank(rank: int, world: int, job: dict) -> list[dict]:
    """Build one trainer per configuration of this world (all in this process), then run their steps
    interleaved: step i of every cell (a configuration on a length mix, with its own PackedLoader) before step
    i + 1 of any, the order rotated each step; the last step of every cell runs under PeakMemory. Rank 0
    returns every rank's records: [{"cell", "step", "wall_s", "cpu_s", metrics...}]."""
    torch.set_num_threads(job["threads"])
    from trainer import config
    from trainer.data.packing import PackedLoader
    from trainer.data.tokenizer import pad_token_id
    from trainer.engine import build_trainer
    from trainer.sft import sft_step

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
    records, cells, steps, cpu = [], job["cells"], job["steps"], torch.device("cpu")
    for step in range(steps + 1):  # the last: memory
        shift = step % len(cells)
        for cell in cells[shift:] + cells[:shift]:
            trainer, loader = trainers[cell["config"]], loaders[cell["key"]]
            profiled = step == steps
            with StepTimer(cpu) as timer, PeakMemory(cpu) if profiled else nullcontext() as peak:
                metrics = sft_step(trainer, loader)
            record = {"cell": cell["key"], "step": step, "wall_s": timer.seconds, "cpu_s": timer.cpu_seconds,
                      "profiled": profiled,
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


def run(opts: dict, log) -> list[dict]:
    """Every cell of opts["runs"], measured: cells_of's cells with their overrides, documents, plans and steps."""
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


def measure(opts: dict, command: str, log) -> tuple[dict, list[dict]]:
    """Run every cell (run) and describe the run: results.json's meta (its interpretation comes with the report)."""
    started, load_start, code = time.time(), os.getloadavg()[0], code_state(FEATURE_FILES)
    cells = run(opts, log)
    meta = {"command": command, "date": now(), "elapsed_s": time.time() - started,
            "loadavg": [load_start, os.getloadavg()[0]], "machine": machine("cpu"), "options": opts,
            "code": code, "code_changed_during_run": code_state(FEATURE_FILES)["sha1"] != code["sha1"]}
    if meta["code_changed_during_run"]:
        print("warning: the trainer's code changed during the run: the configurations may have run different "
              "versions (see results.json meta.code)", file=sys.stderr)
    meta["cost_models"] = {m: cost_model(m, opts["seq_len"]) for m in dict.fromkeys(m for m, _ in opts["runs"])}
    return meta, cells
