"""Typed Hydra configs shared by the SFT and GRPO trainers, and the one validation pass after compose.

    configs/{sft,rl}.yaml ─ defaults: [{sft,rl}_schema, model: ..., data: builtin, optim: adamw]
         │  hydra compose + command-line overrides (unknown keys / wrong types fail here, key named)
         v
    SFTConfig (dataclasses below) ── validate(cfg, world_size) ── before any collective
"""

from __future__ import annotations

from collections.abc import Mapping

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

import cp
from cp.layouts import pad_multiple

DTYPES = ("float32", "bfloat16")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoraConfig:
    rank: Optional[int] = None
    """LoRA rank r (null: full fine-tuning). With a rank the base weights are frozen and held in model.dtype (no
    fp32 master copy), the adapters are fp32 masters with AdamW state, and checkpoints hold only the adapters
    (models/adapters/lora.py; `pip install -e .[lora]` for peft)."""
    alpha: float = 16.0
    """LoRA alpha: the adapter's update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input. Must be 0 under model.cp > 1: PEFT draws a mask per rank's shard, so the
    numbers would differ from cp=1."""
    target_modules: Optional[list[str]] = None
    """Module names (PEFT target_modules: the last name components) that get adapters. null: every linear
    projection of the decoder layers (attention, MLP, the Gated DeltaNet / Mamba2 mixers' in/out projections),
    read from the model itself; MoE routers, experts held as 3D tensors, embeddings and the LM head excluded."""


@dataclass
class ModelConfig:
    name: str = "tiny:qwen3_5"
    """HF hub id or local path (from_pretrained), or "tiny:<family>" for a built-in random-init config
    (families: llama, qwen3, glm4_moe, gpt_oss, qwen3_5, qwen3_next, nemotron_h, bamba)."""
    cp: int = 2
    """Context-parallel degree: ranks that share one sequence. Must divide the world size."""
    cp_style: str = "ulysses"
    """ring | ulysses | hybrid (the registry in cp/styles.py)."""
    cp_ulysses: Optional[int] = None
    """hybrid only: the Ulysses degree (ring degree = cp / cp_ulysses)."""
    ulysses_chunks: int = 1
    """Ulysses only: split the heads into this many groups and pipeline the all-to-alls (group i+1's
    all-to-all runs while group i attends). Same numbers as 1; must be <= the KV heads and leave every
    group at least cp query heads. Helps where the network and the kernel can overlap (GPUs); see the
    benchmark in docs/benchmarks before raising it."""
    mixer_cp: str = "ulysses"
    """How the recurrent mixers (Gated DeltaNet, Mamba2) split the sequence: ulysses (an all-to-all of their
    activations to whole sequences of a head subset; linear heads % cp == 0) | state (every rank keeps its
    contiguous shard of every head; only each shard's recurrent state summary and a conv halo travel: no head
    limit, far fewer bytes at long sequences; cp/state_passing.py). Attention layers keep model.cp_style, which
    must be ulysses for hybrid models either way."""
    attn: str = "sdpa"
    """Inner attention kernel under CP: sdpa | eager | math | lse | flash_attention_2 | flash_attention_3 (CUDA),
    or a registered AttentionInterface name (Ulysses only). See models/attention.py."""
    dtype: str = "float32"
    """Compute dtype of forward/backward: float32 | bfloat16. Master weights, gradient reduction and AdamW
    state are fp32 either way (FSDP2 MixedPrecisionPolicy). float16 is refused (no loss scaling): use bfloat16."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward (HF gradient checkpointing, non-reentrant): a layer keeps
    only its input hidden states [S/cp, hidden] until backward."""
    activation_offload: bool = False
    """With activation_checkpointing: keep those checkpointed layer inputs in host memory (pinned; copied on
    a side stream on CUDA, overlapping compute) until the layer's recompute (models/memory/activation_offload.py)."""
    chunked_head: bool = True
    """LM-head loss, log-probs and entropy in chunks of tokens, recomputed in backward: the [S/cp, vocab]
    logits never exist in full (models/memory/chunked_head.py; exact). A family whose head does more than a linear
    layer + final logit softcap (Cohere's logit_scale) keeps full logits, with a warning at startup."""
    head_chunk_tokens: Optional[int] = None
    """Tokens per LM-head chunk; null: automatic (one chunk's fp32 logits, probabilities and gradient in about
    256 MiB: 640 tokens at a 32k vocabulary, 128 at 152k)."""
    tiled_mlp: bool = False
    """Run each decoder layer's MLP (dense or MoE) over token tiles, recomputed tile by tile in backward: its
    intermediate activations are O(tile) instead of O(S/cp) (models/memory/tiled_mlp.py; exact). Costs one more
    MLP forward per layer: turn it on when the MLP's [S/cp, intermediate] activations limit the length."""
    mlp_tile_tokens: Optional[int] = None
    """Tokens per MLP tile; null: automatic (ceil(S/cp / ceil(intermediate / hidden)), at least 256)."""
    cp_dynamic: bool = False
    """With data.max_tokens_per_rank: each micro-batch gets its own CP degree, the smallest divisor of model.cp
    whose ranks hold its longest document within the budget (a short document runs whole on one rank, a long
    one is split over 2, 4, ... ranks of its cp group; process groups for every degree are built at startup).
    Same loss and gradients as static CP. ulysses or ring only (trainer/planning/token_budget.py)."""
    lora: LoraConfig = field(default_factory=lambda: LoraConfig())
    """LoRA adapters (peft) instead of full fine-tuning; see LoraConfig."""
    tiny_hidden_size: int = 128
    """tiny:* models only: hidden size."""
    tiny_layers: int = 4
    """tiny:* models only: number of decoder layers."""


