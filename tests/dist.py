"""Run a function on N real gloo ranks (separate processes) and re-raise a child's failure with its rank.

    results = run_distributed(worker, 2, arg1, kw=...)       # worker(rank, world_size, arg1, kw=...)
    results = run_with_own_group(target, 2, arg1)            # target(rank, arg1): the trainer makes the group

Children come from a forkserver that imported torch, transformers, hydra and the trainer once (PRELOAD): a
child is a fork of it, so a test pays for those imports once per pytest process instead of once per rank per
call (~4 s of CPU each on 2 cores). Every child is still a fresh process: it gets the parent's current
environment and working directory, a free TCP port, `world_size` ranks, one intra-op thread (2 cores here).
Its return value comes back in rank order; a child that has reported stays alive until every rank has (rank 0
hosts the rendezvous store a slower rank may still need, e.g. to build a mesh before raising the same error). If
a child raises, the parent stops the others (they may be blocked in a collective) and raises the child's
exception with "raised on rank N" and the child's traceback attached; a child that dies without reporting or
hangs past `timeout` fails the test instead of the suite.
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

# What every rank imports anyway; the forkserver imports them once (a missing one is skipped by multiprocessing).
PRELOAD = ["torch.distributed", "torch.distributed.fsdp", "transformers", "hydra", "cp", "models",
           "trainer.engine", "trainer.sft", "trainer.rl.loop", "tests.reference",
           "transformers.models.qwen3.modeling_qwen3", "transformers.models.qwen3_5.modeling_qwen3_5",
           "transformers.models.llama.modeling_llama"]


def process_context():
    """The multiprocessing context every test's ranks start from (forkserver with PRELOAD)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_parent(environ: dict, cwd: str) -> None:
    """A forked child starts with the forkserver's environment: take the calling test's, as spawn would."""
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)


def _child(fn, rank, world_size, port, results, release, own_group, parent, args, kwargs):
    as_parent(*parent)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        if own_group:  # the target builds its process group itself (init_distributed: timeout_s applies)
            value = fn(rank, *args, **kwargs)
        else:
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
        release.wait(timeout=60)  # rank 0 hosts the rendezvous store: it stays until every rank has reported
        if dist.is_initialized():
            dist.destroy_process_group()


def _run(fn, world_size: int, args, kwargs, *, timeout: float, own_group: bool) -> list:
    ctx = process_context()
    results, release = ctx.Queue(), ctx.Event()
    port = free_port()
    parent = (dict(os.environ), os.getcwd())
    procs = [ctx.Process(target=_child, daemon=True,
                         args=(fn, r, world_size, port, results, release, own_group, parent, args, kwargs))
             for r in range(world_size)]
    for p in procs:
        p.start()
    values: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.2)
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
        release.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()
    return [values[r] for r in range(world_size)]


def run_distributed(fn, world_size: int, *args, timeout: float = 300, **kwargs) -> list:
    """Run fn(rank, world_size, *args, **kwargs) on `world_size` gloo ranks; return values by rank."""
    return _run(fn, world_size, args, kwargs, timeout=timeout, own_group=False)


def run_with_own_group(target, world_size: int, *args, timeout: float = 300) -> list:
    """Run target(rank, *args) on `world_size` ranks whose process group the target (the trainer) creates from the
    environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE); return values by rank."""
    return _run(target, world_size, args, {}, timeout=timeout, own_group=True)
