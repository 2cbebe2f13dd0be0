"""The `vllm` rollout engine: vLLM servers generate, the trainer ranks hold no model copy.

    startup (rollout.vllm.urls empty): rank 0 starts and owns one server (trainer/rl/rollout/vllm_server.py) on
        model.name's weights (a tiny:* model: its initial weights exported first), in the vLLM venv; every rank
        learns its URL (or the startup error) through a broadcast; stopped at the end, on failure, on SIGTERM
    startup (rollout.vllm.urls=[...]): existing servers, started by the user with the flags ServerSpec.command
        lists (data-parallel inference: one server per GPU or node); none is owned
    sync(policy, version):   weight_sync.sync_policy: FSDP2 shards gathered bucket by bucket, rank 0 streams them
                             through vLLM's weight-transfer protocol to every server, version = optimizer steps;
                             LoRA (rollout.vllm.lora_sync=adapter): weight_sync.sync_adapters, the adapters only,
                             loaded as adapter cptrain-v<version> (vLLM's LoRA: --enable-lora); requests name it
    sample(prompts, s):      every prompt of this rank in flight at once (one request per prompt, n samples,
                             a seed per prompt), spread round-robin over the servers by global prompt index;
                             vLLM batches concurrent requests (continuous batching)
        -> Completion(token ids, the server's log-prob of each token at T, version, newest): from the weight
           version spans the server returns, the version of the first token and, when a sync overlapped the
           request (async GRPO), of the last; the synchronous loop refuses anything but its own version
    greedy(prompts):         temperature 0, same path

Log-probs: the server runs --logprobs-mode processed_logprobs, the log-prob under the distribution it sampled
(temperature T; top_p < 1 truncated), which the trainer compares with its own (trainer/rl/logprob_mismatch.py).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.rl.rollout.base import Completion, RolloutEngine, SamplingSettings, cut_at_end, end_of_turn_id
from trainer.rl.rollout.vllm_client import VLLMClient, VLLMError
from trainer.rl.rollout.vllm_server import ServerSpec, VLLMServer, install_termination_handler, resolve_python
from trainer.rl.rollout.weight_sync import (FileWeightSender, adapter_name, default_sync_dir, sync_adapters,
                                            sync_policy)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def cpu_thread_env() -> dict[str, str]:
    """On a host without CUDA: the server's OpenMP threads on every core this process may use (vLLM's default
    reserves one core and binds one), since the synchronous loop's trainer ranks wait while it generates."""
    if torch.cuda.is_available():
        return {}
    cores = sorted(os.sched_getaffinity(0))
    spec = f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0], cores[-1] + 1)) else ",".join(map(str, cores))
    return {"VLLM_CPU_OMP_THREADS_BIND": spec, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def _completion(choice: dict, end_id: int, expected_version: int, adapter_version: int | None = None) -> Completion:
    """One choice of /inference/v1/generate -> Completion; its version from the server's spans (the base weights'
    version), or with LoRA adapters the version of the adapter the request named (every token: a request keeps
    its adapter)."""
    tokens = choice["token_ids"]
    logprobs = [entry["logprob"] for entry in (choice.get("logprobs") or {}).get("content") or []]
    if len(logprobs) != len(tokens):
        raise VLLMError(f"the server returned {len(tokens)} tokens but {len(logprobs)} log-probs")
    kept = cut_at_end(tokens, end_id)
    if adapter_version is not None:
        return Completion(kept, logprobs[:len(kept)], adapter_version)
    spans = sorted((span["start"], span["version"]) for span in choice.get("weight_versions") or []
                   if span["end"] > span["start"] and span["start"] < len(kept))  # the kept tokens' spans
    versions = [int(v) if str(v).lstrip("-").isdigit() else -1 for _, v in spans]  # "default": never synced
    if not versions:
        return Completion(kept, logprobs[:len(kept)], expected_version)  # nothing sampled: nothing to attribute
    return Completion(kept, logprobs[:len(kept)], versions[0], versions[-1] if len(set(versions)) > 1 else None)


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
        self.end_id = end_of_turn_id(tokenizer)
        self.server: VLLMServer | None = None
        self.sender: FileWeightSender | None = None
        self.rank = dist.get_rank()
        urls = list(vcfg.urls) if vcfg.urls else self._start_owned_server(model_path, max_model_len, seed, log_dir)
        self.clients = [self.server.client(vcfg.request_timeout_s) if self.server and u == self.server.url
                        else VLLMClient(u, timeout_s=vcfg.request_timeout_s) for u in urls]
        if vcfg.urls:
            wait_all_healthy(self.clients, vcfg.startup_timeout_s)
        if self.rank == 0:
            self.sender = FileWeightSender(self.clients, vcfg.sync_dir or default_sync_dir())
        self.pool = ThreadPoolExecutor(max_workers=max(1, vcfg.max_concurrent_requests))

    def _start_owned_server(self, model_path: str, max_model_len: int, seed: int, log_dir: str) -> list[str]:
        """Rank 0 starts the server; every rank gets its URL, or the startup error, through one broadcast."""
        outcome = [None]
        if self.rank == 0:
            v = self.vcfg
            try:
                spec = ServerSpec(model=v.model or model_path, python=resolve_python(v.python),
                                  log_file=str(Path(log_dir) / "vllm_server.log"), host=v.host, port=v.port,
                                  dtype=DTYPE_NAMES[self.dtype], gpu_memory_utilization=v.gpu_memory_utilization,
                                  max_model_len=max_model_len, enforce_eager=v.enforce_eager,
                                  startup_timeout_s=v.startup_timeout_s, seed=seed, cpu=not torch.cuda.is_available(),
                                  extra_args=list(v.extra_args), lora_rank=self.lora_rank,
                                  max_loras=self.keep_adapters,
                                  env={**cpu_thread_env(), **{str(k): str(val) for k, val in (v.env or {}).items()}})
                self.server = VLLMServer(spec).start()
                outcome = [{"url": self.server.url}]
            except Exception as exc:
                outcome = [{"error": f"{type(exc).__name__}: {exc}"}]
        dist.broadcast_object_list(outcome, src=0, group=self.group)
        if "error" in outcome[0]:
            raise RuntimeError(outcome[0]["error"])
        return [outcome[0]["url"]]

    def sync(self, policy: torch.nn.Module, version: int, *, in_flight: bool = False) -> dict:
        """in_flight: requests may be running (async GRPO): they are frozen for the transfer and continue on the
        new weights (vLLM's /pause?mode=keep ... /resume); their tokens' versions say which weights sampled them."""
        if self.lora_rank is not None:  # the adapters only, as a new adapter: requests in flight keep theirs
            stats = sync_adapters(policy, self.sender, version, dtype=self.dtype, keep=self.keep_adapters,
                                  group=self.group)
            self.adapter = (adapter_name(version), version)  # one assignment: the producer thread reads both
        else:
            stats = sync_policy(policy, self.sender, version, bucket_bytes=int(self.vcfg.sync_bucket_mb * 2**20),
                                dtype=self.dtype, group=self.group, pause=in_flight)
        self.version = version
        return stats

    def _requests(self, prompts: list[list[int]], sampling: list[dict],
                  offset: int) -> tuple[list[list[dict]], int | None]:
        """Every request in flight at once; request i goes to server (offset + i) % servers. Returns the replies
        and, with LoRA adapters, the version whose adapter they named (else None: the spans tell)."""
        name, version = self.adapter or (None, self.version)  # read once: a sync may land while these run
        futures = [self.pool.submit(self.clients[(offset + i) % len(self.clients)].generate, prompt, params, name)
                   for i, (prompt, params) in enumerate(zip(prompts, sampling))]
        return [f.result() for f in futures], (version if self.lora_rank is not None else None)

    def sample(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[Completion]]:
        sampling = [{"n": settings.n, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": -1,
                     "max_tokens": settings.max_new_tokens, "logprobs": 0, "seed": settings.seed * 1009 + i,
                     "stop_token_ids": [self.end_id], "ignore_eos": False}
                    for i in range(len(prompts))]
        replies, adapter_version = self._requests(prompts, sampling, offset=self.rank * len(prompts))
        groups = []
        for choices in replies:
            ordered = sorted(choices, key=lambda c: c["index"])
            groups.append([_completion(c, self.end_id, self.version, adapter_version) for c in ordered])
        return groups

    def greedy(self, prompts: list[list[int]], *, max_new_tokens: int) -> list[list[int]]:
        sampling = [{"n": 1, "temperature": 0.0, "max_tokens": max_new_tokens, "logprobs": 0,
                     "stop_token_ids": [self.end_id]} for _ in prompts]
        replies, _ = self._requests(prompts, sampling, offset=self.rank * len(prompts))
        return [_completion(choices[0], self.end_id, self.version).token_ids for choices in replies]

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.server is not None:
            self.server.stop()
            self.server = None


def wait_all_healthy(clients: list[VLLMClient], timeout_s: float) -> None:
    """External servers (rollout.vllm.urls) must answer /health before the first step."""
    deadline = time.monotonic() + timeout_s
    for client in clients:
        while not client.healthy():
            if time.monotonic() > deadline:
                raise VLLMError(f"vLLM server {client.url} (rollout.vllm.urls) is not healthy after {timeout_s:.0f} s")
            time.sleep(0.25)
