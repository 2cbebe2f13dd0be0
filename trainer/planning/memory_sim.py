"""One training step's activation memory per rank, simulated on the meta device: no weights, no compute.

trainer.plan's engine. The step is the trainer's own code path, run for shapes only:

    model config ── from_config on meta, parameters in the compute dtype ──> models.apply_cp (the style) ──>
        trainer.modeling.install_long_context (chunked head, tiled MLP, checkpointing, offload: model.* keys)
    fake_world(W): torch's "fake" process group of W ranks in this one process (this process is rank 0;
        collectives return at once: shapes are all a simulation needs)
    cp.setup_cp_params(real token ids) ──> CPParams on CPU, real (document boundaries, shard indices)
    MetaMemory (a TorchDispatchMode) around fwd + loss + bwd (trainer.loss, SFT or GRPO):
        floating-point tensors live on meta: every new storage is counted until its last reference dies
        integer / bool tensors stay real on CPU (positions, document ids, indices keep their values); they
            are moved to meta only when an op mixes them with meta tensors
        a copy to the host (activation offload) leaves the device: not counted
        torch's SDPA on meta would take the math path (S x S probabilities): it runs as the flash kernel
            (q, k, v, out and the log-sum-exp saved), which is what the CPU and CUDA flash kernels keep; the
            ring's block kernel likewise (out, lse per block; the CPU ring's explicit block masks are not
            what a GPU run allocates); DeltaNet / Mamba2 scans likewise as their fused kernels (fla,
            mamba-ssm, causal-conv1d: output and the buffers they keep), or op by op as the CPU twins
        parameter gradients are dropped once accumulated (FSDP2 reduce-scatters and frees each layer's
            unsharded gradient; the sharded fp32 gradients are counted by trainer.plan, not here)
    -> StepMemory: the peak bytes allocated during the step above its start, split by what was live then:
           logits      tensors [..., vocab] (logits, their gradient, the LM-head chunk buffers) and [vocab, hidden]
                       (the chunked head's fp32 head-weight gradient accumulator)
           attention   allocated inside a CP attention call or its backward (all-to-all / ring buffers, the
                       kernel's saved q, k, v, out, log-sum-exp, their gradients)
           activations everything else (the layers' saved tensors, MLP intermediates, checkpointed inputs)

What the peak measures is what scripts/bench/measure.py PeakMemory measures on a real step (the bytes
allocated during the step and still live, weights and gradient buffers excluded), so the two are compared in
tests/test_plan.py. Not simulated: allocator caching and fragmentation, CUDA workspaces, NCCL buffers.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

import cp
import cp.ring
import models
from cp.documents import IGNORE_INDEX
from cp.masks import acc_dtype
from trainer.loss import shard_logprobs, shard_loss_sum

META = torch.device("meta")
CATEGORIES = ("activations", "attention", "logits")


@dataclass(frozen=True)
class StepMemory:
    """Peak bytes of one step per rank (above its start) and their split at the peak."""

    peak: int
    activations: int
    attention: int
    logits: int


def _floating(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _factory_stays_on_cpu(func, args, kwargs) -> bool:
    """An integer / bool tensor created "on meta" (an index, a position range): keep it real on CPU."""
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    if device is None or torch.device(device).type != "meta":
        return False
    if dtype is not None:
        return not _floating(dtype)
    return func.name().startswith("aten::arange") and all(isinstance(a, int) for a in args)


class MetaMemory(TorchDispatchMode):
    """Counts the bytes of the meta storages created inside the block; .peak and its split by category."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.head_shape = (vocab_size, hidden_size)  # the LM head's weight (its gradient accumulator)
        self.live: dict[int, tuple[str, int, weakref.finalize]] = {}  # storage -> (category, bytes, its finalizer)
        self.current = {name: 0 for name in CATEGORIES}
        self.peak = StepMemory(0, 0, 0, 0)
        self.attention_depth = 0  # > 0 inside a CP attention call (forward)

    def _category(self, tensor: torch.Tensor) -> str:
        if tensor.dim() and (tensor.shape[-1] == self.head_shape[0] or tuple(tensor.shape) == self.head_shape):
            return "logits"
        if self.attention_depth:
            return "attention"
        node = torch._C._current_autograd_node()  # the backward node running now (None in forward)
        if node is not None:
            forward_cls = getattr(node, "_forward_cls", None)
            if "Attention" in node.name() or (forward_cls is not None and forward_cls.__module__.startswith("cp.")):
                return "attention"
        return "activations"

    def _free(self, key: int) -> None:
        category, nbytes, _ = self.live.pop(key)
        self.current[category] -= nbytes

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        category, nbytes = self._category(tensor), storage.nbytes()
        self.live[key] = (category, nbytes, weakref.finalize(storage, self._free, key))
        self.current[category] += nbytes
        total = sum(self.current.values())
        if total > self.peak.peak:
            self.peak = StepMemory(total, **self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            src, device = args[0], kwargs.get("device")
            if src.device.type == "meta" and device is not None and torch.device(device).type == "cpu":
                # to the host (activation offload): off the device, not counted
                return torch.empty(src.shape, dtype=kwargs.get("dtype") or src.dtype, device=META)
            if src.device.type == "cpu" and not _floating(kwargs.get("dtype") or src.dtype):
                kwargs = {**kwargs, "device": torch.device("cpu")}  # metadata stays real
        elif _factory_stays_on_cpu(func, args, kwargs):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        flat = tree_flatten((args, kwargs))[0]
        if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in flat):
            args, kwargs = tree_map_only(torch.Tensor, lambda t: t.to(META) if t.device.type == "cpu" and t.dim()
                                         else t, (args, kwargs))
        out = func(*args, **kwargs)
        if not func.is_view:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):  # a CPU one (a mask from real positions) is on the device too
                    self._count(t)
        return out


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention on meta as the flash kernel: what it saves is q, k, v, out, lse."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


