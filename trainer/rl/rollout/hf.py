"""Rollouts for GRPO: generation OUTSIDE context parallelism.

    policy (FSDP shards, CP attention) ──sync(): full weights gathered on every rank──> plain HF copy
    each rank: its own prompts ──plain copy.generate (KV cache, no collectives)──> completions + log-probs

Why a plain copy: generating with the FSDP/CP model would put collectives inside every decoding
step, and ranks whose completions end at different lengths would call forward a different number
of times and deadlock (the FSDP lock-step trap). The copy has the policy's exact weights (gathered
once per step, the only collective), runs transformers' own attention with a KV cache, and each
rank is free to stop when its sequences end. CP is for the training forward/backward.

Old log-probs: the log-softmax of the generation logits at temperature T, at the sampled tokens;
the training pass computes the new ones the same way (logits / T), so the first ratio is 1 up to
rounding. Precision: the copy computes in the training compute dtype (model.dtype): sync() loads
the fp32 master weights and its parameters are held in that dtype (buffers stay fp32, as under
FSDP2's param_dtype), so sampling and the training forward round the same way; an fp32 copy next
to a bf16 policy would be a different policy (old/new log-probs apart by ~1e-3 before any update).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from models.apply import plain_model
from trainer.modeling import cast_parameters


class HFRolloutEngine:
    def __init__(self, policy: torch.nn.Module, tokenizer, device: torch.device, *,
                 dtype: torch.dtype = torch.float32):
        """dtype: the training compute dtype (trainer.modeling.compute_dtype(cfg.model))."""
        self.dtype = dtype
        self.model = cast_parameters(plain_model(policy), dtype)
        self.model = self.model.to(device).eval()
        self.tokenizer, self.device = tokenizer, device
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() \
            else tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def sync(self, policy: torch.nn.Module) -> None:
        """Copy the policy's current weights (a collective: every rank calls it); load_state_dict casts
        the fp32 master weights to the copy's compute dtype."""
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
        self.model.load_state_dict(full, strict=True)

    def _cut(self, tokens: list[int]) -> list[int]:
        """Completion up to and including the first end-of-turn token."""
        return tokens[:tokens.index(self.eos_id) + 1] if self.eos_id in tokens else tokens

    @torch.no_grad()
    def sample(self, prompt_ids: list[int], n: int, *, max_new_tokens: int, temperature: float, top_p: float,
               seed: int) -> list[tuple[list[int], list[float]]]:
        """n sampled completions of one prompt: [(completion ids, log-prob of each token)]."""
        torch.manual_seed(seed)
        prompt = torch.tensor([prompt_ids] * n, device=self.device)  # same prompt: no padding needed
        out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                  temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                                  eos_token_id=self.eos_id, pad_token_id=self.pad_id, output_logits=True,
                                  return_dict_in_generate=True)
        tokens = out.sequences[:, prompt.shape[1]:]  # [n, T]
        logits = torch.stack(out.logits, dim=1).float() / temperature  # T x [n, V] -> [n, T, V]
        logp = F.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)  # [n, T]
        results = []
        for row_tokens, row_logp in zip(tokens.tolist(), logp.tolist()):
            kept = self._cut(row_tokens)
            results.append((kept, row_logp[:len(kept)]))
        return results

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], *, max_new_tokens: int) -> str:
        prompt = torch.tensor([prompt_ids], device=self.device)
        out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=max_new_tokens, eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        return self.decode(self._cut(out[0, prompt.shape[1]:].tolist()))

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
