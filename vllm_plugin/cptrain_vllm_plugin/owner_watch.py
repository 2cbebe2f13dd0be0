"""The owned server outlives no trainer: a watchdog thread in the API server process (the one whose parent is the
trainer rank that started it, CPTRAIN_OWNER_PID) kills the server's whole process group once that parent is gone.

Why: SIGKILL of the trainer (a preemption) reaches the server as SIGTERM through PR_SET_PDEATHSIG, but vLLM 0.32's
API server can then hang in uvicorn's shutdown ("Waiting for background tasks to complete") with its engine
already killed (measured: still alive minutes later). The watchdog gives the graceful path GRACE_S, then SIGKILLs
the group (the server was started as its own session: its group is the server and nothing else).
"""

import os
import signal
import threading
import time

GRACE_S = 10.0  # the graceful shutdown's time before the group is killed
POLL_S = 0.5
_started = False


def watch_owner() -> None:
    """Start the watchdog in this process if it is the owned server's API server (idempotent)."""
    global _started
    owner = os.environ.get("CPTRAIN_OWNER_PID")
    if _started or not owner or os.getppid() != int(owner):
        return
    _started = True
    threading.Thread(target=_watch, args=(int(owner),), name="cptrain-owner-watch", daemon=True).start()
    print(f"cptrain: owner watchdog on: this server dies {GRACE_S:.0f} s after trainer pid {owner}", flush=True)


def _watch(owner: int) -> None:
    while os.getppid() == owner:
        time.sleep(POLL_S)
    time.sleep(GRACE_S)
    os.killpg(os.getpgrp(), signal.SIGKILL)