@dataclass
class DataConfig:
    source: str = "builtin"
    """builtin (bundled chat data) | a local .jsonl/.json/.parquet path | an HF datasets name."""
    tokenizer: str = "auto"
    """auto (tiny:* models: builtin; any other model: the model's own tokenizer, from model.name) | builtin
    (bundled byte-level BPE) | HF id or local path. Checked against the model's embedding table at startup."""
    chat_template: Optional[str] = None
    """A Jinja file that replaces the tokenizer's chat template (SFT rows, RL prompts and episodes), e.g. one that
    renders earlier turns unchanged, which multi-turn episodes need (null: the tokenizer's own)."""
    seq_len: int = 512
    """Tokens per packed row (documents packed, a pad document fills the rest)."""
    micro_batch_size: int = 1
    """Rows per micro-batch on each data-parallel replica."""
    max_tokens_per_rank: Optional[int] = None
    """Token-budget micro-batches instead of fixed rows: each step's documents (the same ones the fixed rows would
    hold: micro_batch_size x seq_len x dp x grad_accum tokens; GRPO: the step's rollouts) are planned into
    micro-batches of at most this many tokens per rank, balanced across all dp x cp ranks by estimated cost
    (tokens and attention's length^2). Must hold a data.seq_len document on model.cp ranks. null: fixed rows."""
    limit: Optional[int] = None
    """Use only the first N records of the source."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: str = "cosine"
    """cosine | linear | constant, after warmup."""
    warmup_steps: int = 5
    """Linear warmup steps from 0 to lr."""
    min_lr_ratio: float = 0.1
    """Final lr as a fraction of the peak (cosine and linear)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = grad_accum * micro_batch_size * dp)."""


@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline (default, writes output_dir/wandb) | online | disabled."""
    project: str = "cptrain"
    """W&B project."""
    name: Optional[str] = None
    """Run name (default: the output_dir's name)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save a torch.distributed.checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Keep the newest N complete checkpoints, delete older ones once a new one is complete (0: keep all)."""
    timeout_s: int = 3600
    """How long ranks wait for the slowest one's checkpoint write and for rank 0's HF export (a large model takes
    minutes); the top-level timeout_s guards every other collective."""
    export_hf: bool = True
    """At the end, also write output_dir/hf: safetensors + config + tokenizer, loadable by from_pretrained."""
    export_merged: bool = False
    """With model.lora.rank: also write output_dir/hf with the adapters merged into full weights (the adapter
    itself is always exported, to output_dir/adapter, when export_hf is on). Needs an fp32 export
    (checkpoint.export_dtype=float32 unless model.dtype is float32): bf16 rounds a small update away."""
    export_dtype: Optional[str] = None
    """dtype of the HF export's weights: float32 | bfloat16 | float16 (null: model.dtype, the compute dtype).
    Checkpoints always hold the fp32 master weights."""


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    max_steps: int = 60
    """Optimizer steps to run (in total, counting resumed ones)."""
    seed: int = 0
    """Seed for model init, data order and sampling."""
    output_dir: str = "outputs/sft"
    """Where metrics.jsonl, checkpoints, the HF export and W&B files go."""
    resume: bool = False
    """Continue from the latest complete checkpoint in output_dir. Config changes: lr, schedule, warmup,
    max_steps, clipping, AdamW settings, batch size, logging are honoured; the model, cp layout, data,
    seq_len, seed, world size (trainer.run.checkpoint.RESUME_REFUSED) are refused with the diff."""
    overwrite: bool = False
    """A fresh run (resume=false) into an output_dir holding checkpoints is refused unless true: then the old
    checkpoints, metrics/samples and HF export are deleted first."""
    log_every: int = 1
    """W&B and the progress bar's numbers every N steps (and the last); metrics.jsonl gets every step."""
    timeout_s: int = 300
    """Collective timeout: if a rank dies, the others fail with an error within this many seconds."""


