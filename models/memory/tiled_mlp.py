"""Tiled MLP: every decoder layer's MLP (dense or MoE) run over tiles of tokens and recomputed tile by tile
in backward, so its intermediate activations are O(tile) instead of O(S/cp) (the TiledMLP of DeepSpeed's
Arctic Long Sequence Training, written for this project's FSDP2 + CP stack).

    apply_tiled_mlp(model, tile_tokens=None)    the MLP of every decoder layer gets a tiled forward on the
                                                INSTANCE: class, names, parameters, state_dict keys and hooks
                                                stay the model's own (refuses MLPs that are not per-token)

    decoder layer: mlp(x), x [B, S, H] (this rank's shard under CP)
        N = B*S tokens <= tile: the module's own forward, untouched
        flat = x as [1, N, H]                             tiles run along the flattened tokens, rows end to end
        TiledMLP.apply(runner, tiles, flat, *params)      params: the MLP's trainable parameters as they are NOW
                                                          (FSDP2: the unsharded ones of this forward)
          forward (no grad)   tile [a, b): runner(flat[:, a:b]) -> (y, *aux, *recorded)
                              each written into its slice of outputs allocated once; saved: flat, RNG states
                              and autocast settings
          backward            tile [a, b): x_t = flat[:, a:b].detach() with grad, runner(x_t) again (same RNG
                              draws, same autocast), torch.autograd.grad(tile outputs, (x_t, *trainable
                              parameters as registered now: FSDP2's unsharded ones again), slices of the
                              incoming grads) -> dx[:, a:b]; parameter gradients summed over the tiles in fp32
          returns (dx, *dparams): ordinary parameter gradients (autograd accumulates .grad; FSDP2's
                              post-backward reduce-scatter sees them like any other module's)
        y [1, N, H] -> [B, S, H]; aux outputs back in the module's own layout; recorded tensors (router
        logits) appended to transformers' output collector, one per layer as without tiling

Memory: saved per layer: the MLP input only (as any Linear saves its input); live at once: one tile's
intermediates (forward and backward), dx, and fp32 accumulators for the MLP's parameter gradients while
its backward runs (a bf16 MLP: twice the bf16 gradient it produces; fp32: the gradient itself).

Outputs (per family, transformers 5.24): qwen3 / qwen3_5 / glm4_moe (dense layers) / qwen3_next (dense) /
nemotron_h (mlp blocks) MLPs return y; glm4_moe's MoE, qwen3_next's sparse MoE block (shared expert gated
per token) and nemotron_h's MoE return y; gpt_oss's MLP returns (y, router_scores [N, top_k]). Every router
(glm4_moe / nemotron_h sigmoid + group-limited top-k, gpt_oss / qwen3_next softmax top-k) routes each token
on its own and experts add their outputs per token (index_add_ or grouped_mm), so all are tile-exact.
  aux outputs: [tokens, ...] (flattened, what transformers' routers return) or [1, tokens, ...] (the
              module's [batch, seq, ...] layout) per tile; concatenated in token order, so the caller
              gets the shapes and values of the untiled call. Anything else (a scalar aux loss) is refused.
  router logits recorded by transformers' OutputRecorder hooks (output_router_logits=True): each tile
              records into a private collector; the tiles' logits leave the Function as one [N, E]
              tensor per layer, in token order, with their gradient path (the aux loss trains the router).

Refused at apply time (ValueError naming the module): capacity-limited MoEs (expert_capacity,
capacity_factor, min_capacity, drop_tokens: a tile would route differently, e.g. Switch Transformers, NLLB-MoE)
and gates computing a load-balancing loss over the tokens of a call inside forward (seq_aux / alpha:
DeepSeek's remote-code MoEGate); a forward that needs more than the hidden states.

Why the instance forward rather than a wrapper module: the module keeps its class (transformers' output
recorders, PEFT targets and apply_cp's mixer predicates match classes), its parameters and hooks, and there
is nothing to adopt; the class forward is looked up at every call, so a class-level patch (e.g. a fused
SwiGLU kernel) still runs inside the tiles.

Tile size: `tile_tokens=None` picks auto_tile_tokens(N, hidden, width) per call, width the widest per-token
intermediate of the model (dense intermediate, or top-k x expert width): tiles of ceil(N / ceil(width /
hidden)) tokens, at least MIN_TILE_TOKENS, so one tile's intermediate is about the size of the layer input
(ALST instead cuts tiles of about `hidden` tokens). Different ranks may run different tile counts: nothing
inside the MLP communicates (FSDP2 gathers per decoder layer).
"""

from __future__ import annotations

