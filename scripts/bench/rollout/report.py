"""docs/benchmarks/rollout: results.json -> README.md (tables) and learning.png (held-out accuracy vs time)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.provenance import machine_line
from bench.report import markdown_table
from bench.rollout.learn import read_run


RUN_LABELS = {"vllm": "rollout.engine=vllm", "hf": "rollout.engine=hf",
              "vllm_lora16": "vllm + LoRA r=16 (lr 1e-4, adapters-only sync)"}


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else None


def _fmt(x, spec=".2f") -> str:
    return "—" if x is None else format(x, spec)


def minutes_to_gain(evals: list[dict], gain: float) -> float | None:
    """Wall minutes (from the run's start) until held-out accuracy first reaches the first eval's + gain."""
    base = evals[0]["accuracy"]
    hit = next((e for e in evals if e["accuracy"] >= base + gain - 1e-9), None)
    return None if hit is None else hit["elapsed_s"] / 60


def plot(out: Path, runs: dict) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for engine, run in runs.items():
        ax.plot([e["elapsed_s"] / 60 for e in run["evals"]], [100 * e["accuracy"] for e in run["evals"]], "o-",
                label=RUN_LABELS[engine])
    ax.set_xlabel("wall time since the run started (min; includes startup and evals)")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_title("GRPO on SmolLM2-135M-Instruct, small arithmetic, cp=2, 2 CPU cores", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning.png", dpi=120)
    plt.close(fig)
    return "learning.png"


def _learning_lines(out: Path, results: dict) -> list[str]:
    runs = {e: r for e in RUN_LABELS if e in ("vllm", "hf", "vllm_lora16") and (r := read_run(out, e))}
    if not runs:
        return ["(no learning runs in this results.json)"]
    lines, rows = [], []
    for engine, run in runs.items():
        evals, metrics = run["evals"], run["metrics"]
        rows.append([RUN_LABELS[engine], len(metrics), f"{100 * evals[0]['accuracy']:.0f}%", f"{100 * evals[-1]['accuracy']:.0f}%",
                     f"{100 * max(e['accuracy'] for e in evals):.0f}%", _fmt(minutes_to_gain(evals, 0.15), ".1f"),
                     f"{evals[-1]['elapsed_s'] / 60:.1f}", _fmt(_median(metrics, "step_time_s"), ".1f"),
                     _fmt(_median(metrics, "sync_s"), ".2f"), _fmt((_median(metrics, "sync_bytes") or 0) / 2**20, ".1f"),
                     _fmt(_median(metrics, "generate_s"), ".1f"), _fmt(_median(metrics, "train_s"), ".1f")])
    lines += markdown_table(["run", "steps", "accuracy start", "end", "best", "min to +15 pts", "total min",
                             "step s (median)", "sync s", "sync MiB", "generate s", "train s"], rows)
    image = plot(out, runs)
    if image:
        lines += ["", f"![held-out accuracy vs wall time]({image})"]
    for run in results.get("learning", []) + results.get("lora", []):
        lines += ["", f"`{run['command'].replace('torch.distributed.run', 'torchrun', 1)}`: {run['summary']}"]
    return lines


def phase_shares(metrics: list[dict], k: int) -> dict:
    """Median step time and the trainer's and engine's idle shares of it. k = 0 (synchronous): the trainer waits
    through sync + generation, the engine through training + sync; k >= 1: what the run measured (trainer_idle_s:
    waiting for the producer's batch; engine_idle_s: the producer at its gate or blocked on a full queue)."""
    rows = metrics[1:] or metrics  # the first step includes warm-up (and, async, the first batch's generation)
    step = statistics.median(m["step_time_s"] for m in rows)
    if k == 0:
        trainer_idle = statistics.median((m["sync_s"] + m["generate_s"]) / m["step_time_s"] for m in rows)
        engine_idle = statistics.median((m["train_s"] + m["sync_s"]) / m["step_time_s"] for m in rows)
    else:
        trainer_idle = statistics.median(m["trainer_idle_s"] / m["step_time_s"] for m in rows)
        engine_idle = statistics.median(min(m["engine_idle_s"] / m["step_time_s"], 1.0) for m in rows)
    return {"step_s": step, "trainer_idle": trainer_idle, "engine_idle": engine_idle,
            "generate_s": statistics.median(m["generate_s"] for m in rows),
            "train_s": statistics.median(m["train_s"] for m in rows),
            "sync_s": statistics.median(m["sync_s"] for m in rows)}


def _async_lines(out: Path) -> list[str]:
    runs = {k: run for k, name in ((0, "vllm"), (1, "vllm_k1"), (2, "vllm_k2")) if (run := read_run(out, name))}
    if len(runs) < 2:
        return ["(async runs not made: python scripts/bench_rollout.py --parts async)"]
    base = phase_shares(runs[0]["metrics"], 0)
    rows = []
    for k, run in runs.items():
        p = phase_shares(run["metrics"], k)
        lags = {j: statistics.mean(m.get(f"off_policy_lag_{j}_frac", 1.0 if j == 0 else 0.0) for m in run["metrics"])
                for j in range(k + 1)}
        rows.append([k, f"{p['step_s']:.1f}", f"{base['step_s'] / p['step_s']:.2f}x", f"{100 * p['trainer_idle']:.0f}%",
                     f"{100 * p['engine_idle']:.0f}%", " / ".join(f"{100 * lags[j]:.0f}%" for j in range(k + 1)),
                     _fmt(minutes_to_gain(run["evals"], 0.15), ".1f"),
                     f"{100 * run['evals'][-1]['accuracy']:.0f}%"])
    g, t, s = base["generate_s"], base["train_s"], base["sync_s"]
    bound = (g + t + s) / max(g, t + s)
    lines = markdown_table(["k", "step s (median)", "speed vs k=0", "trainer idle", "engine idle",
                            "rollouts at lag 0 / 1 / 2", "min to +15 pts", "final accuracy"], rows)
    lines += ["", f"The synchronous step's phases (k=0, medians): generate {g:.1f} s, train {t:.1f} s, sync {s:.1f} s. "
              f"Perfect overlap would make a step max(generate, train + sync): a {bound:.2f}x bound. On these 2 cores the "
              "two sides share the cores (generation and training each use both when alone), so overlapping them "
              "mostly trades one for the other; the measured gain above is what is left after that contention.",
              "", f"**Projected, not measured**, for a GPU layout where the vLLM server has GPUs of its own (the two "
              f"sides no longer share compute), with the same phase times: a step takes max(generate, train + sync) "
              f"= {max(g, t + s):.1f} s instead of {g + t + s:.1f} s, {bound:.2f}x; when generation dominates (long "
              "completions) the async step approaches the generation time alone and k = 1 already reaches the bound."]
    return lines


def _trl_lines(results: dict, out: Path) -> list[str]:
    trl = results.get("trl")
    if not trl:
        return ["(TRL peer not run: scripts/install_trl_peer.sh)"]
    lines = [f"TRL {trl.get('trl_version', '?')}, GRPOTrainer, one process on both cores, its own transformers "
             "generation (no vLLM), the same model, prompts, group size, lengths, temperature, lr and loss settings "
             "(mapping in scripts/bench/rollout/trl_peer.py)."]
    rows = []
    steps = trl.get("per_step", [])
    if steps:
        toks = [s["completion_tokens"] / s["step_s"] for s in steps]
        rows.append(["TRL GRPOTrainer", len(steps), _fmt(_median(steps, "step_s"), ".1f"),
                     _fmt(_median(steps, "generate_s"), ".1f"), _fmt(statistics.median(toks), ".1f")])
    for engine in ("hf", "vllm"):
        run = read_run(out, engine)
        if run:
            m = run["metrics"][:max(1, len(steps))]
            toks = [r["train_tokens"] / r["step_time_s"] for r in m]
            rows.append([f"cptrain, rollout.engine={engine} (first {len(m)} steps)", len(m),
                         _fmt(_median(m, "step_time_s"), ".1f"), _fmt(_median(m, "generate_s"), ".1f"),
                         _fmt(statistics.median(toks), ".1f")])
    return lines + [""] + markdown_table(["trainer", "steps", "step s (median)", "generate s", "completion tok/s"],
                                         rows)


def render(out: Path) -> None:
    results = json.loads((out / "results.json").read_text())
    meta = results["meta"]
    lines = ["# Rollouts: hf vs vLLM, weight sync, log-prob mismatch, and GRPO that learns on a real model", "",
             f"Machine: {machine_line(meta['machine'])}. `python scripts/bench_rollout.py` runs every part, "
             "`--parts` some of them (the others are kept); the shared column says what else ran on the 2 cores "
             "(results.json made_by.<part>.shared, written by hand: the script cannot know):", ""]
    made = results.get("made_by", {})
    lines += markdown_table(["part", "measured by", "date", "commit", "shared"],
                            [[part, f"`{m['command']}`", m["date"], m["commit"], m.get("shared", "not recorded")]
                             for part, m in made.items()])
    lines += ["", "## Rollout throughput (SmolLM2-135M-Instruct, fp32)", ""]
    e = results.get("engines")
    if e:
        base = e["hf_per_prompt"]["tokens_per_s"]
        rows = [[name, e[key]["tokens"], f"{e[key]['seconds']:.1f}", f"{e[key]['tokens_per_s']:.1f}",
                 f"{e[key]['tokens_per_s'] / base:.2f}x"]
                for name, key in (("hf, one generate per prompt (before)", "hf_per_prompt"),
                                  ("hf, one batched generate per rank (now)", "hf_batched"), ("vllm", "vllm"))]
        lines += [f"{e['prompts']} prompts x {e['group_size']} samples, up to {e['max_new_tokens']} new tokens, "
                  f"T=1; every engine on both cores; the vLLM server's startup ({e['vllm_startup_s']:.0f} s) is not "
                  "counted.", ""]
        lines += markdown_table(["engine", "tokens", "seconds", "tokens/s", "vs before"], rows)
    lines += ["", "## GRPO on a real model: held-out accuracy over time", "",
              "`experiment=smollm2_arith` (configs/experiment/smollm2_arith.yaml): SmolLM2-135M-Instruct, cp=2 "
              "Ulysses, 8 prompts x 8 samples per step, up to 48 new tokens at T=0.7, reward 1 when the final "
              "number is the answer, lr 1e-5; greedy accuracy on the 100 held-out prompts. Step times: sync = "
              "weights to the engine, generate = sampling + rewards, train = the policy-gradient half.", ""]
    lines += _learning_lines(out, results)
    lines += ["", "## Async GRPO: rollouts of the next steps while this one trains", "",
              "`rollout.max_off_policy_steps=k` with the vllm engine, the same recipe and steps as above; k = 0 is "
              "the synchronous vllm run. Idle shares are medians over steps 2+ of the step time.", ""]
    lines += _async_lines(out)
    lines += ["", "## The peer: TRL's GRPOTrainer, same model and settings", ""] + _trl_lines(results, out)
    t = results.get("train")
    if t:
        sft = next(r for r in t if r["case"] == "sft rows")["tokens_per_s"]
        rows = [[r["case"], r["tokens"], r["micro_batches"], f"{r['step_s']:.1f}", f"{r['tokens_per_s']:.0f}",
                 f"{r['tokens_per_s'] / sft:.2f}x"] for r in t]
        lines += ["", "## The training half of a GRPO step vs SFT (same model, same tokens)", "",
                  "64 documents shaped like the run's (a prompt of ~40 tokens + 8-48 completion tokens), 2 ranks, "
                  "cp=2, fp32, one optimizer step; tokens/s counts every token (prompts and completions). See "
                  "scripts/bench/rollout/train.py for what each case runs.", ""]
        lines += markdown_table(["case", "tokens", "micro-batches", "step s", "tokens/s", "vs SFT"], rows)
    s = results.get("sync")
    if s:
        rows = [[r["size"], f"{r['parameters'] / 1e6:.0f}M", f"{r['sync_bytes'] / 2**20:.0f}", f"{r['sync_buckets']:.0f}",
                 f"{r['vllm_sync_s']:.2f}", f"{r['sync_bytes'] / 2**30 / r['vllm_sync_s']:.2f}", f"{r['hf_sync_s']:.2f}"]
                for r in s]
        lines += ["", "## Weight sync time vs model size", "",
                  f"2 trainer ranks (FSDP2, fp32) to an owned vLLM server, buckets of {results['sync_bucket_mb']:.0f} "
                  "MiB through /dev/shm (rollout.vllm.sync_bucket_mb); the hf engine's sync is a full gather of the "
                  "state dict on every rank into its plain copy. Median of the syncs after a warm-up.", ""]
        lines += markdown_table(["model", "parameters", "MiB sent", "buckets", "vllm sync s", "GiB/s",
                                 "hf sync s"], rows)
    mm = results.get("mismatch")
    if mm:
        rows = []
        for r in mm:
            for engine in ("vllm", "hf"):
                m = r[engine]
                rows.append([r["dtype"], engine, m["tokens"], f"{m['abs_mean']:.2e}", f"{m['kl']:.2e}",
                             f"{m['ratio_max']:.4f}"])
        lines += ["", "## Engine vs trainer log-probs on the sampled tokens", "",
                  "The trainer's CP forward (cp=2, what GRPO trains with) against the engine's reported log-prob of "
                  "each token it sampled (T=1), at the same weights. KL: k3 estimate of KL(engine || trainer).", ""]
        lines += markdown_table(["dtype", "engine", "tokens", "mean abs diff", "KL", "max ratio"], rows)
    lines.append("")
    (out / "README.md").write_text("\n".join(lines))
