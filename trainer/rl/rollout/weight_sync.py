"""Weights from the FSDP2 policy to vLLM servers, bucket by bucket, through vLLM's weight-transfer protocol.

    every trainer rank, same order:   policy.state_dict() (DTensor shards, HF names: apply_cp renames nothing;
                                      a tied weight gathered once, sent under each name)
      per tensor: full_tensor()       an all-gather over dp_cp; rank 0 keeps the full tensor (cast to the
                                      server's dtype), the others drop it at once
      ~bucket_mb gathered             rank 0 writes sync_dir/bucket-<k>.safetensors, POSTs /update_weights to
                                      every server, deletes the file: at most one bucket held at a time
    rank 0 before / after:            /start_weight_update; /finish_weight_update {weight_version}: every token
                                      the server samples afterwards carries that version

The servers run the `cptrain_files` engine (vllm_plugin/: registered in vLLM's weight-transfer registry through
vLLM's plugin entry points), which reads a bucket file and hands its tensors to the model's own load_weights
(HF checkpoint names; vLLM fuses q/k/v and gate/up itself) inside vLLM's layerwise reload. Files, because
vLLM's built-in engines are NCCL and CUDA IPC and neither runs on CPU: in /dev/shm a bucket costs one memory
copy each way; sync_dir on a shared filesystem reaches servers on other nodes (prime-rl's filesystem backend
does the same). Memory: rank 0 holds one bucket beyond its shard; the others one tensor.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from models.adapters.lora import ADAPTER, LORA_KEY, lora_spec, merged_weight

BACKEND = "cptrain_files"  # vllm_plugin/cptrain_vllm_plugin (the server side's registry name)


def default_sync_dir() -> str:
    """Shared memory where the OS has it (same host: no disk), else the temp directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def gathered_buckets(policy: torch.nn.Module, *, bucket_bytes: int, dtype: torch.dtype,
                     keep: bool, merge_lora: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """The policy's full state dict in buckets of about `bucket_bytes` (a collective: every rank iterates it in
    lock-step). keep=False (every rank but the sender): the tensors are gathered and dropped, buckets are empty.
    A tied weight (lm_head = embed_tokens) is gathered once and sent under each of its names: vLLM's layerwise
    reload does not keep the tie, so a name left out would keep its old values (measured: a stale lm_head).
    LoRA: each adapted projection is sent merged under its HF name (W + scale B A, in fp32 before the cast), or with
    merge_lora=False its frozen base alone (the base of a server that runs the adapters itself)."""
    params = policy.state_dict(keep_vars=True)
    names_of: dict[int, int] = {}
    for tensor in params.values():
        names_of[id(tensor)] = names_of.get(id(tensor), 0) + 1
    merger = LoraMerger(lora_spec(policy), merge=merge_lora)
    bucket, size, gathered, tied = {}, 0, set(), {}
    for name, tensor in params.items():
        key = id(tensor)
        if key in gathered:  # the same collectives on every rank: a tied weight's second name gathers nothing
            names_of[key] -= 1
            full = tied.pop(key, None) if names_of[key] == 1 else tied.get(key)
            full = None if full is None else full.clone()  # safetensors refuses two names on one storage
        else:
            gathered.add(key)
            tensor = tensor.detach()
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # all-gather of the shards
            if keep:
                full = full.to("cpu").contiguous()
                if names_of[key] > 1:
                    tied[key] = full  # held until its other names are sent (the embedding: one tensor)
        if not keep:
            continue
        for hf_name, ready in merger.add(name, full):
            bucket[hf_name] = ready.to(dtype) if ready.is_floating_point() else ready
            size += ready.numel() * bucket[hf_name].element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = {}, 0
    if bucket or not keep:
        yield bucket


class LoraMerger:
    """Names and tensors in state-dict order -> (HF name, tensor) ready to send: without LoRA each one as it comes;
    with LoRA a projection's base weight waits for its lora_A and lora_B (the next entries) and leaves merged (or,
    merge=False, alone: the adapters are dropped)."""

    def __init__(self, spec, merge: bool = True):
        self.spec, self.merge, self.pending = spec, merge, {}

    def add(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if self.spec is None:
            return [(name, tensor)]
        if ".base_layer." in name:
            module, _, leaf = name.partition(".base_layer.")
            if leaf != "weight":
                return [(f"{module}.{leaf}", tensor)]
            self.pending.setdefault(module, {})["W"] = tensor
            return self._ready(module)
        found = LORA_KEY.search(name)
        if found:
            module = name[:found.start()]
            self.pending.setdefault(module, {})[found.group(1)] = tensor
            return self._ready(module)
        return [(name, tensor)]

    def _ready(self, module: str) -> list[tuple[str, torch.Tensor]]:
        parts = self.pending[module]
        if len(parts) < 3:
            return []
        del self.pending[module]
        if not self.merge:
            return [(f"{module}.weight", parts["W"])]
        return [(f"{module}.weight", merged_weight(parts["W"], parts["A"], parts["B"], self.spec.scale))]


def adapter_name(version: int, run: str) -> str:
    """The name weight version `version`'s adapter is loaded under (requests name it as their model). `run`: a token
    of this run, so a resumed run (or another) on the same external server never names an adapter loaded before
    (vLLM would serve the earlier adapter under that name)."""
    return f"cptrain-{run}-v{version}"


def gathered_adapters(policy: torch.nn.Module, *, dtype: torch.dtype, keep: bool) -> dict[str, torch.Tensor]:
    """LoRA (rollout.vllm.lora_sync=adapter): every adapter tensor gathered from its shards (a collective, the
    same order on every rank), under the names peft's save_pretrained writes; the frozen base never travels."""
    adapters = {}
    for name, tensor in policy.state_dict(keep_vars=True).items():
        if not LORA_KEY.search(name):
            continue
        tensor = tensor.detach()
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # all-gather of the shards
        if keep:
            adapters[f"base_model.model.{name.replace(f'.{ADAPTER}.weight', '.weight')}"] = \
                full.to("cpu", dtype).contiguous()
    return adapters


def process_identity(pid: int) -> str | None:
    """'<pid>-<start time>' of a live process (start time in clock ticks since boot: a reused pid differs), or
    None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return f"{pid}-{fields[19]}"  # field 22 of stat, counted after the ")" that ends the command name


def remove_dead_runs(sync_dir: str) -> list[str]:
    """Remove the cptrain-weights-<pid>-<start>-* directories of runs whose process is gone (a SIGKILLed run
    cannot clean up; its buckets would hold shared memory until reboot); a live run's directory is kept."""
    removed = []
    for directory in Path(sync_dir).glob("cptrain-weights-*-*-*"):
        pid, start = directory.name.split("-")[2:4]
        if pid.isdigit() and process_identity(int(pid)) != f"{pid}-{start}":
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(str(directory))
    return removed


class FileWeightSender:
    """Rank 0's side of the `cptrain_files` protocol over one or more servers (VLLMClient each)."""

    def __init__(self, clients: list, sync_dir: str, bucket_bytes: int = 0):
        """bucket_bytes: the largest bucket a sync writes (checked against the free space of sync_dir)."""
        self.clients = clients
        self.adapters: list[str] = []  # LoRA: the adapter names loaded on the servers, oldest first
        self.run = secrets.token_hex(4)  # adapter names unique to this run (adapter_name)
        remove_dead_runs(sync_dir)
        free = shutil.disk_usage(sync_dir).free
        if free < bucket_bytes:
            raise ValueError(f"rollout.vllm.sync_dir={sync_dir} has {free / 2**20:.0f} MiB free, less than one weight "
                             f"bucket ({bucket_bytes / 2**20:.0f} MiB): lower rollout.vllm.sync_bucket_mb, or point "
                             "rollout.vllm.sync_dir at a larger filesystem (Docker's /dev/shm is 64 MiB unless "
                             "--shm-size raises it)")
        owner = process_identity(os.getpid()) or f"{os.getpid()}-0"  # in the name: remove_dead_runs reads it
        self.directory = Path(tempfile.mkdtemp(prefix=f"cptrain-weights-{owner}-", dir=sync_dir))
        for client in clients:
            client.post("/init_weight_transfer_engine", {"init_info": {"directory": str(self.directory)}})

    def send(self, buckets: Iterator[dict[str, torch.Tensor]], version: int, *, pause: bool = False) -> dict:
        """pause: requests are in flight (async GRPO): the servers freeze them for the transfer (/pause?mode=keep)
        and go on with them on the new weights afterwards (/resume): each token keeps the version that sampled it."""
        from safetensors.torch import save_file

        start, sent, count = time.perf_counter(), 0, 0
        if pause:
            for client in self.clients:
                client.post("/pause?mode=keep")
        # a failure leaves the servers paused: never resume generation on partly reloaded weights (the engine is
        # marked unusable, an owned server stopped: VLLMRolloutEngine.sync)
        for client in self.clients:
            client.post("/start_weight_update")
        count, sent = self._send_buckets(buckets, save_file)
        for client in self.clients:
            client.post("/finish_weight_update", {"weight_version": str(version)})
        if pause:
            for client in self.clients:
                client.post("/resume")
        return {"sync_s": time.perf_counter() - start, "sync_bytes": float(sent), "sync_buckets": float(count)}

    def send_adapter(self, adapters: dict[str, torch.Tensor], version: int, spec, *, keep: int) -> dict:
        """Write version `version`'s adapter as a peft directory and load it on every server under
        adapter_name(version); unload (and delete) the adapters beyond the `keep` newest (rollouts in flight
        may still name those)."""
        from safetensors.torch import save_file
        start = time.perf_counter()
        name = adapter_name(version, self.run)
        directory = self.directory / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        save_file(adapters, str(directory / "adapter_model.safetensors"))
        spec.peft_config().save_pretrained(str(directory))
        for client in self.clients:
            client.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(directory)})
        self.adapters = [n for n in self.adapters if n != name] + [name]
        while len(self.adapters) > keep:
            old = self.adapters.pop(0)
            for client in self.clients:
                client.post("/v1/unload_lora_adapter", {"lora_name": old})
            shutil.rmtree(self.directory / old, ignore_errors=True)
        sent = sum(t.numel() * t.element_size() for t in adapters.values())
        return {"sync_s": time.perf_counter() - start, "sync_bytes": float(sent), "sync_buckets": 1.0,
                "adapter": name}

    def _send_buckets(self, buckets, save_file) -> tuple[int, int]:
        sent, count = 0, 0
        for bucket in buckets:
            if not bucket:
                continue
            path = self.directory / f"bucket-{count}.safetensors"
            save_file(bucket, str(path))
            try:
                for client in self.clients:
                    client.post("/update_weights", {"update_info": {"file": str(path)}})
            finally:
                path.unlink(missing_ok=True)
            sent += sum(t.numel() * t.element_size() for t in bucket.values())
            count += 1
        return count, sent

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def sync_policy(policy: torch.nn.Module, sender: FileWeightSender | None, version: int, *, bucket_bytes: int,
                dtype: torch.dtype, group=None, pause: bool = False, merge_lora: bool = True) -> dict:
    """Every trainer rank: gather bucket by bucket; rank 0 (sender not None) sends. Then every rank learns the
    statistics (and any failure) of the sender, so a failed sync stops every rank with the same error."""
    stats, error = {}, None
    buckets = gathered_buckets(policy, bucket_bytes=bucket_bytes, dtype=dtype, keep=sender is not None,
                               merge_lora=merge_lora)
    if sender is None:
        for _ in buckets:  # lock-step all-gathers
            pass
    else:
        try:
            stats = sender.send(buckets, version, pause=pause)
        except Exception as exc:  # the other ranks must still finish the gathers, then hear about it
            error = f"{type(exc).__name__}: {exc}"
            for _ in buckets:
                pass
    shared = [{"stats": stats, "error": error}]
    dist.broadcast_object_list(shared, src=0, group=group)
    if shared[0]["error"]:
        raise RuntimeError(f"weight sync to vLLM failed: {shared[0]['error']}")
    return shared[0]["stats"]


def sync_adapters(policy: torch.nn.Module, sender: FileWeightSender | None, version: int, *, dtype: torch.dtype,
                  keep: int, group=None) -> dict:
    """LoRA, rollout.vllm.lora_sync=adapter: every rank gathers the adapters (small: r x (in + out) per adapted
    projection); rank 0 loads them on the servers as a new adapter. Failures reach every rank as in sync_policy."""
    stats, error = {}, None
    adapters = gathered_adapters(policy, dtype=dtype, keep=sender is not None)
    if sender is not None:
        try:
            stats = sender.send_adapter(adapters, version, lora_spec(policy), keep=keep)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    shared = [{"stats": stats, "error": error}]
    dist.broadcast_object_list(shared, src=0, group=group)
    if shared[0]["error"]:
        raise RuntimeError(f"adapter sync to vLLM failed: {shared[0]['error']}")
    return shared[0]["stats"]