class _FlashShapedBlockKernel:
    """The ring's block kernel on meta, shaped like the fused ones (flash-attn varlen, torch's CPU flash): out
    and lse per block, dq / dk / dv in backward, no [Sq, Sk] scores or masks (the math kernel's would be)."""

    name = "flash (simulated)"

    def forward(self, q, k, v, allowed, scale: float):
        dtype = acc_dtype(q)
        out = torch.empty(q.shape, dtype=dtype, device=q.device)  # [B, Sq, H, D]
        return out, torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=dtype, device=q.device)  # lse [B, H, Sq]

    def backward(self, q, k, v, out, dout, lse, delta, allowed, scale: float):
        dtype = acc_dtype(q)
        return tuple(torch.empty(t.shape, dtype=dtype, device=t.device) for t in (q, k, v))


class _ShapedKernel(torch.autograd.Function):
    """A fused kernel's memory on meta: `out` and the buffers it saves (`kept`) in forward; a gradient per
    tensor input in backward. Inputs it saves are references (no new memory)."""

    @staticmethod
    def forward(ctx, out_shape, out_dtype, kept, *inputs):
        ctx.save_for_backward(*(torch.empty(shape, dtype=dtype, device=META) for shape, dtype in kept))  # dropped
        # by activation checkpointing like any saved tensor
        ctx.inputs = [(t.shape, t.dtype) if isinstance(t, torch.Tensor) else None for t in inputs]
        return torch.empty(out_shape, dtype=out_dtype, device=META)

    @staticmethod
    def backward(ctx, grad):
        return (None, None, None, *(None if spec is None else torch.empty(spec[0], dtype=spec[1], device=META)
                                    for spec in ctx.inputs))


def _shaped_conv(x, weight, bias, doc_ids, *, activation=None):
    """causal-conv1d (document-aware): out like x; it saves its inputs."""
    return _ShapedKernel.apply(x.shape, x.dtype, [], x, weight, bias)


