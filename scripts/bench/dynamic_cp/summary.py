"""bench_dynamic_cp.py's numbers -> verdicts: each cell's summary, the work ceiling, issue 13's goals.

    cells (run.py: every step's wall / CPU time, memory, plan metrics) ─> summarise ─> cell["summary"]: medians
        over the timed steps, ratios vs static (same model, mix, world) paired step by step, the same-documents
        check (loss tokens, first loss)
    summaries of one (model, world) on the long-tail mix ─> work_ceiling (the most CPU work any choice of
        degrees can save against static)
    summaries ─> goals: rows {goal, model, world, value, met, ...} (results.json "goals", the report's table)
"""

from __future__ import annotations

import os
import statistics
import sys

from bench.measure import median_se


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
        s["paired_ratio_se"] = median_se(paired)
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
