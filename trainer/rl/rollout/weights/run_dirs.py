"""Directories private to one run (mode 0700), named after the process that made them, so the next run removes
those a killed run left behind.

    private_run_dir(parent, kind)   remove parent/cptrain-<kind>-<pid>-<start>-* of processes that are gone, then
                                    mkdtemp parent/cptrain-<kind>-<this pid>-<this start>-XXXX (0700: this user only)

A SIGKILLed run cannot clean up: its weight buckets would hold shared memory (/dev/shm) until reboot. A pid is
reused, so a directory belongs to a live run only if the pid's start time matches too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def process_identity(pid: int) -> str | None:
    """'<pid>-<start time>' of a live process (start time in clock ticks since boot: a reused pid differs), or
    None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return f"{pid}-{fields[19]}"  # field 22 of stat, counted after the ")" that ends the command name


def remove_dead_runs(parent: str, kind: str) -> list[str]:
    """Remove parent's cptrain-<kind>-<pid>-<start>-* directories whose process is gone; a live run's are kept."""
    removed = []
    for directory in Path(parent).glob(f"cptrain-{kind}-*-*-*"):
        pid, start = directory.name[len(f"cptrain-{kind}-"):].split("-")[:2]
        if pid.isdigit() and process_identity(int(pid)) != f"{pid}-{start}":
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(str(directory))
    return removed


def private_run_dir(parent: str, kind: str) -> Path:
    """A new 0700 directory under parent for this run's `kind` of files (dead runs' ones removed first)."""
    remove_dead_runs(parent, kind)
    owner = process_identity(os.getpid()) or f"{os.getpid()}-0"  # in the name: remove_dead_runs reads it
    return Path(tempfile.mkdtemp(prefix=f"cptrain-{kind}-{owner}-", dir=parent))
