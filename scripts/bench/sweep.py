"""One rank's sweep: build every config's Runner, then per workload and sequence length measure
them side by side. Runs on every rank; rank 0 returns the cells.

Per (workload, S), with all configs prepared:
    warm-up     `warmup` steps of each config
    timed       `repeats` rounds; each round runs every config once, the order rotated by one
                per round (so drift and neighbours hit every config alike). A step's time is the
                slowest rank's; ratio vs cp=1 = median over rounds of t_cp1 / t_config (equal
                tokens per step, so this is the throughput ratio).
    instrumented `instrumented` rounds with bytes counted (cp.collectives.count_comm) and time
                blocked on communication measured (measure.CommWait / cuda_exposed_comm)
    memory      one step of each config under measure.PeakMemory
    ops         (longest S only) one torch.profiler step of each config: its top ops by self time
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import cp
from bench import peers, theory
from bench.measure import CommWait, PeakMemory, StepTimer, barrier, cuda_exposed_comm
from bench.workloads import AttentionRunner, AttentionShape, Config, ModelRunner, model_config
from cp.collectives import count_comm


@dataclass
class Options:
    """Everything a rank needs (picklable)."""

    device: str = "cpu"
    dtype: str = "float32"
    workloads: list[str] = field(default_factory=lambda: ["attention", "model"])
    seq_lens: dict[str, list[int]] = field(default_factory=dict)
    cps: list[int] | None = None  # None: every divisor > 1 of the world size
    repeats: int = 5
    warmup: int = 1
    instrumented: int = 2
    peers: list[str] = field(default_factory=lambda: ["deepspeed", "torch_cp"])
    threads: int = 1
    attention_shape: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    ulysses_chunks: list[int] = field(default_factory=list)  # model workload: Ulysses with chunks=n too


REFERENCE = {"attention": "cp1 sdpa", "model": "cp1 hf"}  # "cp=1" of the ratios: what runs without CP


def plan_configs(world: int, workload: str, opts: Options, heads: int, kv_heads: int) -> list[Config]:
    """cp=1 baselines, then each style at each cp degree (model workload: Ulysses also at each of
    opts.ulysses_chunks its heads allow), then peers (model workload, cp = world)."""
    configs = [Config("cp1 hf", "ulysses", 1, peer="hf", baseline="cp1 hf")] if workload == "model" else []
    configs += [Config("cp1 sdpa", "ulysses", 1), Config("cp1 block", "ring", 1, baseline="cp1 block")]
    cps = opts.cps or [c for c in range(2, world + 1) if world % c == 0]
    for c in cps:
        if c <= heads:
            configs.append(Config(f"ulysses cp{c}", "ulysses", c))
            configs += [Config(f"ulysses cp{c} chunks{n}", "ulysses", c, chunks=n) for n in opts.ulysses_chunks
                        if workload == "model" and 1 < n <= kv_heads and heads // n >= c]
        configs.append(Config(f"ring cp{c}", "ring", c, baseline="cp1 block"))
        for u in range(2, c):
            if c % u == 0 and u <= heads:
                configs.append(Config(f"hybrid cp{c} ({c // u}x{u})", "hybrid", c, ulysses=u, baseline="cp1 block"))
    if workload == "model":
        for peer in opts.peers:
            configs.append(Config(f"{peer} cp{world}", "ulysses" if peer == "deepspeed" else "ring", world, peer=peer,
                                  baseline="cp1 hf"))
    return configs


class _Dims:
    """ParallelDims built once per (style, cp, ulysses) on this rank (mesh building is collective)."""

    def __init__(self, world: int, device_type: str):
        self.world, self.device_type, self._built = world, device_type, {}

    def get(self, config: Config) -> cp.ParallelDims:
        key = (config.style, config.cp, config.ulysses)
        if key not in self._built:
            dims = cp.ParallelDims(world_size=self.world, cp=config.cp, cp_style=config.style,
                                   cp_ulysses=config.ulysses)
            dims.build(self.device_type)
            self._built[key] = dims
        return self._built[key]


def _agree(reason: str | None) -> str | None:
    """Every rank's skip reason -> the first one (all ranks skip together)."""
    reasons = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r), None)


