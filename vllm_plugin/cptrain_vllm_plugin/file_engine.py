"""vLLM weight-transfer engine `cptrain_files`: weights arrive as safetensors buckets in a shared directory.

    trainer rank 0                                       vLLM worker (this engine)
    POST /init_weight_transfer_engine {directory}   ──>  init_transfer_engine: remember the directory
    POST /start_weight_update                       ──>  start_weight_update: layerwise reload begins
    per bucket (bounded: one bucket of the gathered FSDP2 shards at a time):
      write <directory>/bucket-<k>.safetensors
      POST /update_weights {file}                   ──>  receive_weights: read the file (mmap), model.load_weights
      delete the file after the reply                    (HF checkpoint names; vLLM fuses q/k/v, gate/up itself)
    POST /finish_weight_update {weight_version}     ──>  finish_weight_update: layerwise reload finalised; the
                                                         engine tags every later token with that version

Why files: vLLM's built-in backends are NCCL and CUDA IPC, neither of which runs on CPU. A directory in shared
memory (/dev/shm) costs one memory copy each way on one host; on a shared filesystem the same engine spans
nodes (prime-rl's filesystem backend does the same). The protocol around it is vLLM's own.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import torch

from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)


@dataclass
class FileInitInfo(WeightTransferInitInfo):
    directory: str


@dataclass
class FileUpdateInfo(WeightTransferUpdateInfo):
    file: str


class FileWeightTransferEngine(WeightTransferEngine[FileInitInfo, FileUpdateInfo]):
    init_info_cls = FileInitInfo
    update_info_cls = FileUpdateInfo
    directory: str | None = None

    def init_transfer_engine(self, init_info: FileInitInfo) -> None:
        self.directory = None
        path = init_info.directory
        try:
            info = os.lstat(path)
        except OSError:
            raise ValueError(f"cptrain_files: weight directory {path} does not exist on the server host "
                             "(rollout.vllm.sync_dir must be shared by the trainer and the server)") from None
        if not stat.S_ISDIR(info.st_mode) or not os.path.basename(path).startswith("cptrain-weights-"):
            raise ValueError(f"cptrain_files: {path} is not a cptrain weight directory (cptrain-weights-*)")
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ValueError(f"cptrain_files: weight directory {path} must belong to the server's user with mode "
                             f"0700 (it is uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o})")
        self.directory = os.path.realpath(path)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: FileUpdateInfo) -> None:
        from safetensors.torch import load_file

        if self.directory is None:
            raise RuntimeError("cptrain_files: /init_weight_transfer_engine was not called")
        path = update_info.file
        if (os.path.dirname(os.path.realpath(path)) != self.directory or not path.endswith(".safetensors")
                or not stat.S_ISREG(os.lstat(path).st_mode)):
            raise ValueError(f"cptrain_files: {path} is not a .safetensors file in the weight directory "
                             f"{self.directory}")
        tensors = load_file(path, device="cpu")
        self.model.load_weights(list(tensors.items()))

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.current_accelerator() is not None:  # a GPU server: the copies have landed
            torch.accelerator.synchronize()

    def shutdown(self) -> None:
        self.directory = None
