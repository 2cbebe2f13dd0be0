"""The two workloads, as Runners: each config's step() processes S tokens on every rank.

    attention   random q/k/v [1, S, H, D] of packed documents (random lengths, causal), one
                cptrain attention call fwd+bwd (dout given) per micro-batch
    model       a Qwen3-style decoder (models.tiny's qwen3 config, widened so attention dominates
                at long S, every layer full attention), one document per row, fwd + loss + bwd
                under models.apply_cp (cp=1 baselines too: the same code path with one rank)

Equal work per step: at cp=c each CP group runs c micro-batches of S tokens (c sequences), so
every rank handles S tokens per step at every cp, and cp=1 is plain data parallelism (each rank
its own sequence). Inputs are made by prepare(S), outside the timed step.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import cp
import models
from models.tiny import tiny_config

@dataclass(frozen=True)
class Config:
    """One column of the sweep: a CP style at a degree, or a peer."""

    name: str  # e.g. "ulysses cp2", "cp1 sdpa"
    style: str  # ulysses | ring | hybrid (the cptrain style; peers: the style they implement)
    cp: int
    ulysses: int | None = None  # hybrid: the Ulysses degree (ring = cp / ulysses)
    peer: str | None = None  # None (cptrain) | "hf" (plain transformers, no CP) | "deepspeed" | "torch_cp"
    baseline: str = "cp1 sdpa"  # the cp=1 config with the same local kernel
    chunks: int = 1  # Ulysses' head-chunked pipelined all-to-alls (model.ulysses_chunks)

    @property
    def ring(self) -> int:
        return cp.get_style(self.style).degrees(self.cp, self.ulysses)[0]

    @property
    def ulysses_degree(self) -> int:
        return cp.get_style(self.style).degrees(self.cp, self.ulysses)[1]


@dataclass(frozen=True)
class AttentionShape:
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64


def packed_doc_lens(seq_len: int, seed: int) -> list[int]:
    """Random document lengths in [S/16, S/2] summing to S (the last one cut to fit)."""
    rng, lens = random.Random(seed), []
    while sum(lens) < seq_len:
        lens.append(min(rng.randint(max(1, seq_len // 16), max(1, seq_len // 2)), seq_len - sum(lens)))
    return lens


@dataclass
class _Micro:
    """One micro-batch of this rank: its shards and what its step needs."""

    params: cp.CPParams | None = None
    leaves: list[torch.Tensor] = field(default_factory=list)  # q, k, v shards (attention)
    dout: torch.Tensor | None = None
    ids: torch.Tensor | None = None  # full [1, S] (model)
    labels: torch.Tensor | None = None
    count: int = 0


class AttentionRunner:
    """cptrain attention (a style at a degree, or its cp=1 path) on packed random q/k/v."""

    def __init__(self, config: Config, dims: cp.ParallelDims, shape: AttentionShape, device, dtype):
        self.config, self.dims, self.shape, self.device, self.dtype = config, dims, shape, device, dtype
        self.fn = cp.get_style(config.style).attention
        self.micro: list[_Micro] = []

    def prepare(self, seq_len: int) -> None:
        H, Hkv, D = self.shape.heads, self.shape.kv_heads, self.shape.head_dim
        lens = packed_doc_lens(seq_len, seed=seq_len)
        self.micro = []
        for m in range(self.config.cp):
            gen = torch.Generator().manual_seed(seq_len * 1000 + self.dims.dp_rank * 10 + m)
            full = [torch.randn(1, seq_len, h, D, generator=gen, dtype=torch.float32) for h in (H, Hkv, Hkv, H)]
            ids = torch.zeros(1, seq_len, dtype=torch.long, device=self.device)
            params = cp.setup_cp_params(ids, self.dims, seq_lens=[lens]).params
            # [1, S, h, D] -> this rank's shard [1, S/cp, h, D]
            shards = [cp.shard(t.to(self.device, self.dtype), params) for t in full]
            leaves = [t.requires_grad_() for t in shards[:3]]
            self.micro.append(_Micro(params=params, leaves=leaves, dout=shards[3]))

    def step(self) -> None:
        for micro in self.micro:
            q, k, v = micro.leaves
            out = self.fn(q, k, v, micro.params, causal=True)
            out.backward(micro.dout)
            for leaf in micro.leaves:  # a real layer consumes dq/dk/dv and frees them
                leaf.grad = None

    def attention_calls(self) -> int:
        return len(self.micro)

    def release(self) -> None:
        self.micro = []


def model_config(*, hidden: int = 256, heads: int = 8, kv_heads: int = 2, head_dim: int = 64, intermediate: int = 512,
                 layers: int = 2, max_len: int = 65536, vocab: int | None = None):
    """models.tiny's qwen3 config, widened (attention H*D = 512 > hidden) and all layers full attention;
    vocab: the vocabulary size (default: the tiny config's)."""
    base = tiny_config("qwen3").to_dict()
    if vocab is not None:
        base.update(vocab_size=vocab)
    base.update(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                intermediate_size=intermediate, num_hidden_layers=layers, layer_types=["full_attention"] * layers,
                use_sliding_window=False, sliding_window=None, max_position_embeddings=max_len)
    return type(tiny_config("qwen3")).from_dict(base)


HF_SDPA = "bench_sdpa"  # transformers' own sdpa function under a name DeepSpeed's registration does not replace


def register_hf_sdpa() -> str:
    """Register transformers' sdpa attention function as HF_SDPA (no mask function: one document
    per row runs as is_causal, like "sdpa" without padding)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(HF_SDPA, sdpa_attention_forward)
    return HF_SDPA


def build_model(config, attn: str, device, dtype, seed: int = 0):
    """A fresh model with its OWN copy of `config` (HF models write their attention choice into it)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn)
    return model.to(device=device, dtype=dtype).train()


