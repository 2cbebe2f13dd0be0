"""A weight sync from every trainer rank's point of view: gather (collectives, every rank), send (rank 0), and the
outcome (statistics or the error) on every rank, so a failed transfer stops every rank with the same error.

    sync_policy:    gather.gathered_buckets -> file_transport.FileWeightSender.send     (full weights)
    sync_adapters:  gather.gathered_adapters -> adapter_transport.AdapterSender.send    (LoRA adapters)
"""

from __future__ import annotations

import os
import tempfile

import torch

from models.adapters.lora import lora_spec
from trainer.rl.rollout.weights.adapter_transport import AdapterSender
from trainer.rl.rollout.weights.file_transport import FileWeightSender
from trainer.rl.rollout.weights.gather import gathered_adapters, gathered_buckets
from trainer.run.rank_zero import rank_zero_outcome


def default_sync_dir() -> str:
    """Shared memory where the OS has it (same host: no disk), else the temp directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def sync_policy(policy: torch.nn.Module, sender: FileWeightSender | None, version: int, *, bucket_bytes: int,
                dtype: torch.dtype, group=None, pause: bool = False, merge_lora: bool = True) -> dict:
    """Every trainer rank: gather bucket by bucket; rank 0 (sender not None) sends."""
    buckets = gathered_buckets(policy, bucket_bytes=bucket_bytes, dtype=dtype, keep=sender is not None,
                               merge_lora=merge_lora)

    def finish_gathers():  # every rank's all-gathers run to the end in lock-step, whatever the transfer did
        for _ in buckets:
            pass

    def send():
        try:
            return sender.send(buckets, version, pause=pause)
        finally:
            finish_gathers()

    return rank_zero_outcome(send, others=finish_gathers, group=group, prefix="weight sync to vLLM failed: ")


def sync_adapters(policy: torch.nn.Module, sender: AdapterSender | None, version: int, *, dtype: torch.dtype,
                  keep: int, group=None) -> dict:
    """LoRA, rollout.vllm.lora_sync=adapter: every rank gathers the adapters (small: r x (in + out) per adapted
    projection); rank 0 loads them on the servers as a new adapter."""
    adapters = gathered_adapters(policy, dtype=dtype, keep=sender is not None)
    return rank_zero_outcome(lambda: sender.send(adapters, version, spec=lora_spec(policy), keep=keep),
                             group=group, prefix="adapter sync to vLLM failed: ")
