"""Rank 0 acts, every rank learns the outcome: the result, or the same error.

    rank 0:        value = action()            (an exception becomes its message)
    other ranks:   others()                    (their part of any collective the action runs; default nothing)
    every rank:    broadcast {value | error} from rank 0 -> return value, or raise error_type(prefix + message)

Without it a failure on rank 0 (a server that does not start, a transfer that fails, a bad resume directory)
leaves the other ranks waiting in their next collective until the process-group timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def rank_zero_outcome(action: Callable[[], T], *, others: Callable[[], object] | None = None, group=None,
                      error_type: type[Exception] = RuntimeError, prefix: str = "") -> T:
    """`action` runs on rank 0 only (its value must pickle); every rank returns it or raises rank 0's error."""
    outcome, cause = [None], None
    if dist.get_rank() == 0:
        try:
            outcome = [{"value": action()}]
        except Exception as exc:
            cause = exc
            message = str(exc) if isinstance(exc, error_type) else f"{type(exc).__name__}: {exc}"
            outcome = [{"error": message}]
    elif others is not None:
        others()
    dist.broadcast_object_list(outcome, src=0, group=group)
    if "error" in outcome[0]:
        raise error_type(prefix + outcome[0]["error"]) from cause
    return outcome[0]["value"]