ROLLOUT_ENGINES = ("hf", "vllm")
LORA_SYNCS = ("adapter", "merged")
OLD_LOGPROBS = ("engine", "trainer")
IS_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass
class VLLMConfig:
    """rollout.engine=vllm: where the vLLM servers come from and how weights reach them."""

    urls: list[str] = field(default_factory=list)
    """Existing servers (http://host:port, or unix:/path/to/socket for one started with --uds), started with the
    flags trainer/rl/rollout/vllm_server.py ServerSpec lists; requests are spread over them (data-parallel
    inference). Empty: rank 0 starts and owns one server."""
    python: Optional[str] = None
    """The python of the vLLM environment (null: $CPTRAIN_VLLM_PYTHON, else .venv-vllm from scripts/install_vllm.sh)."""
    model: Optional[str] = None
    """What the owned server loads at startup (null: model.name; a tiny:* model's initial weights are exported
    first). Only its architecture, config and tokenizer matter: the policy's weights are synced before step 1."""
    expose_control_plane: bool = False
    """false: the owned server listens only on a Unix socket in a directory private to this run (mode 0700): no
    other user of the host and no other host can reach it. true: it listens on TCP rollout.vllm.host:port, and
    anyone who reaches that address can replace the policy's weights, pause generation and read the sampled tokens
    (vLLM's dev-mode endpoints have no authentication; --api-key guards only /v1/*); needed for ranks on other
    nodes. Use it on a network (and a host) you trust."""
    host: str = "127.0.0.1"
    """Interface the owned server binds, with rollout.vllm.expose_control_plane=true only (loopback: every local
    user reaches it; another address: every host that routes to it)."""
    port: int = 0
    """TCP port of the owned server, with rollout.vllm.expose_control_plane=true only (0: a free one)."""
    gpu_memory_utilization: float = 0.15
    """vLLM's --gpu-memory-utilization: the share of the server's GPU memory for weights + KV cache (on a GPU
    ~0.85 of a GPU of its own); on CPU the share of host memory for the KV cache (0.15 fits 24 GB hosts)."""
    enforce_eager: bool = True
    """No CUDA graphs (vLLM's --enforce-eager): required on CPU (no triton-cpu); on GPUs false is faster."""
    startup_timeout_s: int = 600
    """How long the owned server may take to become healthy (a 135M model on CPU: ~40 s)."""
    request_timeout_s: int = 900
    """One generate request (a whole group of samples) may take this long before the step fails."""
    max_concurrent_requests: int = 64
    """Requests in flight per trainer rank (each is one prompt's group)."""
    sync_dir: Optional[str] = None
    """Directory the weight buckets pass through, readable by the server (null: /dev/shm, else the temp dir;
    a shared filesystem for servers on other nodes)."""
    sync_bucket_mb: float = 256.0
    """Weights gathered and sent per bucket: rank 0 holds at most this much beyond its shard."""
    lora_sync: str = "adapter"
    """With model.lora.rank: `adapter` (only the adapters travel after a step: the server runs vLLM's LoRA with the
    frozen base, each version loaded as an adapter of its own, requests name it) or `merged` (W + scale B A sent
    as full weights, for servers or targets vLLM's LoRA does not cover)."""
    extra_args: list[str] = field(default_factory=list)
    """More command-line flags for the owned server (e.g. ["--tensor-parallel-size", "2"])."""
    env: dict[str, str] = field(default_factory=dict)
    """More environment for the owned server (e.g. {CUDA_VISIBLE_DEVICES: "7"}). On a CPU host the server's OpenMP
    threads are bound to every core by default (VLLM_CPU_OMP_THREADS_BIND): the trainer waits while it generates."""


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    """Prompts per optimizer step over all ranks (split across them for generation)."""
    group_size: int = 8
    """Completions sampled per prompt (the GRPO group)."""
    max_new_tokens: int = 32
    """Generation budget per completion."""
    temperature: float = 1.0
    """Sampling temperature (log-probs for the ratio use the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling threshold. Below 1 every log-prob the loss compares (engine, policy, old, reference) is of
    the truncated, renormalised distribution the engine sampled from (models/nucleus.py), not the full softmax."""
    env: str = "single_turn"
    """The environment episodes run in (trainer/rl/envs): single_turn (one model turn per prompt, scored by
    reward.functions: GRPO on prompts), a built-in (calculator: a calculate tool; guess_number: feedback over
    turns; long_doc: long tool results; retry: another attempt after a wrong answer, on the prompts), or an
    importable "pkg.mod:Class" with reset / step / reward (trainer/rl/envs/base.py). calculator, guess_number and
    long_doc bring their own task rows (with data.source=builtin)."""
    env_args: dict = field(default_factory=dict)
    """Keyword arguments of the environment's constructor (one instance per episode)."""
    max_turns: int = 8
    """Model turns per episode; an episode still going after them is truncated."""
    max_episode_tokens: Optional[int] = None
    """The prompt and every later token of an episode (the document the trainer packs; null: data.seq_len). A turn
    or a reply that would pass it truncates the episode."""
    truncated: str = "keep"
    """What a truncated episode (max_new_tokens, max_turns or max_episode_tokens reached) trains on: keep (as it is,
    its reward as scored), mask (no loss on its tokens; it still counts in its group's advantages) or
    overlong_penalty (DAPO's soft overlong punishment: the reward falls linearly over the last
    rollout.overlong_buffer tokens of the budget, -1 past it)."""
    overlong_buffer: Optional[int] = None
    """DAPO's L_cache for rollout.truncated=overlong_penalty (null: a quarter of the episode's budget after the
    prompt)."""
    max_failed_episodes: float = 0.25
    """The share of a step's episodes whose environment may raise (each is dropped and counted) before the step
    fails naming the environment and the task."""
    log_episodes: int = 2
    """Episodes per step written to output_dir/rollouts.jsonl (rank 0's first ones: messages, token ids, loss mask,
    engine log-probs, versions, reward parts, turns, truncation); 0: none."""
    task: str = "arithmetic"
    """data.source=builtin only: the built-in task the prompts come from (trainer.rl.tasks.TASKS: add, sub, mul,
    reverse, sort, arithmetic, mixed)."""
    eval_prompts: int = 64
    """Held-out prompts scored greedily at the start and the end (0 disables). builtin: every task of the mix in
    equal shares, never in the training prompt pool; a user dataset: its LAST eval_prompts rows (not trained on)."""
    eval_every: int = 0
    """Also score the held-out prompts every N steps (0: only at the start and the end); output_dir/eval.jsonl
    gets (step, accuracy, seconds since the run started) for every eval."""
    system_prompt: Optional[str] = None
    """User datasets only: a system message put before each text `prompt` (null: none; `messages` rows keep theirs).
    Built-in tasks always use trainer.rl.tasks.SYSTEM_PROMPT."""
    skip_zero_advantage: Optional[bool] = None
    """Drop groups whose rewards are all equal (zero advantage: no policy gradient) before the backward.
    null: the loss's default (true for loss.type=dapo, its dynamic sampling; false otherwise)."""
    timeout_s: int = 1800
    """How long ranks wait for the slowest one to finish generating (rollouts, eval); timeout_s guards the rest."""
    engine: str = "hf"
    """hf: transformers.generate on a plain copy of the policy on every rank (no dependency); vllm: vLLM servers
    (rollout.vllm.*; scripts/install_vllm.sh), no copy on the trainer ranks."""
    old_logprobs: str = "engine"
    """The log-probs the importance ratio divides by. engine: the sampling engine's own (the ratio also absorbs
    the engine-trainer mismatch); trainer: the policy's own at the sampling weights (the training forward's,
    detached: the ratio is exactly 1 at the first update), the mismatch corrected by rollout.is_correction."""
    is_correction: str = "none"
    """rollout.old_logprobs=trainer: importance-sampling weight w = p_trainer / p_engine on the loss, per token
    or per sequence (the product over its tokens); truncate: min(w, is_cap); mask: 0 where w > is_cap or
    w < 1 / is_cap. none: no weight."""
    is_cap: float = 3.0
    """The cap of rollout.is_correction (TRL's default)."""
    max_off_policy_steps: int = 0
    """Async GRPO (trainer/rl/async_rollouts.py): the engine generates up to k steps ahead while the trainer trains,
    from weights at most k versions older than the policy that trains on them (a group with an older rollout is
    dropped and counted); weights reach the engine after every optimizer step with its requests in flight (their
    later tokens carry the new version). 0: the synchronous loop. Needs rollout.engine=vllm."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class RewardConfig:
    functions: list[str] = field(default_factory=lambda: ["correctness", "consistency", "format"])
    """Built-in rewards (correctness, similarity, restate, consistency, format; trainer/rl/tasks.py) or importable
    "pkg.mod:fn" callables: batched fn(prompts, completions, **columns) -> list[float] (every dataset column as a
    keyword list), or per-sample fn(prompt, completion, answer) -> float. On a user dataset (data.source),
    correctness and similarity read the final answer in the usual conventions (trainer.rl.tasks.extract_final_answer);
    on the built-in tasks only <answer>...</answer> counts."""
    weights: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.2])
    """Weight of each reward function in the total reward."""


@dataclass
class LossConfig:
    type: str = "grpo"
    """Policy loss (trainer/rl/policy_losses.py): grpo | dr_grpo (no std scaling, constant normaliser) | dapo (token-level,
    clip-higher, drops all-equal-reward groups) | gspo (sequence-level importance ratio)."""
    clip_eps_low: float = 0.2
    """Lower clip of the importance ratio: 1 - clip_eps_low."""
    clip_eps_high: float = 0.28
    """Upper clip of the importance ratio: 1 + clip_eps_high."""
    kl_coef: float = 0.0
    """KL penalty to the frozen initial policy (k3 estimator); 0 builds no reference model."""
    normalization: str = "token"
    """loss.type=grpo only: token: mean over all completion tokens of the step; sequence: mean over sequences of
    their token mean. (dr_grpo, dapo and gspo fix their own normaliser.)"""
    scale_advantages: bool = True
    """Divide group-centred rewards by the group's std (GRPO); false keeps only the centring. dr_grpo never scales."""