import inspect
import math
from contextlib import ExitStack, contextmanager
from types import MethodType
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.output_capturing import _active_collector

from cp.masks import acc_dtype

MIN_TILE_TOKENS = 256
MLP_ATTRIBUTES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")  # a decoder layer's MLP, by attribute name
MLP_BLOCK_TYPES = ("mlp", "moe")  # NemotronH-style blocks: layer.mixer is the MLP when layer.block_type is one
# A submodule with one of these set (not None / False / 0) shares expert capacity among all tokens of a call.
CAPACITY_ATTRIBUTES = ("expert_capacity", "capacity_factor", "eval_capacity_factor", "min_capacity", "drop_tokens")


def auto_tile_tokens(tokens: int, hidden_size: int, intermediate_size: int, min_tokens: int = MIN_TILE_TOKENS) -> int:
    """Tokens per tile: ceil(tokens / ceil(intermediate / hidden)), at least `min_tokens`, so one tile's
    intermediate activation (tile x intermediate) is about the size of the MLP input (tokens x hidden)."""
    return max(min_tokens, math.ceil(tokens / math.ceil(intermediate_size / hidden_size)))


def mlp_width(config) -> int:
    """The widest per-token MLP intermediate of a model: its dense intermediate, or top-k experts' widths."""
    dense = getattr(config, "intermediate_size", None)
    if dense is None:
        raise ValueError(f"{type(config).__name__} has no intermediate_size to size the MLP tiles from: "
                         "pass tile_tokens= (tokens per tile)")
    expert = getattr(config, "moe_intermediate_size", None) or dense
    return max(dense, expert * (getattr(config, "num_experts_per_tok", None) or 1))


def decoder_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every decoder layer's MLP: layer.mlp / feed_forward / ffn / block_sparse_moe, or the
    mixer of a block whose block_type is mlp or moe (NemotronH). Decoder layers: transformers'
    GradientCheckpointingLayer instances."""
    found = []
    for path, layer in model.named_modules():
        if isinstance(layer, GradientCheckpointingLayer):
            name = _mlp_attribute(layer)
            if name is not None:
                found.append((f"{path}.{name}", getattr(layer, name)))
    return found


def _mlp_attribute(layer: nn.Module) -> str | None:
    if getattr(layer, "block_type", None) in MLP_BLOCK_TYPES:
        return "mixer"
    return next((name for name in MLP_ATTRIBUTES if isinstance(getattr(layer, name, None), nn.Module)), None)


def _is_set(value) -> bool:
    return value is not None and not (isinstance(value, (int, float)) and value == 0)


def _not_per_token(module: nn.Module) -> str | None:
    """Why `module` does not compute each token on its own (None: as far as can be told, it does)."""
    for name in CAPACITY_ATTRIBUTES:
        if _is_set(getattr(module, name, None)):
            return (f"{name}={getattr(module, name)!r}: expert capacity is shared by all the tokens of a call "
                    "(tokens past it are dropped), so a tile would route differently")
    if hasattr(module, "seq_aux") and _is_set(getattr(module, "alpha", None)):
        return (f"alpha={module.alpha!r}, seq_aux={module.seq_aux!r}: a load-balancing loss over all the tokens "
                "of a call is computed inside forward, so a tile would compute another one")
    return None


def check_tileable(path: str, mlp: nn.Module) -> None:
    """ValueError unless `mlp` can run tile by tile: forward(hidden_states) and per-token in every submodule."""
    declared = list(inspect.signature(type(mlp).forward).parameters.values())[1:]
    required = [p for p in declared if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) != 1:
        raise ValueError(f"{path} ({type(mlp).__name__}.forward{inspect.signature(type(mlp).forward)}) needs "
                         f"{len(required)} arguments; the tiled MLP runs forward(hidden_states) only: "
                         "leave this model's MLPs untiled")
    for name, sub in mlp.named_modules():
        reason = _not_per_token(sub)
        if reason is not None:
            where = f"{path}.{name}" if name else path
            raise ValueError(f"{where} ({type(sub).__name__}) is not per-token: {reason}. The tiled MLP "
                             "would not be exact: leave this model's MLPs untiled")


def apply_tiled_mlp(model: nn.Module, tile_tokens: int | None = None) -> nn.Module:
    """Tile every decoder layer's MLP in place (and return the model); state_dict keys unchanged. tile_tokens:
    tokens per tile (None: auto_tile_tokens per call). Checks every MLP before changing any. Call it before or
    after models.apply_cp, before FSDP's fully_shard or after: parameters are looked up at each call."""
    if tile_tokens is not None and tile_tokens <= 0:
        raise ValueError(f"tile_tokens={tile_tokens}: pass a positive number of tokens per tile, or None to "
                         "size the tiles from the sequence and the MLP width (auto_tile_tokens)")
    mlps = decoder_mlps(model)
    if not mlps:
        raise ValueError(f"found no decoder-layer MLP in {type(model).__name__} (looked for "
                         f"{', '.join(MLP_ATTRIBUTES)} on its GradientCheckpointingLayer modules)")
    for path, mlp in mlps:
        check_tileable(path, mlp)
    width = None if tile_tokens else mlp_width(model.config.get_text_config())
    for _, mlp in mlps:
        mlp.forward = MethodType(TiledForward(tile_tokens, width), mlp)
    return model


