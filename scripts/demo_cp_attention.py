"""Demo: context-parallel attention on N ranks equals attention on one rank, forward and backward.

    torchrun --nproc-per-node 2 scripts/demo_cp_attention.py [--seq-len 2048] [--styles ulysses]

Every rank builds the same packed batch (random documents, a window, sinks, GQA), runs each CP
style on its shard, gathers the output and compares it (and dq/dk/dv) with the same attention
computed on the full sequence without CP. Prints one line per style.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.distributed as dist

import cp

ATTENTION = {"ulysses": cp.ulysses_attention, "ring": cp.ring_attention, "hybrid": cp.hybrid_attention}


def random_docs(total: int, rng: random.Random) -> list[int]:
    lens = []
    while sum(lens) < total:
        lens.append(min(rng.randint(1, total // 2), total - sum(lens)))
    return lens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=768, help="sliding window (global positions)")
    parser.add_argument("--styles", nargs="+", default=list(ATTENTION), choices=list(ATTENTION))
    args = parser.parse_args()

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    S, H, Hkv, D = args.seq_len, args.heads, args.kv_heads, args.head_dim
    q, proj = (torch.randn(1, S, H, D, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, S, Hkv, D, generator=gen) for _ in range(2))
    sinks = torch.randn(H, generator=gen)
    lens = [random_docs(S, random.Random(0))]
    kwargs = dict(causal=True, window=args.window, sinks=sinks)

    # cp = 1: the same attention on the full sequence, one rank
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref_batch = cp.setup_cp_params(torch.zeros(1, S, dtype=torch.long), seq_lens=lens)
    ref = cp.ulysses_attention(qr, kr, vr, ref_batch.params, **kwargs)
    (ref * proj).sum().backward()

    if rank == 0:
        print(f"world={world} S={S} H={H} kv_heads={Hkv} D={D} window={args.window} docs={len(lens[0])} "
              f"(lengths {lens[0][:6]}{'...' if len(lens[0]) > 6 else ''})")
    for style in args.styles:
        cp_ulysses = (2 if world % 2 == 0 and world >= 4 else 1) if style == "hybrid" else None
        dims = cp.ParallelDims(world_size=world, cp=world, cp_style=style, cp_ulysses=cp_ulysses)
        dims.build()
        batch = cp.setup_cp_params(torch.zeros(1, S, dtype=torch.long), dims, seq_lens=lens)
        p = batch.params
        ql, kl, vl = (cp.shard(t, p).requires_grad_() for t in (q, k, v))
        start = time.perf_counter()
        out = ATTENTION[style](ql, kl, vl, p, **kwargs)
        full = cp.unshard(out, p)
        (full * proj).sum().backward()
        elapsed = time.perf_counter() - start
        errs = [(full - ref).abs().max()] + [(g - cp.shard(r.grad, p)).abs().max()
                                              for g, r in ((ql.grad, qr), (kl.grad, kr), (vl.grad, vr))]
        errs = torch.stack(errs)
        dist.all_reduce(errs, op=dist.ReduceOp.MAX)
        if rank == 0:
            ok = "OK" if errs.max() < 1e-4 else "MISMATCH"
            shape = f"{dims.ring}x{dims.ulysses}" if style == "hybrid" else str(world)
            print(f"{style:8s} cp={shape}: max|out-ref|={errs[0]:.2e} max|dq|={errs[1]:.2e} max|dk|={errs[2]:.2e} "
                  f"max|dv|={errs[3]:.2e}  fwd+bwd {elapsed * 1e3:.0f} ms  {ok}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
