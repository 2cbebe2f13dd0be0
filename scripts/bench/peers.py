"""Peers measured in the same run, on the same model, data and ranks as cptrain's configs.

    deepspeed   DeepSpeed-Ulysses for HF models (deepspeed.runtime.sequence_parallel.ulysses_sp.
                UlyssesSPAttentionHF.register_with_transformers): HF's sdpa between DeepSpeed's
                all-to-alls; contiguous shards with global position_ids, as its data adapter makes.
                Optional (pip install --no-deps deepspeed and a few small deps; see
                scripts/install_bench_peers.sh); skipped with a note when not importable.
                It replaces transformers' "sdpa" entry for the whole process, so cptrain's
                configs (their own registered attention), the plain-HF baseline and the torch_cp
                peer (HF's sdpa function registered as "bench_sdpa") are not affected.
    torch_cp    torch.distributed.tensor.experimental.context_parallel (ring, head-tail load
                balancing) around the HF model with HF's sdpa; ids, positions and labels are its
                sharded buffers. It has no CPU sharding rule for SDPA, so on CPU one step is tried,
                the error recorded, and the peer skipped; on CUDA it is measured like the rest.

Both peers run one document per row (plain causal): DeepSpeed's sdpa path drops the attention
mask and torch's context_parallel only shards plain causal/non-causal SDPA, so neither can run
packed documents exactly; the model workload is single-document for that reason.
"""

from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

from bench.workloads import Config, _Micro, build_model, lm_batch, register_hf_sdpa, token_loss


def deepspeed_missing() -> str | None:
    """None when DeepSpeed imports; else why not."""
    try:
        importlib.import_module("deepspeed.runtime.sequence_parallel.ulysses_sp")
    except Exception as exc:  # ImportError, or a broken optional dependency
        return (f"deepspeed is not importable here ({type(exc).__name__}: {exc}); "
                "install it with scripts/install_bench_peers.sh")
    return None


class _PeerRunner:
    def __init__(self, config: Config, model_cfg, device, dtype):
        self.config, self.device, self.vocab = config, device, model_cfg.vocab_size
        self.micro: list[_Micro] = []
        self.dp_rank = dist.get_rank() // config.cp

    def prepare(self, seq_len: int) -> None:
        self.micro = []
        for m in range(self.config.cp):
            ids, labels, count = lm_batch(seq_len, self.vocab, seq_len * 1000 + self.dp_rank * 10 + m, self.device)
            self.micro.append(_Micro(ids=ids, labels=labels, count=count))

    def attention_calls(self) -> int:
        return len(self.micro) * self.model.config.num_hidden_layers

    def release(self) -> None:
        self.micro = []
        self.model.zero_grad(set_to_none=True)


class DeepSpeedRunner(_PeerRunner):
    def __init__(self, config: Config, model_cfg, device, dtype):
        super().__init__(config, model_cfg, device, dtype)
        import deepspeed
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts torch's process group
        self.model = build_model(model_cfg, "sdpa", device, dtype)
        self.model.config.use_cache = False
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=self.model, core_attn_implementation="sdpa", sequence_parallel_size=config.cp,
            micro_batch_size=1, seq_length_is_variable=True)
        self.group = mpu.get_sequence_parallel_group()
        self.sp_rank = dist.get_rank(self.group)

    def step(self) -> None:
        self.model.zero_grad(set_to_none=False)
        for micro in self.micro:
            S = micro.ids.shape[1]
            local = slice(self.sp_rank * S // self.config.cp, (self.sp_rank + 1) * S // self.config.cp)
            positions = torch.arange(S, device=self.device)[None]  # global positions, made before sharding
            out = self.model(input_ids=micro.ids[:, local], position_ids=positions[:, local])
            token_loss(out.logits, micro.labels[:, local], micro.count).backward()


class TorchCPRunner(_PeerRunner):
    def __init__(self, config: Config, model_cfg, device, dtype):
        super().__init__(config, model_cfg, device, dtype)
        from torch.distributed.device_mesh import init_device_mesh

        self.model = build_model(model_cfg, register_hf_sdpa(), device, dtype)
        self.model.config.use_cache = False
        world = dist.get_world_size()
        self.mesh = init_device_mesh(device.type, (world // config.cp, config.cp), mesh_dim_names=("dp", "cp"))["cp"]

    def step(self) -> None:
        from torch.distributed.tensor.experimental import context_parallel

        self.model.zero_grad(set_to_none=False)
        for micro in self.micro:
            S = micro.ids.shape[1]
            # context_parallel shards its buffers in place: hand it fresh copies
            ids, labels = micro.ids.clone(), micro.labels.clone()
            positions = torch.arange(S, device=self.device)[None].clone()
            with context_parallel(self.mesh, buffers=[ids, positions, labels], buffer_seq_dims=[1, 1, 1],
                                  no_restore_buffers={ids, positions, labels}):
                out = self.model(input_ids=ids, position_ids=positions)
                token_loss(out.logits, labels, micro.count).backward()


def try_torch_cp_on_cpu(model_cfg, cp_degree: int) -> str | None:
    """Run one tiny torch_cp step on CPU; None if it works, else the error (the same on every rank)."""
    runner = TorchCPRunner(Config(f"torch_cp cp{cp_degree}", "ring", cp_degree, peer="torch_cp"), model_cfg,
                           torch.device("cpu"), torch.float32)
    runner.prepare(16 * cp_degree)
    try:
        runner.step()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    finally:
        runner.release()
    return None
