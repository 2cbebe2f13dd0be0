"""The `vllm` rollout engine: vLLM servers generate, the trainer ranks hold no model copy.

    startup (rollout.vllm.urls empty): rank 0 starts and owns one server (trainer/rl/rollout/vllm_server.py) on
        model.name's weights (a tiny:* model: its initial weights exported first), in the vLLM venv, listening on
        a Unix socket in a private directory (TCP only with rollout.vllm.expose_control_plane=true); every rank
        learns its URL (or the startup error) through a broadcast; stopped at the end, on failure, on SIGTERM
    startup (rollout.vllm.urls=[...]): existing servers, started by the user with the flags ServerSpec.command
        lists (data-parallel inference: one server per GPU or node); none is owned
    sync(policy, version):   weights.sync_policy: FSDP2 shards gathered bucket by bucket, rank 0 streams them
                             through vLLM's weight-transfer protocol to every server, version = optimizer steps,
                             through the run's private (0700) directory in rollout.vllm.sync_dir;
                             LoRA (rollout.vllm.lora_sync=adapter): weights.sync_adapters, the adapters only,
                             loaded as adapter cptrain-<run>-v<version> (vLLM's LoRA: --enable-lora; <run>: a token
                             of this run); requests name it
    sample(prompts, s, routes):  every prompt of this rank in flight at once (one request per prompt, n samples,
                             a seed per prompt), on server routes[i] % servers (an episode's turns share its
                             prompt's route: its prefix stays in one server's cache; default: the global prompt
                             index); vLLM batches concurrent requests (continuous batching)
        -> Completion(token ids, the server's log-prob of each token at T, version, newest, token_versions): from
           the weight version spans the server returns, the version of the first token and, when a sync overlapped
           the request (async GRPO), of the last and of each token; the synchronous loop refuses anything but its
           own version
    step_metrics():          rank 0: the servers' prefix-cache hit rate since the last call (their /metrics)
    greedy(prompts):         temperature 0, same path

Prefix cache: vLLM keeps the KV blocks of earlier prompts across a weight update (its weight transfer does not
reset them), so a prompt sharing a prefix with one sampled before the sync (a system prompt, a repeated eval
prompt, an earlier turn) would be continued from KV the old weights computed. Every request carries the weight
version (and this run's token) as its cache salt: prefixes are shared among requests of the same weights only.

Log-probs: the server runs --logprobs-mode processed_logprobs, the log-prob under the distribution it sampled
(temperature T; top_p < 1 truncated), which the trainer compares with its own (trainer/rl/logprob_mismatch.py).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.rl.rollout.base import Completion, RolloutEngine, SamplingSettings, cut_at_end, stop_token_ids
from trainer.rl.rollout.vllm_client import VLLMClient, VLLMError, prometheus_total
from trainer.rl.rollout.vllm_server import ServerSpec, VLLMServer, install_termination_handler, resolve_python
from trainer.rl.rollout.weights.adapter_transport import AdapterSender
from trainer.rl.rollout.weights.file_transport import FileWeightSender
from trainer.rl.rollout.weights.run_dirs import private_run_dir
from trainer.rl.rollout.weights.sync import default_sync_dir, sync_adapters, sync_policy
from trainer.run.rank_zero import rank_zero_outcome

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def cpu_thread_env() -> dict[str, str]:
    """On a host without CUDA: the server's OpenMP threads on every core this process may use (vLLM's default
    reserves one core and binds one), since the synchronous loop's trainer ranks wait while it generates."""
    if torch.cuda.is_available():
        return {}
    cores = sorted(os.sched_getaffinity(0))
    spec = f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0], cores[-1] + 1)) else ",".join(map(str, cores))
    return {"VLLM_CPU_OMP_THREADS_BIND": spec, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def _completion(choice: dict, stop_ids, adapter_version: int | None = None) -> Completion:
    """One choice of /inference/v1/generate -> Completion; its version from the server's spans (the base weights'
    version), or with LoRA adapters the version of the adapter the request named (every token: a request keeps
    its adapter). Every kept token must lie in a span with a numeric version: a token the server does not
    attribute (no spans, a gap, a never-synced "default" version) is an error, never given a version it may not
    have had (the version check and the async lag are only as true as the spans)."""
    tokens = choice["token_ids"]
    logprobs = [entry["logprob"] for entry in (choice.get("logprobs") or {}).get("content") or []]
    if len(logprobs) != len(tokens):
        raise VLLMError(f"the server returned {len(tokens)} tokens but {len(logprobs)} log-probs")
    kept = cut_at_end(tokens, stop_ids)
    if adapter_version is not None:
        return Completion(kept, logprobs[:len(kept)], adapter_version)
    spans = sorted((span["start"], span["end"], span["version"]) for span in choice.get("weight_versions") or []
                   if span["end"] > span["start"] and span["start"] < len(kept))  # the kept tokens' spans
    covered, versions, per_token = 0, [], []
    for start, end, version in spans:
        if start > covered or not str(version).lstrip("-").isdigit():
            break
        per_token += [int(version)] * (min(end, len(kept)) - len(per_token))
        covered, versions = max(covered, end), versions + [int(version)]
    if covered < len(kept):
        raise VLLMError(f"the server attributed {covered} of a completion's {len(kept)} tokens to a weight version "
                        f"(spans {spans}): a vLLM server run by cptrain (scripts/install_vllm.sh, the flags "
                        "ServerSpec.command lists) returns spans over every token, each with the version synced")
    if not kept:
        raise VLLMError("the server returned an empty completion (no token, not even the end of turn)")
    changed = len(set(versions)) > 1
    return Completion(kept, logprobs[:len(kept)], versions[0], versions[-1] if changed else None,
                      per_token[:len(kept)] if changed else None)


class VLLMRolloutEngine(RolloutEngine):
    def __init__(self, vcfg, *, model_path: str, tokenizer, dtype: torch.dtype, max_model_len: int, seed: int,
                 log_dir: str, patient_group=None, lora_rank: int | None = None, keep_adapters: int = 2):
        """vcfg: cfg.rollout.vllm; model_path: an HF directory or hub id the servers start from (architecture,
        initial weights); patient_group: a gloo group whose timeout covers the server's startup. lora_rank: LoRA
        with rollout.vllm.lora_sync=adapter (the server holds the base, each weight version is an adapter, the
        `keep_adapters` newest stay loaded)."""
        install_termination_handler()
        self.vcfg, self.dtype, self.group = vcfg, dtype, patient_group
        self.lora_rank, self.keep_adapters = lora_rank, keep_adapters
        self.adapter: tuple[str, int] | None = None  # (name, version) of the newest adapter on the servers
        self.broken: str | None = None  # why the servers may not be sampled from (a failed sync)
        self.base_synced = False  # LoRA: the frozen base goes to the servers once (whatever they were started on)
        self.stop_ids = stop_token_ids(tokenizer)
        self.server: VLLMServer | None = None
        self.sender: FileWeightSender | None = None  # rank 0: full weights
        self.adapter_sender: AdapterSender | None = None  # rank 0: LoRA adapters
        self.sync_dir: str | None = None  # rank 0: the run's private directory in rollout.vllm.sync_dir
        self.rank = dist.get_rank()
        urls = list(vcfg.urls) if vcfg.urls else [rank_zero_outcome(
            lambda: self._start_owned_server(model_path, max_model_len, seed, log_dir), group=self.group)]
        self.clients = [self.server.client(vcfg.request_timeout_s) if self.server and u == self.server.url
                        else VLLMClient(u, timeout_s=vcfg.request_timeout_s) for u in urls]
        if vcfg.urls:
            wait_all_healthy(self.clients, vcfg.startup_timeout_s)
        self.run = rank_zero_outcome(self._open_transports, group=self.group)  # adapter names, cache salts
        self.cache_counters = [0.0, 0.0]  # the servers' prefix-cache (queries, hits) at the last step_metrics
        self.pool = ThreadPoolExecutor(max_workers=max(1, vcfg.max_concurrent_requests))

    def _start_owned_server(self, model_path: str, max_model_len: int, seed: int, log_dir: str) -> str:
        """Rank 0: start the server; its URL (a Unix socket unless rollout.vllm.expose_control_plane)."""
        v = self.vcfg
        spec = ServerSpec(model=v.model or model_path, python=resolve_python(v.python),
                          log_file=str(Path(log_dir) / "vllm_server.log"), tcp=v.expose_control_plane, host=v.host,
                          port=v.port, dtype=DTYPE_NAMES[self.dtype], gpu_memory_utilization=v.gpu_memory_utilization,
                          max_model_len=max_model_len, enforce_eager=v.enforce_eager,
                          startup_timeout_s=v.startup_timeout_s, seed=seed, cpu=not torch.cuda.is_available(),
                          extra_args=list(v.extra_args), lora_rank=self.lora_rank, max_loras=self.keep_adapters,
                          env={**cpu_thread_env(), **{str(k): str(val) for k, val in (v.env or {}).items()}})
        self.server = VLLMServer(spec).start()
        return self.server.url

    def _open_transports(self) -> str:
        """Rank 0: the run's private sync directory (its free space checked against one bucket) and the senders
        over it; returns this run's token."""
        parent, bucket_bytes = self.vcfg.sync_dir or default_sync_dir(), int(self.vcfg.sync_bucket_mb * 2**20)
        free = shutil.disk_usage(parent).free
        if free < bucket_bytes:
            raise ValueError(f"rollout.vllm.sync_dir={parent} has {free / 2**20:.0f} MiB free, less than one weight "
                             f"bucket ({bucket_bytes / 2**20:.0f} MiB): lower rollout.vllm.sync_bucket_mb, or point "
                             "rollout.vllm.sync_dir at a larger filesystem (Docker's /dev/shm is 64 MiB unless "
                             "--shm-size raises it)")
        self.sync_dir = str(private_run_dir(parent, "weights"))
        run = secrets.token_hex(4)
        self.sender = FileWeightSender(self.clients, self.sync_dir)
        self.adapter_sender = AdapterSender(self.clients, self.sync_dir, run)
        return run

    def sync(self, policy: torch.nn.Module, version: int, *, in_flight: bool = False) -> dict:
        """in_flight: requests may be running (async GRPO): they are frozen for the transfer and continue on the
        new weights (vLLM's /pause?mode=keep ... /resume); their tokens' versions say which weights sampled them."""
        bucket_bytes = int(self.vcfg.sync_bucket_mb * 2**20)
        try:
            base = {}
            if self.lora_rank is not None and not self.base_synced:  # once: the servers' base is the policy's
                base = sync_policy(policy, self.sender, version, dtype=self.dtype, group=self.group,
                                   bucket_bytes=bucket_bytes, merge_lora=False)
                self.base_synced = True
            if self.lora_rank is not None:  # the adapters only, as a new adapter: requests in flight keep theirs
                stats = sync_adapters(policy, self.adapter_sender, version, dtype=self.dtype,
                                      keep=self.keep_adapters, group=self.group)
                self.adapter = (stats.pop("adapter"), version)  # one assignment: the producer thread reads both
                for key in base.keys() & {"sync_s", "sync_bytes", "sync_buckets"}:
                    stats[key] += base[key]
            else:
                stats = sync_policy(policy, self.sender, version, dtype=self.dtype, group=self.group,
                                    bucket_bytes=bucket_bytes, pause=in_flight)
        except Exception as exc:  # the servers may hold part of the new weights: nothing more is sampled from them
            self.broken = str(exc)
            if self.server is not None:
                self.server.stop()
            raise
        self.version = version
        return stats

    def _requests(self, prompts: list[list[int]], sampling: list[dict],
                  routes: list[int]) -> tuple[list[list[dict]], int | None]:
        """Every request in flight at once; request i goes to server routes[i] % servers. Returns the replies
        and, with LoRA adapters, the version whose adapter they named (else None: the spans tell)."""
        if self.broken:
            raise VLLMError(f"the vLLM servers are unusable after a failed weight sync ({self.broken}); an external "
                            "server is left paused with part of the new weights: restart it")
        name, version = self.adapter or (None, self.version)  # read once: a sync may land while these run
        salt = f"cptrain-{self.run}-v{version}"  # the prefix cache: KV of these weights only (see the docstring)
        futures = [self.pool.submit(self.clients[route % len(self.clients)].generate, prompt, params, name, salt)
                   for route, prompt, params in zip(routes, prompts, sampling)]
        return [f.result() for f in futures], (version if self.lora_rank is not None else None)

    def _routes(self, prompts: list, routes: list[int] | None) -> list[int]:
        """Server keys: given (an episode's turns on one server), else by global prompt index."""
        return list(routes) if routes is not None else [self.rank * len(prompts) + i for i in range(len(prompts))]

    def sample(self, prompts: list[list[int]], settings: SamplingSettings,
               routes: list[int] | None = None) -> list[list[Completion]]:
        sampling = [{"n": settings.n, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": -1,
                     "max_tokens": settings.max_new_tokens, "logprobs": 0, "seed": settings.seed * 1009 + i,
                     "stop_token_ids": list(self.stop_ids), "ignore_eos": True}
                    for i in range(len(prompts))]
        replies, adapter_version = self._requests(prompts, sampling, self._routes(prompts, routes))
        groups = []
        for choices in replies:
            ordered = sorted(choices, key=lambda c: c["index"])
            groups.append([_completion(c, self.stop_ids, adapter_version) for c in ordered])
        return groups

    def greedy(self, prompts: list[list[int]], *, max_new_tokens: int) -> list[list[int]]:
        sampling = [{"n": 1, "temperature": 0.0, "max_tokens": max_new_tokens, "logprobs": 0,
                     "stop_token_ids": list(self.stop_ids), "ignore_eos": True} for _ in prompts]
        replies, adapter_version = self._requests(prompts, sampling, self._routes(prompts, None))
        return [_completion(choices[0], self.stop_ids, adapter_version).token_ids for choices in replies]

    def step_metrics(self) -> dict:
        """Rank 0: the servers' prefix-cache hit rate since the last call (vLLM's Prometheus counters; an episode's
        turns go to one server, so its earlier turns' KV is reused there)."""
        if self.rank != 0:
            return {}
        totals = [0.0, 0.0]
        for client in self.clients:
            counters = prefix_cache_counters(client.get("/metrics").get("text", ""))
            totals = [a + b for a, b in zip(totals, counters)]
        queries, hits = (now - before for now, before in zip(totals, self.cache_counters))
        self.cache_counters = totals
        return {"prefix_cache_hit_rate": hits / queries} if queries > 0 else {}

    def close(self) -> None:
        self.sender = self.adapter_sender = None
        if self.sync_dir is not None:
            shutil.rmtree(self.sync_dir, ignore_errors=True)
            self.sync_dir = None
        self.pool.shutdown(wait=False, cancel_futures=True)
        for client in self.clients:
            client.close()
        if self.server is not None:
            self.server.stop()
            self.server = None


def prefix_cache_counters(prometheus_text: str) -> tuple[float, float]:
    """(queries, hits) in tokens, summed over engines, from a vLLM server's /metrics."""
    return (prometheus_total(prometheus_text, "vllm:prefix_cache_queries_total"),
            prometheus_total(prometheus_text, "vllm:prefix_cache_hits_total"))


def wait_all_healthy(clients: list[VLLMClient], timeout_s: float) -> None:
    """External servers (rollout.vllm.urls) must answer /health before the first step."""
    deadline = time.monotonic() + timeout_s
    for client in clients:
        while not client.healthy():
            if time.monotonic() > deadline:
                raise VLLMError(f"vLLM server {client.url} (rollout.vllm.urls) is not healthy after {timeout_s:.0f} s")
            time.sleep(0.25)