def _make_runners(workload: str, configs: list[Config], dims: _Dims, opts: Options, device, dtype):
    """{name: runner} for the configs that run here, and {name: reason} for the skipped ones."""
    runners, skipped = {}, {}
    model_cfg = model_config(**opts.model) if workload == "model" else None
    for config in configs:
        reason = None
        if config.peer == "deepspeed":
            reason = peers.deepspeed_missing()
        elif config.peer == "torch_cp" and device.type == "cpu":
            reason = peers.try_torch_cp_on_cpu(model_cfg, config.cp)
            reason = None if reason is None else f"fails on CPU (tried one step here): {reason}"
        reason = _agree(reason)
        if reason:
            skipped[config.name] = reason
            continue
        if config.peer == "deepspeed":
            runners[config.name] = peers.DeepSpeedRunner(config, model_cfg, device, dtype)
        elif config.peer == "torch_cp":
            runners[config.name] = peers.TorchCPRunner(config, model_cfg, device, dtype)
        elif workload == "attention":  # (peer "hf" only exists for the model workload)
            runners[config.name] = AttentionRunner(config, dims.get(config), AttentionShape(**opts.attention_shape),
                                                   device, dtype)
        else:
            runners[config.name] = ModelRunner(config, dims.get(config), model_cfg, device, dtype)
    return runners, skipped, model_cfg


def _min_bytes(config: Config, runner, seq_len: int, shape: tuple[int, int, int], elem: int) -> int | None:
    """This rank's minimum bytes per step for its style (None for peers: their bytes are not counted)."""
    if config.cp == 1:
        return 0
    if config.peer is not None:
        return None
    heads, kv_heads, dim = shape
    per_call = theory.min_bytes(config.style, tokens=seq_len, cp=config.cp, ulysses=config.ulysses_degree,
                                rank=runner.dims.cp_rank, heads=heads, kv_heads=kv_heads, dim=dim, elem=elem)
    return per_call * runner.attention_calls()


def _instrumented_step(runner, device) -> dict:
    """One step with bytes counted and communication waits timed (backward on this thread)."""
    with torch.autograd.set_multithreading_enabled(False), count_comm() as counter:
        if device.type == "cuda":
            exposed: dict = {}
            with cuda_exposed_comm(exposed), StepTimer(device) as timer:
                runner.step()
            wait_s = exposed["seconds"]
        else:
            with StepTimer(device) as timer, CommWait() as wait:
                runner.step()
            wait_s = wait.seconds
    return {"bytes": counter.total, "bytes_by_kind": dict(counter.bytes), "wait_s": wait_s, "step_s": timer.seconds}


def _gather(value):
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _op_profile(runner, device, top: int = 8) -> list[tuple[str, float, int]]:
    """One profiled step: the ops with the most self time on this rank, as (op, ms, calls)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        runner.step()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda e: -getattr(e, attr))[:top]
    return [(e.key, getattr(e, attr) / 1e3, e.count) for e in ops]


def measure_group(runners: dict, order: list[str], opts: Options, device, profile_ops: bool = False) -> dict[str, dict]:
    """Measure every runner (already prepared) side by side. Returns per-config raw measurements
    (profile_ops: also one torch.profiler step per config, its top ops by self time)."""
    for _ in range(opts.warmup):
        for name in order:
            barrier(device)
            runners[name].step()
    times, cpu_times = {name: [] for name in order}, {name: [] for name in order}
    for rep in range(opts.repeats):
        rotated = order[rep % len(order):] + order[:rep % len(order)]
        for name in rotated:
            with StepTimer(device) as timer:
                runners[name].step()
            times[name].append(timer.seconds)
            cpu_times[name].append(timer.cpu_seconds)
    instrumented = {name: [] for name in order}
    for _ in range(opts.instrumented):
        for name in order:
            barrier(device)
            instrumented[name].append(_instrumented_step(runners[name], device))
    memory, memory_top = {}, {}
    for name in order:
        barrier(device)
        with PeakMemory(device) as peak:
            runners[name].step()
        memory[name], memory_top[name] = peak.bytes, peak.top
    ops = {}
    for name in order if profile_ops else ():
        barrier(device)
        ops[name] = _op_profile(runners[name], device)
    return {name: {"times": times[name], "cpu_times": cpu_times[name], "instrumented": instrumented[name],
                   "memory": memory[name], "memory_top": memory_top[name], "ops": ops.get(name)} for name in order}


def step_times(per_rank: list[dict]) -> tuple[list[float], list[float]]:
    """Per round: the slowest rank's wall time, and the CPU time summed over ranks."""
    rounds = range(len(per_rank[0]["times"]))
    return ([max(r["times"][i] for r in per_rank) for i in rounds],
            [sum(r["cpu_times"][i] for r in per_rank) for i in rounds])


