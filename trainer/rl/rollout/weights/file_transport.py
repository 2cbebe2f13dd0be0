"""Full weights to vLLM servers as safetensors files: rank 0's side of the `cptrain_files` weight-transfer engine.

    FileWeightSender(clients, directory)   POST /init_weight_transfer_engine {directory} to every server
    .send(buckets, version, pause=)
        pause (requests in flight, async GRPO): /pause?mode=keep on every server (requests frozen, not dropped)
        /start_weight_update                         vLLM's layerwise reload begins
        per bucket: write <directory>/bucket-<k>.safetensors, POST /update_weights {file} to every server,
                    delete the file after the replies: one bucket on disk at a time
        /finish_weight_update {weight_version}       every later token is tagged with that version
        pause: /resume                               frozen requests go on, on the new weights

The server side is vllm_plugin/cptrain_vllm_plugin/file_engine.py (it reads only files inside the directory it was
given, which must be a private one: run_dirs.private_run_dir). Files, because vLLM's built-in engines are NCCL
and CUDA IPC and neither runs on CPU: in /dev/shm a bucket costs one memory copy each way; a directory on a
shared filesystem reaches servers on other nodes (prime-rl's filesystem backend does the same).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch

BACKEND = "cptrain_files"  # vllm_plugin/cptrain_vllm_plugin (the server side's registry name)


class FileWeightSender:
    def __init__(self, clients: list, directory: Path):
        """clients: VLLMClient per server; directory: this run's private sync directory."""
        self.clients, self.directory = clients, Path(directory)
        for client in clients:
            client.post("/init_weight_transfer_engine", {"init_info": {"directory": str(self.directory)}})

    def send(self, buckets: Iterator[dict[str, torch.Tensor]], version: int, *, pause: bool = False) -> dict:
        """pause: requests are in flight (async GRPO): the servers freeze them for the transfer and go on with them
        on the new weights afterwards: each token keeps the version that sampled it."""
        from safetensors.torch import save_file

        start = time.perf_counter()
        if pause:
            self._post_all("/pause?mode=keep")
        # a failure leaves the servers paused: generation never resumes on partly reloaded weights (the engine is
        # marked unusable, an owned server stopped: VLLMRolloutEngine.sync)
        self._post_all("/start_weight_update")
        sent, count = 0, 0
        for bucket in buckets:
            if not bucket:
                continue
            path = self.directory / f"bucket-{count}.safetensors"
            save_file(bucket, str(path))
            try:
                self._post_all("/update_weights", {"update_info": {"file": str(path)}})
            finally:
                path.unlink(missing_ok=True)
            sent += sum(t.numel() * t.element_size() for t in bucket.values())
            count += 1
        self._post_all("/finish_weight_update", {"weight_version": str(version)})
        if pause:
            self._post_all("/resume")
        return {"sync_s": time.perf_counter() - start, "sync_bytes": float(sent), "sync_buckets": float(count)}

    def _post_all(self, path: str, body: dict | None = None) -> None:
        for client in self.clients:
            client.post(path, body)