def _shaped_delta_rule(q, k, v, g, beta, doc_ids, *, use_qk_l2norm=True, scale=None, chunk_size=64,
                       entering_state=None):
    """fla's chunk_gated_delta_rule as models.mixers.fused_kernels calls it: q / k repeated to the value heads when
    fewer, g in fp32, and the per-chunk WY matrix [B, S, Hv, chunk] fp32 kept for backward. entering_state
    (state-passing CP, models.mixers.fused_kernels): one more call over each row's first and last documents (at
    most every token: the same buffers again) with values widened by Dk, its reads [B, S, Hv, Dk] fp32, and the
    per-row summaries [B, Hv, Dk, Dk + Dv] fp32 through the chain (its gather buffers counted)."""
    batch, seq_len, num_v, head_v = v.shape
    head_k = q.shape[-1]
    kept = [((batch, seq_len, num_v, head_k), q.dtype)] * (2 if num_v != k.shape[2] else 0)
    kept += [((batch, seq_len, num_v), torch.float32), ((batch, seq_len, num_v, chunk_size), torch.float32)]
    if entering_state is None:
        return _ShapedKernel.apply((batch, seq_len, num_v, head_v), v.dtype, kept, q, k, v, g, beta)
    out = _ShapedKernel.apply((batch, seq_len, num_v, head_v), v.dtype, kept, q, k, v, g, beta)
    wide = kept + [((batch, seq_len, num_v, head_k), torch.float32)]  # the second call and its Phi^T q reads
    summary = _ShapedKernel.apply((batch, num_v, head_k, head_k + head_v), torch.float32, wide, q, k, v, g, beta)
    transition, final = summary.split([head_k, head_v], dim=-1)
    entering = entering_state(final, transition)  # [B, Hv, Dk, Dv]
    return out + _ShapedKernel.apply((batch, seq_len, num_v, head_v), v.dtype, [], q, entering)


def _shaped_ssd_scan(x, dt, A, B, C, doc_ids, *, D=None, dt_bias=None, dt_softplus=True, dt_limit=None, chunk_size=64,
                     entering_state=None):
    """mamba-ssm's mamba_chunk_scan_combined: y in fp32 (as models.mixers.fused_kernels returns it), the chunk states
    [B, chunks, H, P, N] and the cumulative decays [B, H, chunks, chunk] in fp32 kept for backward. entering_state
    (state-passing CP): the final states [B, H, P, N] through the chain, and the entering state's share of the
    outputs (the decays from the shard start [B, S, H] kept)."""
    batch, seq_len, heads, head_dim = x.shape
    chunks = -(-seq_len // chunk_size)
    kept = [((batch, chunks, heads, head_dim, B.shape[-1]), torch.float32),
            ((batch, heads, chunks, chunk_size), torch.float32), ((batch, seq_len, heads), torch.float32)]
    if entering_state is None:
        return _ShapedKernel.apply(x.shape, torch.float32, kept, x, dt, A, B, C, D, dt_bias)
    y = _ShapedKernel.apply(x.shape, torch.float32, kept, x, dt, A, B, C, D, dt_bias)
    final = _ShapedKernel.apply((batch, heads, head_dim, B.shape[-1]), torch.float32, [], x, dt, A, B, C)
    decay = _ShapedKernel.apply((batch, heads), torch.float32, [], dt, A)
    entering = entering_state(final, decay)  # [B, H, P, N]
    return y + _ShapedKernel.apply(x.shape, torch.float32, [((batch, seq_len, heads), torch.float32)], C, entering)


SHAPED_MIXER_KERNELS = {"causal_conv1d": _shaped_conv, "gated_delta_rule": _shaped_delta_rule,
                        "ssd_scan": _shaped_ssd_scan}


def _mixer_kernel(real_pick):
    def pick(op, device, dtype, **options):
        return SHAPED_MIXER_KERNELS[op] if torch.device(device).type == "meta" else real_pick(op, device, dtype,
                                                                                               **options)
    return pick


def _block_kernel(real_resolve):
    def resolve(kernel, device=None, dtype=None):
        if device is not None and torch.device(device).type == "meta":
            return _FlashShapedBlockKernel()
        return real_resolve(kernel, device, dtype)
    return resolve


class _Done:
    def wait(self, *args, **kwargs) -> bool:
        return True


def _no_transfer(ops) -> list:
    """dist.batch_isend_irecv for meta tensors (the fake group has no meta backend): the receive buffers
    exist already, nothing to move."""
    return [_Done() for _ in ops]


MIXER_MODULES = ("models.mixers.gated_deltanet", "models.mixers.mamba2")  # each imports mixer_kernels.pick as pick_mixer_kernel


@contextlib.contextmanager
def _simulated(memory: MetaMemory, mixers: str):
    """SDPA and the ring's block kernel as flash kernels on meta (and mixers="fused": DeltaNet / Mamba2 as
    their fused kernels), ring P2P a no-op, CP attention calls marked, for the whole step
    (module attributes, not a mode: checkpoint recomputes run on the autograd thread)."""
    real_sdpa, styles = F.scaled_dot_product_attention, dict(cp.CP_STYLES)

    def marked(attention):
        def call(*args, **kwargs):
            memory.attention_depth += 1
            try:
                return attention(*args, **kwargs)
            finally:
                memory.attention_depth -= 1
        return call

    real_p2p, real_block = dist.batch_isend_irecv, cp.ring.resolve_block_kernel
    mixer_modules = [importlib.import_module(name) for name in MIXER_MODULES]
    real_pick = {module: module.pick_mixer_kernel for module in mixer_modules}
    if mixers == "fused":
        for module in mixer_modules:
            module.pick_mixer_kernel = _mixer_kernel(real_pick[module])
    F.scaled_dot_product_attention = _flash_sdpa
    dist.batch_isend_irecv = _no_transfer
    cp.ring.resolve_block_kernel = _block_kernel(real_block)
    for name, style in styles.items():
        cp.CP_STYLES[name] = dataclasses.replace(style, attention=marked(style.attention))
    try:
        with memory:
            yield memory
    finally:
        F.scaled_dot_product_attention = real_sdpa
        dist.batch_isend_irecv = real_p2p
        cp.ring.resolve_block_kernel = real_block
        for module, pick in real_pick.items():
            module.pick_mixer_kernel = pick
        cp.CP_STYLES.update(styles)


@contextlib.contextmanager
def fake_world(world_size: int):
    """torch's fake process group of `world_size` ranks in this process (rank 0): ParallelDims.build and
    every collective work, moving no data."""
    if dist.is_initialized():
        raise RuntimeError("trainer.plan simulates its own process group: run it outside torchrun / an "
                           "initialised torch.distributed")
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the "fake" backend)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def meta_model(model_config, dtype: torch.dtype) -> torch.nn.Module:
    """The CausalLM of `model_config` with its parameters on meta in `dtype` (no memory, no init)."""
    from transformers import AutoModelForCausalLM

    with torch.device(META):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(model_config), attn_implementation="sdpa")
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    return model.train()


