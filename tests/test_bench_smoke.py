"""The benchmark's quick mode end to end, and the two measurement pieces it relies on.

    test_quick_benchmark       scripts/bench_cp.py --quick (2 gloo ranks, both workloads, peers
                               measured or skipped with a reason) writes sane results and docs
    test_quick_dynamic_cp_...  scripts/bench_dynamic_cp.py --quick, shrunk (2 gloo ranks, the real SFT trainer in
                               every configuration): positive throughput everywhere, the same documents in every
                               configuration, plans whose degrees divide the world and that hold every token once
    test_count_comm_...        cp.collectives.count_comm counts exactly the bytes sent to other ranks
    test_exposed_time          the interval arithmetic of the GPU comm-wait measurement
"""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from cp.collectives import CommCounter, count_comm, gather_seq, head_to_seq, seq_to_head
from tests.dist import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_cp.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, f"bench_cp.py --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    plots = ("ratio_vs_seqlen.png", "memory_vs_seqlen.png", "max_seqlen_vs_cp.png")
    try:  # matplotlib is the bench extra: without it the benchmark writes tables only
        importlib.import_module("matplotlib")
        have_matplotlib = True
    except ImportError:
        have_matplotlib = False
    for name in ("README.md", "results.json") + (plots if have_matplotlib else ()):
        assert (out / name).stat().st_size > 0, f"{name} missing or empty"
    data = json.loads((out / "results.json").read_text())
    measured = [c for c in data["cells"] if not c.get("skipped")]
    assert {c["workload"] for c in measured} == {"attention", "model"}
    styles = {(c["workload"], c["style"], c["cp"]) for c in measured if c["peer"] is None}
    for workload in ("attention", "model"):
        assert {(workload, "ulysses", 2), (workload, "ring", 2), (workload, "ulysses", 1)} <= styles
    for c in measured:
        where = f"{c['workload']} S={c['seq_len']} {c['config']}"
        assert all(t > 0 and math.isfinite(t) for t in c["step_s"]), f"bad step times {c['step_s']} ({where})"
        assert c["ratio"] > 0 and math.isfinite(c["ratio"]), f"bad throughput ratio {c['ratio']} ({where})"
        assert c["peak_mem"] > 0, f"no peak memory measured ({where})"
        assert 0 <= c["comm_share"] <= 1, f"comm wait share {c['comm_share']} outside [0, 1] ({where})"
        if c["peer"] is None and c["cp"] > 1:
            sent, minimum = c["bytes_sent"], c["bytes_min"]
            assert sent >= minimum > 0, f"bytes {sent} < minimum {minimum} ({where})"
            if c["style"] == "ulysses":  # even head split: the counted bytes are exactly the minimum
                assert sent == minimum, f"Ulysses sent {sent} != {minimum} ({where})"
            assert c["comm_share"] > 0, f"a CP step that never waited on communication? ({where})"
        if c["cp"] == 1:
            assert not c["bytes_sent"], f"cp=1 sent {c['bytes_sent']} bytes ({where})"
    skipped = {c["config"]: c["skipped"] for c in data["cells"] if c.get("skipped")}
    assert "torch_cp cp2" in skipped and "fails on CPU" in skipped["torch_cp cp2"]
    assert "deepspeed cp2" in skipped or any(c["peer"] == "deepspeed" for c in measured)
    readme = (out / "README.md").read_text()
    assert "bench_cp.py --quick" in readme and "## Goals" in readme and "torch_cp cp2" in readme