def _cell(config: Config, world: int, workload: str, seq_len: int, per_rank: list[dict], base: list[dict] | None,
          same_kernel: list[dict] | None) -> dict:
    """Combine the ranks' raw measurements of one config into a table row (base: the cp1 config's ranks)."""
    step, cpu = step_times(per_rank)
    ratio = lambda ref: None if ref is None else statistics.median(a / b for a, b in zip(step_times(ref)[0], step))
    base_step = None if base is None else step_times(base)[0]
    shares = [statistics.median(i["wait_s"] / i["step_s"] for i in r["instrumented"]) for r in per_rank]
    waits = [statistics.median(i["wait_s"] for i in r["instrumented"]) for r in per_rank]
    sent = [r["instrumented"][0]["bytes"] for r in per_rank]
    uncounted = config.peer is not None and config.cp > 1  # peers' own collectives are not counted
    mins = [r["min_bytes"] for r in per_rank]
    return {
        "world": world, "workload": workload, "seq_len": seq_len, "config": config.name, "style": config.style,
        "cp": config.cp, "ulysses": config.ulysses_degree, "ring": config.ring, "chunks": config.chunks, "peer": config.peer,
        "baseline": config.baseline, "tokens_per_step": world * seq_len, "step_s": step,
        "median_s": statistics.median(step), "ratio": ratio(base), "ratio_same_kernel": ratio(same_kernel),
        "ratio_range": None if base is None else [min(a / b for a, b in zip(base_step, step)),
                                                  max(a / b for a, b in zip(base_step, step))],
        "cpu_s": cpu, "cpu_ratio": None if base is None else statistics.median(
            a / b for a, b in zip(step_times(base)[1], cpu)),
        "peak_mem": max(r["memory"] for r in per_rank), "peak_mem_per_rank": [r["memory"] for r in per_rank],
        "peak_mem_top": max(per_rank, key=lambda r: r["memory"])["memory_top"],  # the worst rank's largest sites
        "ops_rank0": per_rank[0]["ops"],  # rank 0's top ops by self time in one profiled step (longest S only)
        "bytes_sent": None if uncounted else max(sent), "bytes_sent_per_rank": None if uncounted else sent,
        "bytes_by_kind": None if uncounted else per_rank[0]["instrumented"][0]["bytes_by_kind"],
        "bytes_min": None if uncounted else max(mins), "comm_share": statistics.mean(shares),
        "comm_wait_s": statistics.mean(waits), "skipped": None,
    }


def run_rank(rank: int, world: int, opts: Options) -> list[dict] | None:
    """The whole sweep on this rank; rank 0 returns the cells (measured and skipped)."""
    device = torch.device(opts.device, torch.cuda.current_device()) if opts.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, opts.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    torch.set_num_threads(opts.threads)
    dims, cells = _Dims(world, device.type), []
    for workload in opts.workloads:
        shape_src = AttentionShape(**opts.attention_shape) if workload == "attention" else model_config(**opts.model)
        shape = ((shape_src.heads, shape_src.kv_heads, shape_src.head_dim) if workload == "attention" else
                 (shape_src.num_attention_heads, shape_src.num_key_value_heads, shape_src.head_dim))
        configs = plan_configs(world, workload, opts, heads=shape[0], kv_heads=shape[1])
        runners, skipped, _ = _make_runners(workload, configs, dims, opts, device, dtype)
        order = [c.name for c in configs if c.name in runners]
        by_name = {c.name: c for c in configs}
        for seq_len in opts.seq_lens[workload]:
            for name in order:
                runners[name].prepare(seq_len)
            raw = measure_group(runners, order, opts, device, profile_ops=seq_len == max(opts.seq_lens[workload]))
            for name in order:
                raw[name]["min_bytes"] = _min_bytes(by_name[name], runners[name], seq_len, shape, elem)
            gathered = _gather(raw)
            for name in order:
                runners[name].release()
            if rank == 0:
                per_config = {name: [g[name] for g in gathered] for name in order}
                for name in order:
                    config = by_name[name]
                    cells.append(_cell(config, world, workload, seq_len, per_config[name],
                                       per_config.get(REFERENCE[workload]), per_config.get(config.baseline)))
                for name, reason in skipped.items():
                    config = by_name[name]
                    cells.append({"world": world, "workload": workload, "seq_len": seq_len, "config": name,
                                  "style": config.style, "cp": config.cp, "peer": config.peer, "skipped": reason})
                done = [c for c in cells if c["seq_len"] == seq_len and c["workload"] == workload and not c["skipped"]]
                print(f"[world {world}] {workload} S={seq_len}: " + ", ".join(
                    f"{c['config']} {c['median_s'] * 1e3:.0f} ms x{c['ratio']:.2f}" for c in done), flush=True)
    return cells if rank == 0 else None