@dataclass
class RLConfig(SFTConfig):
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="sft_schema", node=SFTConfig)
    cs.store(name="rl_schema", node=RLConfig)


# cp's argument names -> this trainer's config keys
CP_ARGUMENT_KEYS = {"cp": "model.cp", "cp_style": "model.cp_style", "cp_ulysses": "model.cp_ulysses",
                    "chunks": "model.ulysses_chunks", "attn": "model.attn", "mixer_cp": "model.mixer_cp"}


def in_config_terms(message: str, names=tuple(CP_ARGUMENT_KEYS)) -> str:
    """A cp message with the arguments `names` (whole words: `cp_style=ring`, "lower cp") as config keys."""
    names = [name for name in names if name in CP_ARGUMENT_KEYS]
    if not names:
        return message
    pattern = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, names)) + r")(?!\w)")
    return pattern.sub(lambda match: CP_ARGUMENT_KEYS[match.group(1)], message)


@contextlib.contextmanager
def cp_errors_in_config_terms():
    """Re-raise a cp.CPConfigError (cp's terms: "cp=3 ... change cp") as a ValueError in this trainer's config
    keys ("model.cp=3 ... change model.cp"): the arguments the error names are translated."""
    try:
        yield
    except cp.CPConfigError as exc:
        raise ValueError(in_config_terms(str(exc), exc.names)) from exc