class TiledForward:
    """The forward apply_tiled_mlp sets on an MLP instance (bound: called as tiled(mlp, x))."""

    def __init__(self, tile_tokens: int | None, width: int | None):
        self.tile_tokens, self.width = tile_tokens, width

    def __call__(self, mlp: nn.Module, x: torch.Tensor, *args, **kwargs):
        if args or kwargs:
            raise ValueError(f"{type(mlp).__name__} was called with more than the hidden states; the tiled MLP "
                             "runs forward(hidden_states) only: leave this model's MLPs untiled")
        tokens = x.shape[:-1].numel()
        tile = self.tile_tokens or auto_tile_tokens(tokens, x.shape[-1], self.width)
        if tokens <= tile:
            return type(mlp).forward(mlp, x)
        flat = x.reshape(1, tokens, x.shape[-1])  # [B, S, H] -> [1, B*S, H]
        collector = _active_collector.get()
        keys = None if collector is None else [key for key, found in collector.items() if isinstance(found, list)]
        runner = TileRunner(mlp, keys)
        params = runner.trainable()
        tiles = tuple((a, min(a + tile, tokens)) for a in range(0, tokens, tile))
        return runner.assemble(TiledMLP.apply(runner, tiles, flat, *params), x.shape[:-1], collector)


class Layout(NamedTuple):
    """What one tile returned: a tuple or one tensor, how many outputs, and (key, count) of each recording."""

    is_tuple: bool
    outputs: int
    recorded: tuple[tuple[str, int], ...]


class TileRunner:
    """One tile through the MLP's own (class) forward, transformers' output recording kept per tile.

    runner(x_tile [1, t, H]) -> (y, *aux, *recorded): the module's outputs, then the tensors its recording
    hooks caught (router logits), key by key. The first tile sets `layout` and `dims` (token dim of each
    output); every later tile and the backward recompute must match them."""

    def __init__(self, mlp: nn.Module, keys: list[str] | None):
        self.mlp, self.keys = mlp, keys
        self.layout: Layout | None = None
        self.dims: list[int] | None = None

    def trainable(self) -> list[torch.Tensor]:
        """The MLP's parameters that take gradients, as registered on it now (FSDP2: this forward's unsharded ones)."""
        return [p for p in self.mlp.parameters() if p.requires_grad]

    def __call__(self, x_tile: torch.Tensor) -> tuple[torch.Tensor, ...]:
        recording = None if self.keys is None else {key: [] for key in self.keys}
        with _collecting(recording):
            out = type(self.mlp).forward(self.mlp, x_tile)
        outs = out if isinstance(out, tuple) else (out,)
        caught = [(key, found) for key, found in (recording or {}).items() if found]
        layout = Layout(isinstance(out, tuple), len(outs), tuple((key, len(found)) for key, found in caught))
        parts = (*outs, *(t for _, found in caught for t in found))
        if self.layout is None:
            self.layout, self.dims = layout, self._token_dims(parts, x_tile.shape[1])
        elif layout != self.layout:
            raise ValueError(f"{type(self.mlp).__name__} returned {layout} for one tile and {self.layout} for "
                             "another: it is not per-token; leave this model's MLPs untiled")
        return parts

    def _token_dims(self, parts: tuple, tokens: int) -> list[int]:
        """Where the tokens are in each output of a tile of `tokens`: dim 1 for [1, t, ...] (the module's
        [batch, seq, ...] layout), dim 0 for [t, ...] (flattened); anything else is refused."""
        dims = []
        for i, part in enumerate(parts):
            if not isinstance(part, torch.Tensor):
                dim = None
            elif part.dim() >= 3 and part.shape[0] == 1 and part.shape[1] == tokens:
                dim = 1
            else:
                dim = 0 if part.dim() >= 1 and part.shape[0] == tokens else None
            if dim is None or (i == 0 and dim != 1):
                shape = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
                raise ValueError(f"{type(self.mlp).__name__} output {i} is {shape} for a tile of {tokens} tokens: "
                                 "not per-token (the hidden states first, then [tokens, ...] or [1, tokens, ...]); "
                                 "the tiled MLP would not be exact: leave this model's MLPs untiled")
            dims.append(dim)
        return dims

    def assemble(self, outs: tuple, batch_shape: torch.Size, collector: dict | None):
        """The Function's outputs in the untiled call's form: [1, N, ...] -> [B, S, ...]; recorded tensors
        appended to transformers' collector."""
        outs = [o.reshape(*batch_shape, *o.shape[2:]) if d == 1 else o for o, d in zip(outs, self.dims)]
        recorded = iter(outs[self.layout.outputs:])
        for key, count in self.layout.recorded:
            collector[key].extend(next(recorded) for _ in range(count))
        mine = outs[:self.layout.outputs]
        return tuple(mine) if self.layout.is_tuple else mine[0]