def test_quick_dynamic_cp_benchmark(tmp_path):
    out = tmp_path / "dynamic_cp"
    # --quick (tiny_qwen3, world 2, 2 timed steps), shrunk further to fit a test: seq_len 1024, 100 documents a mix
    command = [sys.executable, str(ROOT / "scripts" / "bench_dynamic_cp.py"), "--quick", "--seq-len", "1024",
               "--docs", "100", "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"bench_dynamic_cp.py --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "micro-batch counts differ" not in proc.stderr, proc.stderr[-3000:]
    for name in ("README.md", "results.json"):
        assert (out / name).stat().st_size > 0, f"{name} missing or empty"
    data = json.loads((out / "results.json").read_text())
    cells, world, seq_len = data["cells"], 2, 1024
    assert [(c["mix"], c["config"]) for c in cells] == [
        ("long-tail", "static"), ("long-tail", "budget"), ("long-tail", "dynamic"), ("long-tail", "dp-only"),
        ("uniform", "static"), ("uniform", "dynamic")]
    for c in cells:
        s, steps = c["summary"], c["steps"]
        assert c["world"] == world and c["seq_len"] == seq_len and len(steps) == 2 + 2, c["key"]  # warm-up, memory
        assert all(r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]) for r in steps), c["key"]
        assert s["tokens_per_s"] > 0 and math.isfinite(s["tokens_per_s"]), c["key"]
        assert s["ratio_vs_static"] > 0 and math.isfinite(s["ratio_vs_static"]), c["key"]
        assert s["cpu_s_per_1k_tokens"] > 0 and s["step_peak_mib"] > 0, c["key"]
        assert [r["profiled"] for r in steps] == [False, False, False, True], c["key"]
        assert all(math.isfinite(r["loss"]) for r in steps), c["key"]
        # every document's tokens but its first are targets, each counted once, in every configuration alike
        assert [r["real_tokens"] for r in steps] == c["step_tokens"], c["key"]
        assert [r["loss_tokens"] for r in steps] == [t - n for t, n in zip(c["step_tokens"], c["step_docs"])]
        assert s["same_loss_tokens_as_static"] and s["first_loss_diff_vs_static"] < 1e-4, c["key"]
        if c["config"] == "static":  # fixed rows: no plan, one row per micro-batch
            assert c["plans"] is None and all(r["micro_batches"] == c["grad_accum"] for r in steps)
            continue
        budget = seq_len if c["config"] == "dp-only" else seq_len // world
        allowed = {"budget": {world}, "dp-only": {1}, "dynamic": {d for d in range(1, world + 1) if world % d == 0}}
        for plan, r in zip(c["plans"], steps):
            where = f"{c['key']} step {r['step']}"
            assert plan["micro_batches"] == r["micro_batches"] == len(plan["layout"]), where  # = sft_step's plan
            for mb in plan["layout"]:
                assert sum(degree for degree, _ in mb) == world, f"micro-batch {mb} leaves ranks out ({where})"
                for degree, tokens in mb:
                    assert degree in allowed[c["config"]] and tokens <= degree * budget, f"{degree, tokens} ({where})"
            # every token of the step's documents planned, once
            assert sum(tokens for mb in plan["layout"] for _, tokens in mb) == r["real_tokens"], where
            assert 0 < plan["fill"] <= 1 and 0 <= plan["empty_slots"] < 1, where
        assert math.isclose(sum(s["degree_frac"].values()), 1, abs_tol=1e-6), c["key"]
    goals = data["goals"]
    assert len(goals) == 3 and all(g["model"] == "tiny_qwen3" and g["world"] == world for g in goals)
    assert all(isinstance(g["met"], bool) and math.isfinite(g["value"]) for g in goals)
    readme = (out / "README.md").read_text()
    assert "bench_dynamic_cp.py --quick" in readme and "## Goals (issue 13)" in readme
    assert readme.count("| static |") == 2 and "### tiny_qwen3, long-tail, world 2" in readme


def _count_worker(rank, world):
    group = dist.group.WORLD
    x = torch.randn(1, 6, 4, 8, requires_grad=True)  # [B, S/P, H, D] fp32: 768 bytes
    y = seq_to_head(x, group)  # outside count_comm: not counted
    with count_comm() as counter:
        z = seq_to_head(x, group)  # forward: (P-1)/P of x leaves this rank
        head_to_seq(z, group).sum().backward()  # head_to_seq fwd + both backwards: 3 more of the same
        gather_seq(x.detach(), group)  # all_gather: x to each other rank
    part = x.numel() * 4 * (world - 1) // world
    assert counter.bytes == {"all_to_all": 4 * part, "p2p": 0, "all_gather": (world - 1) * x.numel() * 4}, counter
    assert counter.calls["all_to_all"] == 4 and y.shape == z.shape
    return counter.total


def test_count_comm_counts_bytes_to_other_ranks():
    assert CommCounter().total == 0
    run_distributed(_count_worker, 2)


def test_exposed_time():
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench.measure import exposed_time, interval_union

    assert interval_union([(3, 4), (0, 2), (1, 2.5)]) == [(0, 2.5), (3, 4)]
    # comm [0, 10) overlapped by compute [2, 4) and [3, 6) and [9, 12): exposed 10 - 4 - 1 = 5
    assert math.isclose(exposed_time([(0, 10)], [(2, 4), (3, 6), (9, 12)]), 5)
    assert exposed_time([(0, 1), (5, 6)], []) == 2
    assert exposed_time([(0, 1)], [(0, 1)]) == 0
