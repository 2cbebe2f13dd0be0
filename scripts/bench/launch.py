"""Start the ranks: spawn N local processes, or join the ones torchrun started.

Spawned: each child gets a free TCP port, one process group (gloo on CPU, NCCL on CUDA with one
GPU per rank), then runs fn(rank, world, *args); rank 0's return value comes back. A child's
exception is re-raised in the parent with its rank and traceback; the others are then stopped.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init_rank(device: str, rank: int, world: int, timeout_s: float = 600) -> None:
    """Join the process group (env:// rendezvous) with the backend for `device`."""
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world, port, device, results, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        init_rank(device, rank, world)
        value = fn(rank, world, *args)
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world: int, device: str, *args, timeout_s: float = 3600):
    """Run fn(rank, world, *args) on `world` local ranks; return rank 0's value."""
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, device, results, args), daemon=False)
             for r in range(world)]
    for p in procs:
        p.start()
    values, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(values) < world:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}" if dead
                                       else f"benchmark ranks did not finish within {timeout_s}s") from None
                continue
            if status == "error":
                raise RuntimeError(f"benchmark rank {rank} of {world} failed:\n{payload}")
            values[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
    return values[0]
