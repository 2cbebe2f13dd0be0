"""LoRA adapters to vLLM servers (rollout.vllm.lora_sync=adapter): each weight version a peft directory, loaded
through vLLM's runtime LoRA API (--enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING).

    AdapterSender(clients, directory, run)
    .send(adapters, version, spec=, keep=)
        write <directory>/<name>/{adapter_model.safetensors, adapter_config.json}   name = adapter_name(version, run)
        POST /v1/load_lora_adapter {lora_name, lora_path} to every server          requests name it as their model
        beyond the `keep` newest: /v1/unload_lora_adapter, directory deleted       (rollouts in flight may still
                                                                                    name the newest few)
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch


def adapter_name(version: int, run: str) -> str:
    """The name weight version `version`'s adapter is loaded under (requests name it as their model). `run`: a token
    of this run, so a resumed run (or another) on the same external server never names an adapter loaded before
    (vLLM would serve the earlier adapter under that name)."""
    return f"cptrain-{run}-v{version}"


class AdapterSender:
    def __init__(self, clients: list, directory: Path, run: str):
        """clients: VLLMClient per server; directory: this run's private sync directory; run: this run's token."""
        self.clients, self.directory, self.run = clients, Path(directory), run
        self.loaded: list[str] = []  # adapter names on the servers, oldest first

    def send(self, adapters: dict[str, torch.Tensor], version: int, *, spec, keep: int) -> dict:
        """spec: the policy's LoRA spec (its peft config is written beside the tensors)."""
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
        self.loaded = [n for n in self.loaded if n != name] + [name]
        while len(self.loaded) > keep:
            old = self.loaded.pop(0)
            for client in self.clients:
                client.post("/v1/unload_lora_adapter", {"lora_name": old})
            shutil.rmtree(self.directory / old, ignore_errors=True)
        sent = sum(t.numel() * t.element_size() for t in adapters.values())
        return {"sync_s": time.perf_counter() - start, "sync_bytes": float(sent), "sync_buckets": 1.0,
                "adapter": name}
