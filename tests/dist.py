"""Run a function on N real gloo ranks (spawned processes) and re-raise a child's failure with its rank.

    results = run_distributed(worker, world_size=2, arg1, kw=...)   # worker(rank, world_size, arg1, kw=...)

Each child: free TCP port, gloo process group of `world_size`, one intra-op thread (2 cores here),
then `worker(...)`. Its return value comes back in rank order. If a child raises, the parent
stops the others (they may be blocked in a collective) and raises the child's exception with
"raised on rank N" and the child's traceback attached; a child that hangs past `timeout` fails
the test instead of the suite.
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, results, args, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        value = fn(rank, world_size, *args, **kwargs)
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException as exc:  # report everything, including assertion failures
        try:
            payload = pickle.dumps(exc)
        except Exception:
            payload = None
        results.put((rank, "error", (payload, traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300, **kwargs) -> list:
    """Run fn(rank, world_size, *args, **kwargs) on `world_size` gloo ranks; return values by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, results, args, kwargs), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    values: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(values))} did not finish "
                                       f"within {timeout}s (hung collective?)") from None
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                                       "without reporting")
                continue
            if status == "error":
                exc_bytes, tb = payload
                exc = pickle.loads(exc_bytes) if exc_bytes is not None else RuntimeError("unpicklable exception")
                exc.add_note(f"raised on rank {rank} of {world_size}; child traceback:\n{tb}")
                raise exc
            values[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()
    return [values[r] for r in range(world_size)]