def cp_pad_multiple(m) -> int:
    """The smallest sequence length every rank of model.cp / cp_style gets an equal shard of."""
    style = cp.get_style(m.cp_style)
    ring, ulysses = style.degrees(m.cp, m.cp_ulysses)
    return pad_multiple(style.shard_levels(style.default_layout, ring, ulysses))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def validate_common(cfg, world_size: int) -> None:
    """Checks shared by SFT and RL; raise ValueError naming the key and the fix, before any collective."""
    m, o = cfg.model, cfg.optim
    _check(cfg.max_steps >= 1, f"max_steps={cfg.max_steps} must be >= 1")
    with cp_errors_in_config_terms():  # the degrees, checked by the style's registry entry (cp.styles)
        cp.ParallelDims(world_size=world_size, cp=m.cp, cp_style=m.cp_style, cp_ulysses=m.cp_ulysses)
    _check(m.ulysses_chunks >= 1, f"model.ulysses_chunks={m.ulysses_chunks} must be >= 1 (1: no pipelining)")
    _check(m.mixer_cp in ("ulysses", "state"), f"model.mixer_cp={m.mixer_cp!r}: choose ulysses or state")
    for key in ("head_chunk_tokens", "mlp_tile_tokens"):
        value = m[key]
        _check(value is None or value >= 1, f"model.{key}={value} must be >= 1 (tokens), or null for automatic")
    _check(not m.activation_offload or m.activation_checkpointing,
           "model.activation_offload=true offloads the inputs of checkpointed layers: set "
           "model.activation_checkpointing=true too")
    _check(m.dtype != "float16", "model.dtype=float16 is not supported: fp16 gradients underflow or overflow "
                                 "without loss scaling, which cptrain does not do. Use model.dtype=bfloat16 "
                                 "(same memory and speed, fp32's exponent range); checkpoint.export_dtype=float16 "
                                 "still exports fp16 weights")
    _check(m.dtype in DTYPES, f"model.dtype={m.dtype!r}: choose one of {DTYPES}")
    template = cfg.data.chat_template
    _check(template is None or os.path.isfile(template), f"data.chat_template={template} is not a file (a Jinja chat "
                                                         "template)")
    export = cfg.checkpoint.export_dtype
    _check(export is None or export in EXPORT_DTYPES,
           f"checkpoint.export_dtype={export!r}: choose one of {EXPORT_DTYPES} or null (= model.dtype)")
    merged_dtype = export or m.dtype
    _check(not (cfg.checkpoint.export_hf and cfg.checkpoint.export_merged and m.lora.rank is not None)
           or merged_dtype == "float32",
           f"checkpoint.export_merged=true writes W + scale B A in {merged_dtype}: rounded into that dtype, most of a "
           "small adapter update is lost (the export would not be the trained policy). Set "
           "checkpoint.export_dtype=float32, or use the adapter export (output_dir/adapter, always written)")
    _check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _check(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r}: choose one of {SCHEDULES}")
    _check(o.warmup_steps >= 0 and o.grad_accum >= 1, "optim.warmup_steps must be >= 0 and optim.grad_accum >= 1")
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables)")
    _check(cfg.wandb.mode in WANDB_MODES, f"wandb.mode={cfg.wandb.mode!r}: choose one of {WANDB_MODES}")
    _check(cfg.timeout_s >= 10, f"timeout_s={cfg.timeout_s} must be >= 10")
    _check(cfg.log_every >= 1, f"log_every={cfg.log_every} must be >= 1")
    _check(not (cfg.resume and cfg.overwrite), "resume=true continues the run in output_dir and overwrite=true "
                                               "deletes it: set one of them")
    lora = m.lora
    if lora.rank is not None:
        _check(lora.rank >= 1, f"model.lora.rank={lora.rank} must be >= 1 (null: full fine-tuning)")
        _check(lora.alpha > 0, f"model.lora.alpha={lora.alpha} must be > 0")
        _check(0 <= lora.dropout < 1, f"model.lora.dropout={lora.dropout} must be in [0, 1)")
        _check(lora.dropout == 0 or m.cp == 1,
               f"model.lora.dropout={lora.dropout} with model.cp={m.cp}: PEFT's dropout draws its mask on each "
               "rank's shard of the sequence, so a cp>1 run would not be the cp=1 run. Set model.lora.dropout=0 "
               "(or model.cp=1)")
        _check(lora.target_modules is None or len(lora.target_modules) > 0,
               "model.lora.target_modules=[] adapts nothing: name modules, or null for every projection")
    c = cfg.checkpoint
    _check(c.every >= 0 and c.keep_last >= 0,
           f"checkpoint.every={c.every} and checkpoint.keep_last={c.keep_last} must be >= 0 "
           "(0: only at the end / keep all)")
    _check(c.timeout_s >= 10, f"checkpoint.timeout_s={c.timeout_s} must be >= 10")


