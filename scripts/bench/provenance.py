"""What made a result (shared by the benchmarks): the command, the date, the machine, the code's state.

    command_line(script, argv)    "python scripts/<script> <flags>": the command that made it, for the report
    now()                         the date line ("2026-11-29 12:24 UTC")
    machine(device)               {nproc, usable_cpus, cpu, memory_gib, torch, transformers, python, ...}
        ─> machine_line(info)     its one-line description in a report
    code_state(files)             the commit, uncommitted changes under trainer/ cp/ models/, a hash per file;
                                  taken at the start and the end of a run (an edit during the run shows)

Each benchmark puts these in its results.json meta and its README's header.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository


def command_line(script: str | Path, argv: list[str] | None = None) -> str:
    """The command that ran `script` (its path relative to the working directory) with `argv` (default:
    this process's arguments)."""
    path = os.path.relpath(Path(script).resolve(), Path.cwd())
    return shlex.join(["python", path, *(sys.argv[1:] if argv is None else argv)])


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def machine(device: str = "cpu") -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu": cpu,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception:
        info["deepspeed"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(m: dict | str) -> str:
    """machine()'s description in one line (a string, as results.json files written before machine() held it,
    is returned as it is)."""
    if isinstance(m, str):
        return m
    return (f"{m['nproc']} CPUs ({m['usable_cpus']} usable), {m['cpu']}, {m['memory_gib']} GiB"
            + (f", GPU {m['gpu']}" if m.get("gpu") else "")
            + f"; torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}"
            + (f", deepspeed {m['deepspeed']}" if m.get("deepspeed") else ""))


def _git(*argv) -> str | None:
    try:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def code_state(files: tuple[str, ...], dirs: tuple[str, ...] = ("trainer", "cp", "models")) -> dict:
    """The commit and the state of the code measured: uncommitted changes under `dirs` and a hash of each of
    `files` (repository paths; compare two calls' "sha1" to see an edit made in between)."""
    status = _git("status", "--porcelain", "--", *dirs) or ""
    return {"commit": (_git("rev-parse", "--short", "HEAD") or "?").strip(),
            "uncommitted": [line[3:] for line in status.splitlines()],
            "sha1": {f: hashlib.sha1((ROOT / f).read_bytes()).hexdigest()[:12] for f in files if (ROOT / f).exists()}}