def _drop_parameter_gradients(model: torch.nn.Module) -> list:
    """FSDP2 frees each unsharded parameter gradient after its reduce-scatter: drop them once accumulated."""
    def drop(param):
        param.grad = None

    return [p.register_post_accumulate_grad_hook(drop) for p in model.parameters() if p.requires_grad]


def simulate_step(model_config, dims: cp.ParallelDims, mcfg, *, seq_len: int, dtype: torch.dtype, rows: int = 1,
                  trainer: str = "sft", mixers: str = "fused", top_p: float = 1.0) -> StepMemory:
    """Peak activation memory of one micro-batch of `rows` sequences of `seq_len` tokens (one document per row,
    every token a loss token; S / cp of each on this rank) on rank 0 of `dims` (built in a fake_world), with the
    techniques of `mcfg` (model.* keys: chunked_head, head_chunk_tokens, tiled_mlp, mlp_tile_tokens,
    activation_checkpointing, activation_offload, mixer_cp).
    trainer: "sft" (token cross-entropy) | "rl" (GRPO: log-probs and entropy of the policy; top_p < 1: of the
    nucleus, whose sort and mask add [chunk, vocab] buffers to each head chunk).
    mixers: "fused" (DeltaNet / Mamba2 as their fused GPU kernels allocate: what a GPU run holds; fast) |
    "twin" (the CPU twins of models/mixers/varlen_scans.py, op by op: what a CPU run holds; slow at long S)."""
    from trainer.modeling import install_long_context

    model = models.apply_cp(meta_model(model_config, dtype), dims, attn="sdpa", chunks=mcfg.ulysses_chunks,
                            mixer_cp=getattr(mcfg, "mixer_cp", "ulysses"))  # a namespace of model.* keys may omit it
    model = install_long_context(model, mcfg)
    hooks = _drop_parameter_gradients(model)
    ids = torch.zeros(rows, seq_len, dtype=torch.long)
    labels = torch.zeros_like(ids)
    labels[:, -1] = IGNORE_INDEX
    batch = cp.setup_cp_params(ids, dims, labels=labels)
    memory = MetaMemory(model_config.vocab_size, model_config.hidden_size)
    try:
        with _simulated(memory, mixers):
            if trainer == "rl":
                logp, _ = shard_logprobs(model, batch, entropy=True, chunk_tokens=mcfg.head_chunk_tokens, top_p=top_p)
                (-logp.sum()).backward()
            else:
                shard_loss_sum(model, batch, chunk_tokens=mcfg.head_chunk_tokens).backward()
    finally:
        for hook in hooks:
            hook.remove()
    return memory.peak
