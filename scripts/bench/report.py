"""bench_cp.py's results -> docs/benchmarks/: README.md (command, machine, method, tables, goals) and PNG plots.

Shared by the benchmarks: markdown_table (a markdown table's lines from formatted cells). The rest is
bench_cp.py's report (its tables, goals, plots and method):

    ratio_vs_seqlen.png    throughput ratio vs cp=1 (sdpa) against S, one line per config
    memory_vs_seqlen.png   peak memory per rank against S
    max_seqlen_vs_cp.png   longest S whose peak memory per rank fits the budget, against cp
                           (quadratic fit of the measured peaks, solved for the budget)
"""

from __future__ import annotations

import math
from pathlib import Path

from bench.provenance import machine_line

MIB = 2 ** 20
REFERENCE = {"attention": "cp1 sdpa", "model": "cp1 hf"}  # the "cp=1" of every ratio (sweep.REFERENCE)
GOALS = {"ulysses": 0.97, "ring": 0.92}
BYTES_GOAL, MEMORY_GOAL = 1.05, 0.55


def markdown_table(head: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines: the header row, the separator, one line per row (cells already formatted)."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _measured(cells):
    return [c for c in cells if not c.get("skipped")]


def _find(cells, **keys):
    return next((c for c in _measured(cells) if all(c.get(k) == v for k, v in keys.items())), None)


def _fmt(x, spec=".2f", none="—"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _mem_ratio(cells, c, config=None):
    """Peak memory relative to the workload's cp=1 reference (or to `config` at the same S)."""
    base = _find(cells, world=c["world"], workload=c["workload"], seq_len=c["seq_len"],
                 config=config or REFERENCE[c["workload"]])
    return None if base is None or not base["peak_mem"] else c["peak_mem"] / base["peak_mem"]


def _bytes_ratio(c):
    return None if not c.get("bytes_min") else c["bytes_sent"] / c["bytes_min"]


def table(cells, world, workload) -> str:
    rows = [c for c in _measured(cells) if c["world"] == world and c["workload"] == workload]
    ref = REFERENCE[workload]
    head = ["S", "config", "step ms", f"throughput vs {ref} [min–max]", "CPU-time ratio", "vs same-kernel cp1",
            "peak MiB/rank", f"mem vs {ref}", "MiB sent/rank", "minimum", "sent/min", "comm wait"]
    lines = []
    for c in rows:
        lo, hi = c["ratio_range"] or (None, None)
        lines.append([
            c["seq_len"], c["config"], f"{c['median_s'] * 1e3:.0f}", f"{_fmt(c['ratio'])} [{_fmt(lo)}–{_fmt(hi)}]",
            _fmt(c["cpu_ratio"]), _fmt(c["ratio_same_kernel"]), f"{c['peak_mem'] / MIB:.1f}",
            _fmt(_mem_ratio(cells, c)), _fmt(None if c["bytes_sent"] is None else c["bytes_sent"] / MIB, ".1f"),
            _fmt(None if c["bytes_min"] is None else c["bytes_min"] / MIB, ".1f"), _fmt(_bytes_ratio(c), ".3f"),
            f"{c['comm_share'] * 100:.0f}%"])
    return "\n".join(markdown_table(head, lines))


def goals(cells, world=2) -> list[tuple[str, str, str, str]]:
    """(goal, measured, met?, where) at the longest S of each workload, `world` ranks, cp = world."""
    out = []
    for workload in ("model", "attention"):
        rows = [c for c in _measured(cells) if c["world"] == world and c["workload"] == workload and c["cp"] == world]
        if not rows:
            continue
        longest = max(c["seq_len"] for c in rows)
        ref = REFERENCE[workload]
        for c in (c for c in rows if c["seq_len"] == longest and c["peer"] is None):
            where = f"{workload}, S={longest}, {c['config']}"
            goal = GOALS.get(c["style"], GOALS["ring"])
            out.append((f"{c['config']} throughput >= {goal} x {ref} (wall; CPU-time ratio in brackets)",
                        f"{_fmt(c['ratio'])} ({_fmt(c['cpu_ratio'])})", "yes" if c["ratio"] >= goal else "no", where))
            if c["baseline"] != ref:
                out.append((f"{c['config']} throughput >= {goal} x {c['baseline']} (same kernel)",
                            _fmt(c["ratio_same_kernel"]), "yes" if c["ratio_same_kernel"] >= goal else "no", where))
            ratio = _bytes_ratio(c)
            if ratio is not None:
                out.append((f"{c['config']} bytes sent <= {BYTES_GOAL} x minimum", _fmt(ratio, ".3f"),
                            "yes" if ratio <= BYTES_GOAL else "no", where))
            for base in dict.fromkeys([ref, c["baseline"]]):
                mem = _mem_ratio(cells, c, base)
                if mem is not None:
                    out.append((f"{c['config']} peak memory <= {MEMORY_GOAL} x {base}", _fmt(mem),
                                "yes" if mem <= MEMORY_GOAL else "no", where))
    return out


def _series(cells, workload, key, by_world: bool = True):
    """{config label: ([S...], [value...])}; by_world=False merges worlds (for per-rank memory,
    which does not depend on the world size: the first world's value at each S is kept)."""
    series: dict[str, dict[int, float]] = {}
    several = len({c["world"] for c in _measured(cells)}) > 1
    for c in _measured(cells):
        value = key(c) if c["workload"] == workload else None
        if value is None:
            continue
        label = c["config"] + (f" (world {c['world']})" if by_world and several else "")
        series.setdefault(label, {}).setdefault(c["seq_len"], value)
    return {label: (sorted(points), [points[s] for s in sorted(points)]) for label, points in series.items()}


def fit_max_seq_len(points: list[tuple[int, float]], budget: float) -> float | None:
    """Longest S with a + b*S + c*S^2 <= budget (least squares on the measured points; c, b >= 0)."""
    import numpy as np

    S = np.array([p[0] for p in points], dtype=float)
    m = np.array([p[1] for p in points], dtype=float)
    if len(S) < 2:
        return None
    for cols in ((S ** 0, S, S ** 2), (S ** 0, S)):
        if len(cols) > len(S):
            continue
        coef = np.linalg.lstsq(np.stack(cols, 1), m, rcond=None)[0]
        if (coef[1:] >= 0).all():
            break
    a, b, c = (list(coef) + [0.0])[:3]
    if c > 0:
        return (-b + math.sqrt(b * b + 4 * c * (budget - a))) / (2 * c) if budget > a else None
    return (budget - a) / b if b > 0 and budget > a else None


def max_seq_lens(cells, workload, budget_bytes):
    """{style: [(cp, S_max)]}: cp=1 from the style's same-kernel baseline."""
    out = {}
    styles = {c["style"] for c in _measured(cells) if c["workload"] == workload and c["cp"] > 1 and c["peer"] is None}
    for style in sorted(styles):
        base = REFERENCE[workload] if style == "ulysses" else "cp1 block"
        groups = {}
        for c in _measured(cells):
            if c["workload"] != workload:
                continue
            if c["config"] == base or (c["style"] == style and c["cp"] > 1 and c["peer"] is None):
                groups.setdefault((c["cp"], c["config"]), []).append((c["seq_len"], c["peak_mem"]))
        for (cp_degree, name), pts in sorted(groups.items()):
            s_max = fit_max_seq_len(pts, budget_bytes)
            if s_max is not None:
                out.setdefault(style, []).append((cp_degree, s_max))
    return out


def plots(out: Path, cells, budget_mib: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    workloads = [w for w in ("attention", "model") if any(c["workload"] == w for c in _measured(cells))]
    files = []
    specs = [("ratio_vs_seqlen.png", "throughput vs cp=1", lambda c: c["ratio"] if c["cp"] > 1 else None, True),
             ("memory_vs_seqlen.png", "peak memory per rank (MiB)", lambda c: c["peak_mem"] / MIB, False)]
    for name, ylabel, key, by_world in specs:
        fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.5), squeeze=False)
        for ax, workload in zip(axes[0], workloads):
            for label, (xs, ys) in sorted(_series(cells, workload, key, by_world).items()):
                style = ":" if "cp1" in label else ("--" if "world 4" in label else "-")
                ax.plot(xs, ys, marker="o", label=label, linestyle=style)
            if name.startswith("ratio"):
                for style, goal in GOALS.items():
                    ax.axhline(goal, color="grey", linewidth=0.8, linestyle=":")
                    ax.text(ax.get_xlim()[0], goal, f" {style} goal {goal}", fontsize=7, va="bottom", color="grey")
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
            ax.set_xlabel("sequence length S (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(workload)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.5), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        for style, pts in max_seq_lens(cells, workload, budget_mib * MIB).items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=style)
        ax.set_xlabel("cp (ranks per sequence)")
        ax.set_ylabel(f"max S within {budget_mib:.0f} MiB per rank")
        ax.set_title(f"{workload} (fit of measured peaks, extrapolated)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "max_seqlen_vs_cp.png", dpi=110)
    plt.close(fig)
    files.append("max_seqlen_vs_cp.png")
    return files


METHOD = """\
- **Equal work.** World size fixed; at cp=c each CP group runs c sequences of S tokens one after the
  other (micro-batches), so every rank handles S tokens per step at every cp; cp=1 is the same ranks
  doing data parallelism, each on its own sequence. Throughput ratio = t(cp=1) / t(config).
- **Baselines (cp=1).** `cp1 hf` (model workload, the reference): the unmodified transformers model
  with its own sdpa attention, no cptrain code. `cp1 sdpa`: cptrain's cp=1 path with the default local
  kernel (torch SDPA, one `is_causal` call per document); the reference of the
  attention workload. `cp1 block`: the ring's block kernel (`cpu_flash` on CPU, pieces cut by document)
  at cp=1, the kernel ring and hybrid use, so "vs same-kernel cp1" isolates the CP overhead.
- **Throughput ratio.** Median over the interleaved rounds (min–max in brackets) of
  t(reference) / t(config) within the same round; t = the slowest rank's wall time for the step
  (barrier before each step; CUDA events on GPU). One warm-up step per config first; the config order
  is rotated every round. **CPU-time ratio**: the same with the process CPU time summed over ranks
  (compute plus gloo's transfer threads, not time spent descheduled or blocked): on a machine shared
  with other jobs it shows CP's extra work without the scheduling noise in the wall times.
- **Peak memory.** Per rank, the peak during one step of the bytes torch allocated in that step and
  still live (CPU: torch.profiler memory events replayed; CUDA: max_memory_allocated above the start).
  Inputs, weights and gradient buffers exist before the step and are not counted; activations,
  masks, workspaces and communication buffers are. Worst rank of one step shown. cp=1 peaks repeat
  to the byte; with communication the peak varies between ranks and steps (up to about +-8% seen
  here, e.g. Ulysses cp2 at S=4096: 119-142 MiB over 9 steps), so compare ratios with that margin.
- **Bytes.** Bytes each rank sends to other ranks through `cp/collectives.py`, counted by
  `cp.collectives.count_comm()` in the collectives themselves (forward and backward), worst rank,
  per step. Minimum: `scripts/bench/theory.py`, each style's unavoidable traffic from first
  principles. Peers' own collectives are not counted (—).
- **Comm wait.** Share of the step a rank spends blocked in `torch.distributed` `Work.wait()` (every
  blocking wait, sync or async: transfer time plus waiting for a slower peer), mean over ranks,
  median of the instrumented rounds (CPU; GPU: NCCL kernel time not overlapped by other kernels).
"""


def _hotspot_lines(hot: dict, cells: list[dict]) -> list[str]:
    """The hotspots section: cp/ functions that cost time or memory, with their share of a step."""
    if not hot:
        return []
    lines = ["", "## Where the time and memory go (cp/ code, measured on one process)", "",
             "Single-thread measurements by `scripts/bench/hotspots.py` (medians of 5), related to the sweep above "
             "(2 ranks): the cp/ code paths behind the numbers above.", "",
             "**1. Packed documents: one fused call per document instead of a dense mask.** "
             "`ulysses._local_attention` hands the kernel one document at a time (`cp.kernels.per_document`, spans "
             "from `CPParams.document_spans`): each causal document takes the fused kernel's mask-free `is_causal` "
             "path, the work is sum(L_doc^2) instead of S^2, and no [S, S] mask is built. Before, one call over the "
             "full S built `AttnMask.dense()` (int64 [S, S] position differences, bool comparisons) and SDPA turned "
             "it into a float [S, S] additive mask, on every rank for every call. One call of "
             "cp.kernels.sdpa_attention as a cp=2 rank runs it (H/2 = 4 query heads, 1 KV head, full S), fwd+bwd:", "",
             "| S | documents | dense mask ms | per document ms | speed-up | dense mask peak MiB | per document peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for m in hot["documents"]:
        lines.append(f"| {m['seq_len']} | {m['docs']} | {m['dense_s'] * 1e3:.0f} | {m['per_doc_s'] * 1e3:.0f} | "
                     f"{m['dense_s'] / m['per_doc_s']:.1f}x | {m['dense_bytes'] / MIB:.1f} | "
                     f"{m['per_doc_bytes'] / MIB:.1f} |")
    lines += ["", "**2. The ring's pieces.** `cp.ring.RingPlan` cuts every (query run, key run) pair by document, so "
              "a piece is a diagonal of one document (the fused kernel's `is_causal` path), a piece whose keys all "
              "precede its queries (no mask), or a piece a window cuts through (the only dense mask left). "
              "`CpuFlashBlockKernel` against the raw fused op on the two common pieces (S/4 x S/4, cp=2):", "",
              "| S | piece | diagonal: block kernel / fused is_causal ms | full: block kernel / fused no mask ms | "
              "overhead |", "|---|---|---|---|---|"]
    for b in hot["block"]:
        kernel, fused = b["diag_kernel_s"] + b["full_kernel_s"], b["diag_fused_s"] + b["full_fused_s"]
        lines.append(f"| {b['seq_len']} | {b['piece']} | {b['diag_kernel_s'] * 1e3:.1f} / {b['diag_fused_s'] * 1e3:.1f} "
                     f"| {b['full_kernel_s'] * 1e3:.1f} / {b['full_fused_s'] * 1e3:.1f} | {kernel / fused - 1:+.0%} |")
    lines += ["", "**3. cptrain's cp=1 path does not copy q, k, v.** `cp.collectives.seq_to_head` at group size 1 "
              "with every head returns its input:", "", "| S | ms per attention call | bytes |", "|---|---|---|"]
    lines += [f"| {i['seq_len']} | {i['s'] * 1e3:.2f} | {i['bytes'] / MIB:.1f} MiB |" for i in hot["index"]]
    ring = [c for c in _measured(cells)
            if c["style"] == "ring" and c["peer"] is None and c["cp"] > 1 and c["bytes_min"]]
    if ring:
        c = max(ring, key=lambda c: (c["world"] == 2, c["workload"] == "model", c["seq_len"]))
        lines += ["", f"**4. Ring bytes: {c['bytes_sent'] / c['bytes_min']:.3f} x the minimum** ({c['config']}, "
                  f"{c['workload']}, S={c['seq_len']}: {c['bytes_sent'] / MIB:.1f} MiB counted vs "
                  f"{c['bytes_min'] / MIB:.1f} MiB). `cp.ring.ring_backward` keeps each owner's own dK/dV share "
                  "at home and sends the accumulator of a block only from the next rank on, R-1 hops in all (the first "
                  "run of this benchmark measured (3R-2)/(3R-3), 1.333 at R=2, when every accumulator made R hops)."]
    return lines


def _memory_sites(cells: list[dict]) -> list[str]:
    """What is live at each config's memory peak (worst rank), at the longest S of world 2."""
    rows = [c for c in _measured(cells) if c["world"] == 2 and c.get("peak_mem_top")]
    if not rows:
        return []
    table_rows = []
    for workload in ("attention", "model"):
        longest = max((c["seq_len"] for c in rows if c["workload"] == workload), default=None)
        for c in (c for c in rows if c["workload"] == workload and c["seq_len"] == longest):
            sites = "; ".join(f"{site} {size / MIB:.1f}" for site, size in c["peak_mem_top"])
            table_rows.append([f"{workload} S={longest}", c["config"], f"{c['peak_mem'] / MIB:.1f}", sites])
    return ["", "## What is live at the memory peak (worst rank, longest S, world 2)", "",
            "Allocation sites (enclosing ops, innermost first) of the bytes live at the peak, largest first, from "
            "the same profiled step as the peak column.", "",
            *markdown_table(["workload", "config", "peak MiB", "largest sites (MiB)"], table_rows)]


def _op_lines(cells: list[dict]) -> list[str]:
    """Each config's top ops by self time (rank 0, one profiled step, longest S, world 2)."""
    rows = [c for c in _measured(cells) if c["world"] == 2 and c.get("ops_rank0")]
    if not rows:
        return []
    ops = [[f"{c['workload']} S={c['seq_len']}", c["config"],
            "; ".join(f"{name.replace('aten::', '')} {ms:.0f} ({calls})" for name, ms, calls in c["ops_rank0"])]
           for c in rows]
    return ["", "## Op profile (rank 0, one profiled step, longest S, world 2)", "",
            "Self time per op (ms, number of calls) from torch.profiler; time a rank spends blocked inside an "
            "autograd Function waiting for its peer shows as that Function's self time (e.g. "
            "`LseAttentionBackward` (the ring), `_AllToAllBackward`).", "",
            *markdown_table(["workload", "config", "top ops by self time"], ops)]


def write(out: Path, meta: dict, cells: list[dict], hot: dict | None = None) -> None:
    out = Path(out)
    budget = meta["mem_budget_mib"]
    try:
        files = plots(out, cells, budget)
    except ImportError as exc:  # matplotlib is the bench extra: tables still get written
        print(f"no plots: {exc} (pip install -e '.[bench]')")
        files = []
    m, opts = meta["machine"], meta["options"]
    lines = ["# cptrain CP benchmarks", "",
             f"Generated by `{meta['command']}` on {meta['date']} in {meta['elapsed_s'] / 60:.1f} min.", "",
             f"Machine: {machine_line(m)}.",
             f"Device {opts['device']}, {opts['dtype']}, {opts['threads']} intra-op thread(s) per rank, worlds "
             f"{meta['worlds']}, {opts['repeats']} timed rounds, {opts['warmup']} warm-up, "
             f"{opts['instrumented']} instrumented."]
    if meta.get("loadavg"):
        load = meta["loadavg"]
        start, end = ("/".join(f"{x:.1f}" for x in load[k]) for k in ("start", "end"))
        lines += ["", f"Load average (1/5/15 min) at the start {start}, at the end "
                  f"{end} (the benchmark's own ranks account for about "
                  f"{max(meta['worlds'])}); anything above that is other work on the machine, which inflates wall "
                  "times and comm waits, not CPU times, bytes or memory."]
    if meta.get("note"):
        lines += ["", meta["note"]]
    kv_heads = meta["options"].get("model", {}).get("kv_heads", 2)  # bench_cp.py --model-kv-heads
    lines += ["",
              "Workloads: **attention** = one cptrain attention call fwd+bwd on random q/k/v of packed documents "
              "(random lengths in [S/16, S/2], causal), H=8, Hkv=2, D=64; **model** = a Qwen3-style decoder "
              f"(models.tiny's qwen3 widened: hidden 256, 8 heads x 64, {kv_heads} KV heads, MLP 512, 2 layers, all "
              "full attention, vocab 256), one document per row, forward + loss + backward.",
              "", "## Goals (2 ranks, longest S of each workload)", "",
              *markdown_table(["goal", "measured", "met", "where"], goals(cells))]
    skipped = {(c["config"], c["skipped"]) for c in cells if c.get("skipped")}
    if skipped:
        lines += ["", "## Peers not measured here", ""] + [f"- **{n}**: {r}" for n, r in sorted(skipped)]
    lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in files]
    for world in meta["worlds"]:
        for workload in opts["workloads"]:
            lines += ["", f"## {workload}, world {world}", ""]
            over = meta.get("world_overrides", {}).get(str(world))
            if over:
                lines += [f"World {world} runs cp={over['cps']} only, S in {over['seq_lens'][workload]}, "
                          f"{over['repeats']} timed rounds. {world} ranks share "
                          f"{meta['machine']['usable_cpus']} cores, so "
                          "wall times, throughput ratios and comm waits include time-slicing between ranks (the "
                          "CPU-time ratio does not); memory and bytes are unaffected.", ""]
            lines.append(table(cells, world, workload))
    lines += _hotspot_lines(hot or {}, cells)
    lines += _memory_sites(cells)
    lines += _op_lines(cells)
    lines += ["", "## Method", "", METHOD,
              f"Max-S plot: per config, peak memory fitted as a + b*S + c*S^2 on the measured S values (a + b*S where "
              f"only two were measured, e.g. the world-4 configs) and solved for a budget of {budget:.0f} MiB per rank: "
              "an extrapolation, the measured points are in the tables. cp=1 is the style's cp=1 baseline.",
              "", "Raw numbers: `results.json` (every round's step time, every rank's bytes and memory, the hotspot "
              "measurements)."]
    (out / "README.md").write_text("\n".join(lines) + "\n")
