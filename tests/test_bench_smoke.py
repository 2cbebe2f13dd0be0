"""The benchmark's quick mode end to end, and the two measurement pieces it relies on.

    test_quick_benchmark       scripts/bench_cp.py --quick (2 gloo ranks, both workloads, peers
                               measured or skipped with a reason) writes sane results and docs
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