def lm_batch(seq_len: int, vocab: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Random ids [1, S] (one document), next-token labels (already shifted, -100 last), token count."""
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return ids.to(device), labels.to(device), seq_len - 1


def token_loss(logits: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """Sum of this rank's token losses / the GLOBAL token count (the ranks' losses sum to the mean)."""
    return F.cross_entropy(logits[0].float(), labels[0], ignore_index=-100, reduction="sum") / count


class ModelRunner:
    """The model under models.apply_cp (style at a degree, or the cp=1 path), fwd + loss + bwd;
    config.peer == "hf": the unmodified transformers model with its sdpa attention (no CP at all)."""

    def __init__(self, config: Config, dims: cp.ParallelDims, model_cfg, device, dtype):
        self.config, self.dims, self.device = config, dims, device
        if config.peer == "hf":
            self.model = build_model(model_cfg, register_hf_sdpa(), device, dtype)
            self.model.config.use_cache = False
        else:
            self.model = models.apply_cp(build_model(model_cfg, "sdpa", device, dtype), dims, attn="sdpa",
                                         chunks=config.chunks)
        self.vocab = model_cfg.vocab_size
        self.micro: list[_Micro] = []

    def prepare(self, seq_len: int) -> None:
        self.micro = []
        for m in range(self.config.cp):
            ids, labels, count = lm_batch(seq_len, self.vocab, seq_len * 1000 + self.dims.dp_rank * 10 + m, self.device)
            self.micro.append(_Micro(ids=ids, labels=labels, count=count))

    def step(self) -> None:
        self.model.zero_grad(set_to_none=False)  # gradient buffers stay: peak memory is activations
        for micro in self.micro:
            if self.config.peer == "hf":
                token_loss(self.model(input_ids=micro.ids).logits, micro.labels, micro.count).backward()
                continue
            batch = cp.setup_cp_params(micro.ids, self.dims, labels=micro.labels)
            out = self.model(input_ids=batch.input_ids, position_ids=batch.position_ids, cp_params=batch.params)
            token_loss(out.logits, batch.labels, micro.count).backward()

    def attention_calls(self) -> int:
        return len(self.micro) * self.model.config.num_hidden_layers

    def release(self) -> None:
        self.micro = []
        self.model.zero_grad(set_to_none=True)