def validate_sft(cfg, world_size: int) -> None:
    validate_common(cfg, world_size)
    d, m = cfg.data, cfg.model
    _check(d.micro_batch_size >= 1, f"data.micro_batch_size={d.micro_batch_size} must be >= 1")
    multiple = cp_pad_multiple(m)
    _check(d.seq_len >= multiple,
           f"data.seq_len={d.seq_len} is shorter than the {multiple} shards model.cp={m.cp} ({m.cp_style}) needs")
    validate_token_budget(cfg)


def validate_token_budget(cfg) -> None:
    """data.max_tokens_per_rank and model.cp_dynamic: a budget that holds the longest document, a one-level
    style for dynamic degrees."""
    d, m = cfg.data, cfg.model
    budget = d.max_tokens_per_rank
    _check(not m.cp_dynamic or budget is not None,
           "model.cp_dynamic=true picks each micro-batch's CP degree from its length against a token budget: set "
           "data.max_tokens_per_rank too")
    if budget is None:
        return
    _check(budget >= 1, f"data.max_tokens_per_rank={budget} must be >= 1 (tokens per rank per micro-batch), or "
                        "null for fixed rows")
    need = -(-d.seq_len // m.cp)
    _check(budget >= need, f"data.max_tokens_per_rank={budget} cannot hold a data.seq_len={d.seq_len} document on "
                           f"model.cp={m.cp} ranks: raise it to >= {need}, raise model.cp, or lower data.seq_len")
    _check(not m.cp_dynamic or not cp.get_style(m.cp_style).two_level,
           f"model.cp_dynamic=true splits the cp group into smaller groups of one style; model.cp_style="
           f"{m.cp_style} has two levels: use model.cp_style=ulysses or ring")


def _validate_builtin_prompts(cfg) -> None:
    """data.source=builtin: prompts come from rollout.task; keys only a dataset uses are refused."""
    r = cfg.rollout
    _check(cfg.data.limit is None, f"data.limit={cfg.data.limit} is not used with data.source=builtin (GRPO draws "
                                   "rollout.task prompts): remove it, or set data.source to a prompt dataset")
    _check(r.system_prompt is None, "rollout.system_prompt is only used with a user prompt dataset (data.source): "
                                    "the built-in tasks use trainer.rl.tasks.SYSTEM_PROMPT; remove it")
    from trainer.rl.envs import resolve_env
    if hasattr(resolve_env(r.env), "make_rows"):  # a built-in environment brings its own task rows
        _check(r.task == RolloutConfig.task, f"rollout.task={r.task} is not used with rollout.env={r.env}, which makes "
                                             "its own task rows: remove it")
        return
    from trainer.rl.tasks import TASKS, task_components
    _check(r.task in TASKS, f"rollout.task={r.task!r}: choose one of {', '.join(TASKS)}")
    parts = task_components(r.task)
    _check(r.eval_prompts == 0 or r.eval_prompts >= len(parts),
           f"rollout.eval_prompts={r.eval_prompts} must be 0 (no eval) or >= {len(parts)}, one per task of "
           f"rollout.task={r.task} ({', '.join(parts)})")


def validate_rl(cfg, world_size: int) -> None:
    validate_sft(cfg, world_size)
    r, l, w = cfg.rollout, cfg.loss, cfg.reward
    _check(r.prompts_per_step >= 1 and r.prompts_per_step % world_size == 0,
           f"rollout.prompts_per_step={r.prompts_per_step} must be a positive multiple of the world size {world_size} "
           "(every rank generates for the same number of prompts)")
    _check(r.group_size >= 2, f"rollout.group_size={r.group_size} must be >= 2 (advantages compare a group)")
    _check(r.max_new_tokens >= 1 and r.temperature > 0 and 0 < r.top_p <= 1,
           "rollout.max_new_tokens >= 1, rollout.temperature > 0 and 0 < rollout.top_p <= 1 are required")
    _check(l.normalization in ("token", "sequence"), f"loss.normalization={l.normalization!r}: token or sequence")
    validate_episodes(cfg)
    from trainer.rl.policy_losses import POLICY_LOSSES
    _check(l.type in POLICY_LOSSES, f"loss.type={l.type!r}: choose one of {', '.join(POLICY_LOSSES)}")
    _check(l.type == "grpo" or l.normalization == "token",
           f"loss.normalization={l.normalization} is only used by loss.type=grpo; loss.type={l.type} fixes its own "
           "normaliser (trainer/rl/policy_losses.py): remove the override")
    _check(l.clip_eps_low > 0 and l.clip_eps_high > 0 and l.kl_coef >= 0, "loss clip eps must be > 0, kl_coef >= 0")
    _check(len(w.functions) == len(w.weights), f"reward.functions ({len(w.functions)}) and reward.weights "
                                                f"({len(w.weights)}) must pair up")
    _check(len(w.functions) > 0 or r.env != "single_turn", "reward.functions is empty: rollout.env=single_turn has "
                                                           "no reward of its own; name at least one reward")
    _check(cfg.optim.grad_accum == 1,
           f"optim.grad_accum={cfg.optim.grad_accum} is not used by GRPO: a step trains on all its "
           "rollout.prompts_per_step x rollout.group_size completions (in as many micro-batches of "
           "data.micro_batch_size rows as they need); raise rollout.prompts_per_step for a larger step")
    if cfg.data.source == "builtin":
        _validate_builtin_prompts(cfg)
    else:
        _check(r.eval_prompts >= 0, f"rollout.eval_prompts={r.eval_prompts} must be >= 0 (0: no eval)")
        _check(cfg.data.limit is None or cfg.data.limit > r.eval_prompts,
               f"data.limit={cfg.data.limit} leaves no training rows after the last rollout.eval_prompts="
               f"{r.eval_prompts} rows held out for eval: raise data.limit or lower rollout.eval_prompts")
    _check(r.timeout_s >= 10, f"rollout.timeout_s={r.timeout_s} must be >= 10")
    _check(r.eval_every >= 0, f"rollout.eval_every={r.eval_every} must be >= 0 (0: start and end only)")
    validate_rollout_engine(cfg, world_size)
    prompt_budget = cfg.data.seq_len - r.max_new_tokens
    _check(prompt_budget >= 16, f"data.seq_len={cfg.data.seq_len} leaves {prompt_budget} tokens for the prompt after "
                                f"rollout.max_new_tokens={r.max_new_tokens}: raise data.seq_len")


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def validate_episodes(cfg) -> None:
    """rollout.env and the episode keys."""
    from trainer.rl.envs import resolve_env
    from trainer.rl.rollouts import TRUNCATION_POLICIES
    r = cfg.rollout
    resolve_env(r.env)  # ValueError naming rollout.env
    _check(r.max_turns >= 1, f"rollout.max_turns={r.max_turns} must be >= 1")
    _check(r.max_episode_tokens is None or r.max_episode_tokens <= cfg.data.seq_len or cfg.data.max_tokens_per_rank,
           f"rollout.max_episode_tokens={r.max_episode_tokens} is longer than a packed row (data.seq_len="
           f"{cfg.data.seq_len}): raise data.seq_len, or plan long episodes with data.max_tokens_per_rank (a document "
           "longer than a rank's share is split over the CP group)")
    _check(r.truncated in TRUNCATION_POLICIES,
           f"rollout.truncated={r.truncated!r}: choose one of {', '.join(TRUNCATION_POLICIES)}")
    _check(r.overlong_buffer is None or (r.truncated == "overlong_penalty" and r.overlong_buffer >= 1),
           f"rollout.overlong_buffer={r.overlong_buffer} is used only with rollout.truncated=overlong_penalty, and "
           "must be >= 1")
    _check(0 <= r.max_failed_episodes < 1, f"rollout.max_failed_episodes={r.max_failed_episodes} must be in [0, 1)")
    _check(r.log_episodes >= 0, f"rollout.log_episodes={r.log_episodes} must be >= 0")
    _check(isinstance(r.env_args, Mapping), "rollout.env_args must be a mapping of keyword arguments")


def validate_rollout_engine(cfg, world_size: int) -> None:
    """rollout.engine, old_logprobs, is_correction and the vllm keys."""
    r, v = cfg.rollout, cfg.rollout.vllm
    _check(r.engine in ROLLOUT_ENGINES, f"rollout.engine={r.engine!r}: choose one of {ROLLOUT_ENGINES}")
    _check(r.old_logprobs in OLD_LOGPROBS, f"rollout.old_logprobs={r.old_logprobs!r}: choose one of {OLD_LOGPROBS}")
    _check(r.is_correction in IS_CORRECTIONS,
           f"rollout.is_correction={r.is_correction!r}: choose one of {IS_CORRECTIONS}")
    _check(r.is_correction == "none" or r.old_logprobs == "trainer",
           f"rollout.is_correction={r.is_correction} weighs the loss by p_trainer / p_engine, which needs the "
           "trainer's own old log-probs: set rollout.old_logprobs=trainer (with old_logprobs=engine the ratio "
           "already divides by the engine's)")
    _check(r.is_cap > 1, f"rollout.is_cap={r.is_cap} must be > 1")
    _check(r.max_off_policy_steps >= 0, f"rollout.max_off_policy_steps={r.max_off_policy_steps} must be >= 0 "
                                         "(0: synchronous; k: rollouts at most k weight versions old)")
    _check(r.max_off_policy_steps == 0 or r.old_logprobs == "engine" or r.is_correction != "none",
           f"rollout.max_off_policy_steps={r.max_off_policy_steps} with rollout.old_logprobs=trainer and "
           "rollout.is_correction=none trains lagged and in-flight tokens as on-policy (the ratio is then 1 for "
           "rollouts sampled by older weights): set rollout.is_correction (token_truncate, ...) or "
           "rollout.old_logprobs=engine")
    _check(r.max_off_policy_steps == 0 or r.engine == "vllm",
           f"rollout.max_off_policy_steps={r.max_off_policy_steps} generates while the trainer trains, in another "
           "process: set rollout.engine=vllm (the hf engine generates on the trainer ranks themselves)")
    if r.engine != "vllm":
        return
    _check(0 < v.gpu_memory_utilization <= 1, f"rollout.vllm.gpu_memory_utilization={v.gpu_memory_utilization} "
                                              "must be in (0, 1]")
    _check(v.startup_timeout_s >= 10 and v.request_timeout_s >= 1,
           "rollout.vllm.startup_timeout_s must be >= 10 and rollout.vllm.request_timeout_s >= 1")
    _check(v.sync_bucket_mb > 0 and v.max_concurrent_requests >= 1,
           "rollout.vllm.sync_bucket_mb must be > 0 and rollout.vllm.max_concurrent_requests >= 1")
    _check(0 <= v.port < 65536, f"rollout.vllm.port={v.port} must be a port number (0: a free one)")
    _check(v.lora_sync in LORA_SYNCS, f"rollout.vllm.lora_sync={v.lora_sync!r}: choose one of {LORA_SYNCS}")
    _check(v.lora_sync != "merged" or cfg.model.lora.rank is None or cfg.model.dtype == "float32",
           f"rollout.vllm.lora_sync=merged with model.dtype={cfg.model.dtype}: W + scale B A rounded into a "
           f"{cfg.model.dtype} base loses most of an early adapter update, so vLLM would sample from another policy "
           "than the trainer's: use rollout.vllm.lora_sync=adapter (the adapters unmerged, as the trainer runs them)")
    for url in v.urls:
        _check(re.match(r"^(https?://[^/]+(:\d+)?/?|unix:/.+)$", url) is not None,
               f"rollout.vllm.urls: {url!r} is neither http(s)://host:port nor unix:/path/to/socket")
    if v.urls:
        return
    _check(v.expose_control_plane or (v.host == "127.0.0.1" and v.port == 0),
           f"rollout.vllm.host={v.host} / port={v.port} would be ignored: the owned server listens on a Unix socket "
           "in a directory private to the run (its unauthenticated control plane reachable by this run only); set "
           "rollout.vllm.expose_control_plane=true to serve TCP on host:port instead, on a network you trust")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if local_world < world_size:
        _check(v.expose_control_plane and not is_loopback(v.host),
               f"an owned vLLM server is unreachable from the other nodes' ranks (LOCAL_WORLD_SIZE={local_world} of "
               f"WORLD_SIZE={world_size}): it listens on a Unix socket on rank 0's node (or on loopback "
               f"rollout.vllm.host={v.host}). Start servers yourself and list them in rollout.vllm.urls, or set "
               "rollout.vllm.expose_control_plane=true with rollout.vllm.host an address of rank 0's node that every "
               "node reaches")
