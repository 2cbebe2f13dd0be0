"""What one step costs, measured: wall time, time blocked on communication, peak memory.

    StepTimer    wall time of one step on this rank (perf_counter on CPU; CUDA events on GPU),
                 started right after a barrier so every rank starts together; also the process
                 CPU time (all its threads: compute and gloo's transfers), which other jobs on a
                 shared machine do not inflate the way they inflate wall time.
    CommWait     CPU: wall time this thread spends inside torch.distributed `Work.wait()`. Every
                 blocking wait goes through it (synchronous collectives call it internally,
                 async ones when the caller waits), so this is the time the rank could not
                 compute because data had not arrived (transfer + waiting for a slower peer).
                 Found with sys.setprofile (a C-call hook), in separate instrumented steps, so its
                 overhead never reaches the timed steps.
                 CUDA: waits do not block the CPU; the exposed communication time is the NCCL
                 kernel time not overlapped by any other kernel (torch.profiler device trace).
    PeakMemory   CPU: torch.profiler(profile_memory=True) reports every CPU allocation and free;
                 replaying them gives the peak of the bytes allocated during the step and still
                 live: the step's peak memory above what was live at its start (activations,
                 workspaces, masks, communication buffers; not the weights, inputs or the
                 gradient buffers, which exist before the step).
                 CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() at the start.
    median_se    the spread of repeated measurements: a robust standard error of their median (MAD based).

Shared by the benchmarks (bench_cp.py's sweep, bench_memory.py, bench_dynamic_cp.py).
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

_WORK_WAIT = getattr(dist.Work.wait, "__func__", dist.Work.wait)  # the one C function every Work's wait() calls


def barrier(device: torch.device) -> None:
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
        torch.cuda.synchronize(device)
    else:
        dist.barrier()


class StepTimer:
    """`with StepTimer(device) as t: step()` -> t.seconds (this rank's wall time for the step)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.cpu_seconds = device, float("nan"), float("nan")

    def __enter__(self):
        barrier(self.device)
        self._cpu_start = time.process_time()
        if self.device.type == "cuda":
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            self._events[0].record()
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self._events[1].record()
            self._events[1].synchronize()
            self.seconds = self._events[0].elapsed_time(self._events[1]) / 1e3
        else:
            self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu_start
        return False


class CommWait:
    """Seconds this thread spends blocked in torch.distributed Work.wait() inside the block (CPU)."""

    def __init__(self):
        self.seconds, self.waits, self._start = 0.0, 0, None

    def _hook(self, frame, event, arg):
        if arg is not _WORK_WAIT:
            return
        if event == "c_call":
            self._start = time.perf_counter()
        elif self._start is not None:  # c_return or c_exception
            self.seconds += time.perf_counter() - self._start
            self.waits += 1
            self._start = None

    def __enter__(self):
        self._previous = sys.getprofile()
        sys.setprofile(self._hook)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self._previous)
        return False


def median_se(values: list[float]) -> float:
    """A robust standard error of the median: 1.4826 x MAD x 1.25 / sqrt(n) (0 for fewer than 2 values)."""
    if len(values) < 2:
        return 0.0
    med = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - med) for v in values) * 1.25 / len(values) ** 0.5


def interval_union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, merged [start, end) intervals."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def exposed_time(comm: list[tuple[float, float]], compute: list[tuple[float, float]]) -> float:
    """Length of the union of `comm` intervals not covered by any `compute` interval."""
    comm, compute = interval_union(comm), interval_union(compute)
    exposed, j = 0.0, 0
    for start, end in comm:
        covered = 0.0
        while j < len(compute) and compute[j][1] <= start:
            j += 1
        k = j
        while k < len(compute) and compute[k][0] < end:
            covered += min(end, compute[k][1]) - max(start, compute[k][0])
            k += 1
        exposed += (end - start) - covered
    return exposed


@contextmanager
def cuda_exposed_comm(result: dict):
    """GPU: result["seconds"] = NCCL kernel time not overlapped by other kernels inside the block."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield result
    kernels = [(e.name(), e.start_ns() / 1e9, (e.start_ns() + e.duration_ns()) / 1e9)
               for e in prof.profiler.kineto_results.events() if e.device_type() == DeviceType.CUDA]
    comm = [(a, b) for name, a, b in kernels if "nccl" in name.lower()]
    compute = [(a, b) for name, a, b in kernels if "nccl" not in name.lower()]
    result["seconds"] = exposed_time(comm, compute)
    result["waits"] = len(comm)


class PeakMemory:
    """`with PeakMemory(device) as m: step()` -> m.bytes, the peak allocated above the start;
    m.top (CPU): [(allocation site, bytes)] of the largest groups live at the peak."""

    def __init__(self, device: torch.device):
        self.device, self.bytes, self.top = device, 0, []

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return False
        self._prof.__exit__(*exc)
        self.bytes, self.top = _peak_allocated(self._prof)
        return False


_GENERIC = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::zeros", "aten::zeros_like",
            "aten::new_empty", "aten::new_zeros", "aten::full", "aten::clone", "aten::contiguous", "aten::to",
            "aten::_to_copy"}


def _site(node, depth: int = 2) -> str:
    """Where an allocation happened: its enclosing ops / autograd functions (generic allocation ops
    skipped), innermost first, e.g. "repeat_interleave < LseAttention"."""
    names, parent = [], node.parent
    while parent is not None and len(names) < depth:
        if parent.name not in _GENERIC:
            names.append(parent.name.replace("autograd::engine::evaluate_function: ", "bwd ").replace("aten::", ""))
        parent = parent.parent
    return " < ".join(names) or "(outside any op)"


def _peak_allocated(prof, top: int = 6) -> tuple[int, list[tuple[str, int]]]:
    """Peak of the bytes allocated inside the profiled block and still live (CPU), and the largest
    allocation sites live at that moment.

    Replays the allocation events in time order, counting only blocks allocated inside the block
    (frees of older blocks are ignored), so the result does not depend on what earlier steps left.
    """
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr, node))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    live, current, peak, peak_index = {}, 0, 0, -1
    for i, (_, size, ptr, _) in enumerate(events):
        if size > 0:
            live[ptr] = size
            current += size
            if current > peak:
                peak, peak_index = current, i
        elif ptr in live:
            current -= live.pop(ptr)
    at_peak: dict[int, tuple[int, object]] = {}
    for _, size, ptr, node in events[:peak_index + 1]:
        if size > 0:
            at_peak[ptr] = (size, node)
        else:
            at_peak.pop(ptr, None)
    sites: dict[str, int] = {}
    for size, node in at_peak.values():
        sites[_site(node)] = sites.get(_site(node), 0) + size
    return peak, sorted(sites.items(), key=lambda kv: -kv[1])[:top]
