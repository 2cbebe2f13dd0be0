"""Process-level set-up shared by the trainers: distributed init, device, seeding, clean failure.

A rank that dies leaves its peers blocked in a collective; the process group is created with
`timeout_s`, so they fail with a RuntimeError within that time, and `fail_loudly` turns it into
one clear line naming the rank and the likely cause before exiting non-zero.

Waits that are EXPECTED to be long (a slow rank still generating rollouts) go through
`patient_group(timeout_s)`: a gloo group with its own timeout, so only that wait is patient and a
dead rank still fails every other collective within `timeout_s`. Checkpoint writes and the HF export
(trainer/run/checkpoint.py) wait the same way, on a group with `checkpoint.timeout_s`. `write_atomic` is how markers and logs are replaced on disk:
a reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def init_distributed(timeout_s: int) -> tuple[int, int, torch.device]:
    """init_process_group from torchrun's environment (a single process without it). Returns (rank, world, device)."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def patient_group(timeout_s: int) -> dist.ProcessGroup:
    """A gloo group over every rank whose collectives wait up to `timeout_s` (every rank calls this, in
    the same order). Gloo runs on CPU tensors whatever the default backend (NCCL on GPU)."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`: a temporary file in the same directory, fsync, rename, fsync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for peak_memory_gb (each training step calls it first, so peak_mem_gb is the step's):
    CUDA's allocator peak; on Linux the process's peak RSS (VmHWM), reset through /proc/self/clear_refs.
    Where that file cannot be written, the CPU figure stays the process's peak so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory since reset_peak_memory: CUDA max_memory_allocated; on CPU the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # kB -> GiB
    except (OSError, StopIteration, ValueError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB: the process's peak


@contextlib.contextmanager
def fail_loudly(rank: int):
    """Exit non-zero with one clear line when a collective times out or a peer disappears."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as exc:
        text = str(exc)
        peer_gone = any(s in text.lower() for s in ("timed out", "timeout", "connection", "closed", "reset by peer",
                                                    "broken pipe"))
        if not peer_gone:
            raise
        print(f"[rank {rank}] a collective failed: another rank probably died or stalled ({text.splitlines()[0]})",
              file=sys.stderr, flush=True)
        os._exit(1)  # skip destroy_process_group: it would wait on the dead peer
