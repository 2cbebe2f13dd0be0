"""The policy's weights gathered from their FSDP2 shards, in the form a transport sends (collectives: every rank).

    every trainer rank, same order:   policy.state_dict() (DTensor shards, HF names: apply_cp renames nothing;
                                      a tied weight gathered once, sent under each name)
      per tensor: full_tensor()       an all-gather over dp_cp; rank 0 keeps the full tensor (cast to the
                                      server's dtype), the others drop it at once
      ~bucket_bytes gathered          rank 0 yields a bucket (the transport sends it before the next is gathered):
                                      rank 0 holds one bucket beyond its shard, the others one tensor
    LoRA adapters                     gathered_adapters: the adapter tensors alone, peft's names
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from models.adapters.lora import ADAPTER, LORA_KEY, lora_spec, merged_weight


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
