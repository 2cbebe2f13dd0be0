"""The `hf` rollout engine: transformers.generate on a plain copy of the policy, in process (no dependency).

    policy (FSDP shards, CP attention) ──sync(): full weights gathered on every rank──> plain HF copy
    each rank: ALL its prompts x n, left-padded into one batch ──copy.generate (KV cache, no collectives)──>
        completions + the log-prob of each sampled token

Why a plain copy: generating with the FSDP/CP model would put collectives inside every decoding
step, and ranks whose completions end at different lengths would call forward a different number
of times and deadlock (the FSDP lock-step trap). The copy has the policy's exact weights (gathered
once per step, the only collective), runs transformers' own attention with a KV cache, and each
rank is free to stop when its sequences end. CP is for the training forward/backward. The cost: every
rank holds the whole model in the compute dtype; rollout.engine=vllm holds none (trainer/rl/rollout/vllm_engine.py).

One generate call per rank and step: prompts of different lengths are left-padded (pad tokens masked, positions
counted from each row's first real token), so the batch is the rank's whole share. Log-probs: the log-softmax of
the generation logits at temperature T, at the sampled tokens; the training pass computes the new ones the same
way (logits / T). Precision: the copy computes in the training compute dtype (model.dtype): sync() loads the fp32
master weights and its parameters are held in that dtype (buffers stay fp32, as under FSDP2's param_dtype), so
sampling and the training forward round the same way. LoRA: the copy has the policy's adapters, unmerged.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from models.adapters.lora import apply_lora, lora_spec
from models.apply import plain_model
from models.nucleus import top_p_truncated
from trainer.modeling import cast_parameters, decoder_layers
from trainer.rl.rollout.base import Completion, RolloutEngine, SamplingSettings, cut_at_end, stop_token_ids


def rollout_copy(policy: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A plain model of the policy's config; with LoRA the same adapters (peft, unmerged), so the copy computes
    what the trainer computes: the base and the adapters each in the compute dtype (FSDP2's param_dtype), the
    adapter's update added to the base's output. A copy with W + scale B A merged into a bf16 base rounded an
    early update away (most entries of B A are below half a bf16 ulp of W)."""
    copy = plain_model(policy)
    spec = lora_spec(policy)
    if spec is not None:
        lcfg = SimpleNamespace(rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout,
                               target_modules=list(spec.targets))
        apply_lora(copy, lcfg, decoder_layers(copy), dtype)
    return copy


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids [N, L], attention mask [N, L]) with each prompt right-aligned behind pad tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


class HFRolloutEngine(RolloutEngine):
    def __init__(self, policy: torch.nn.Module, tokenizer, device: torch.device, *,
                 dtype: torch.dtype = torch.float32, batch_rows: int = 256):
        """dtype: the training compute dtype (trainer.modeling.compute_dtype(cfg.model)); batch_rows: the most
        sequences one generate call holds (a rank's larger share runs in several)."""
        self.dtype, self.batch_rows = dtype, batch_rows
        self.model = cast_parameters(rollout_copy(policy, dtype), dtype)
        self.model = self.model.to(device).eval()
        self.tokenizer, self.device = tokenizer, device
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    def sync(self, policy: torch.nn.Module, version: int) -> dict:
        """Copy the policy's current weights (a collective: every rank calls it); load_state_dict casts
        the fp32 master weights to the copy's compute dtype."""
        start = time.perf_counter()
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
        self.model.load_state_dict(full, strict=True)  # LoRA: base and adapters under peft's names, unmerged
        self.version = version
        return {"sync_s": time.perf_counter() - start,
                "sync_bytes": float(sum(t.numel() * t.element_size() for t in self.model.state_dict().values()))}

    def _generate(self, prompts: list[list[int]], **kwargs):
        ids, mask = left_padded(prompts, self.pad_id, self.device)
        out = self.model.generate(ids, attention_mask=mask, eos_token_id=list(self.stop_ids),
                                  pad_token_id=self.pad_id, return_dict_in_generate=True, **kwargs)
        return out, ids.shape[1]

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], settings: SamplingSettings,
               routes: list[int] | None = None) -> list[list[Completion]]:  # routes: one model here
        torch.manual_seed(settings.seed)
        rows = [p for p in prompts for _ in range(settings.n)]  # prompt-major: group i = rows[i*n:(i+1)*n]
        results: list[Completion] = []
        for start in range(0, len(rows), self.batch_rows):
            out, width = self._generate(rows[start:start + self.batch_rows], do_sample=True,
                                        temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                                        max_new_tokens=settings.max_new_tokens, output_logits=True)
            tokens = out.sequences[:, width:]  # [N, T]
            logits = torch.stack(out.logits, dim=1).float() / settings.temperature  # T x [N, V] -> [N, T, V]
            logits = top_p_truncated(logits, tokens, settings.top_p)  # the nucleus generate sampled from
            logp = F.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)  # [N, T]
            for row_tokens, row_logp in zip(tokens.tolist(), logp.tolist()):
                kept = cut_at_end(row_tokens, self.stop_ids)
                results.append(Completion(kept, row_logp[:len(kept)], self.version))
        return [results[i * settings.n:(i + 1) * settings.n] for i in range(len(prompts))]

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], *, max_new_tokens: int) -> list[list[int]]:
        completions = []
        for start in range(0, len(prompts), self.batch_rows):
            out, width = self._generate(prompts[start:start + self.batch_rows], do_sample=False,
                                        max_new_tokens=max_new_tokens)
            completions += [cut_at_end(row, self.stop_ids) for row in out.sequences[:, width:].tolist()]
        return completions