@contextmanager
def _collecting(recording: dict | None):
    """transformers' output collector (a context variable its recording hooks read) swapped for `recording`."""
    token = _active_collector.set(recording)
    try:
        yield
    finally:
        _active_collector.reset(token)


def _forward_state(flat: torch.Tensor) -> tuple:
    """What the recompute must replay: RNG states (dropout, router jitter) and autocast (CPU, flat's device)."""
    devices = [d for d in dict.fromkeys(("cpu", flat.device.type)) if torch.amp.is_autocast_available(d)]  # not meta
    autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices]
    return torch.get_rng_state(), *get_device_states(flat), autocast


@contextmanager
def _replayed(state):
    """Run with the RNG states and autocast of `state` (the RNG outside is left as it was)."""
    cpu, devices, device_states, autocast = state
    with torch.random.fork_rng(devices=devices), ExitStack() as stack:
        torch.set_rng_state(cpu)
        set_device_states(devices, device_states)
        for device, enabled, dtype in autocast:
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


class TiledMLP(torch.autograd.Function):
    """(runner, tiles, flat [1, N, H], *params) -> the runner's outputs over all tiles, recomputed per tile
    in backward. See the module docstring."""

    @staticmethod
    def forward(ctx, runner: TileRunner, tiles: tuple, flat: torch.Tensor, *params: torch.Tensor):
        ctx.runner, ctx.tiles = runner, tiles
        ctx.state = _forward_state(flat)
        outs = None
        for a, b in tiles:
            parts = runner(flat[:, a:b])
            if outs is None:  # [.., t, ..] -> [.., N, ..] at each output's token dim
                outs = [p.new_empty((*p.shape[:d], flat.shape[1], *p.shape[d + 1:]))
                        for p, d in zip(parts, runner.dims)]
            for out, part, dim in zip(outs, parts, runner.dims):
                out.narrow(dim, a, b - a).copy_(part)
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        ctx.set_materialize_grads(False)
        ctx.shapes = [p.shape for p in params]
        ctx.save_for_backward(flat)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        (flat,) = ctx.saved_tensors
        params = ctx.runner.trainable()  # what the recompute runs (saved ones: checkpoint's detached aliases)
        if [p.shape for p in params] != ctx.shapes:
            raise RuntimeError(f"the trainable parameters of {type(ctx.runner.mlp).__name__} changed between its "
                               "forward and backward, so the recompute cannot give their gradients: keep the MLP's "
                               "parameters registered and their requires_grad fixed through a step")
        want_x = ctx.needs_input_grad[2]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        dx = torch.zeros_like(flat) if want_x else None
        sums: dict[int, torch.Tensor] = {}
        with _replayed(ctx.state), torch.enable_grad():
            for a, b in ctx.tiles:
                x_tile = flat[:, a:b].detach().requires_grad_(want_x)
                pairs = [(part, grad.narrow(dim, a, b - a))
                         for part, grad, dim in zip(ctx.runner(x_tile), grads, ctx.runner.dims)
                         if grad is not None and part.requires_grad]
                if not pairs:
                    continue
                inputs = ([x_tile] if want_x else []) + [params[i] for i in wanted]
                got = list(torch.autograd.grad([p for p, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True))
                if want_x:
                    dx[:, a:b] = got.pop(0)
                for i, grad in zip(wanted, got):
                    _accumulate(sums, i, grad)
        dparams = [sums[i].to(p.dtype) if i in sums else None for i, p in enumerate(params)]
        return None, None, dx, *dparams


def _accumulate(sums: dict, i: int, grad: torch.Tensor | None) -> None:
    """sums[i] += grad, in fp32 for low-precision gradients (None: this tile did not reach the parameter)."""
    if grad is None:
        return
    if i in sums:
        sums[i] += grad
    else:
        sums[i] = grad.to(acc_dtype(grad))
