"""Activation checkpointing with the checkpointed layers' inputs parked in host memory.

transformers' activation checkpointing (model.activation_checkpointing=true: gradient_checkpointing_enable,
use_reentrant=False) keeps one tensor per decoder layer on the device from the layer's forward to its
backward: the layer input [B, S/cp, H], what the recompute starts from. L layers: L x B x S/cp x H elements,
the term that still grows with the sequence once everything inside the layers is recomputed.
enable_activation_offload(model) moves exactly those tensors to host memory and back:

    forward, checkpointed layer i:
        layer._gradient_checkpointing_func(forward, h_i) ── this module's hooks pushed around the call ──>
            torch.utils.checkpoint saves its positional inputs (frame.save_inputs) ── pack(h_i) ──> host
                CUDA: the side stream waits for compute, copies h_i D2H (non_blocking) into pinned memory while
                layer i computes; h_i.record_stream keeps its memory from reuse until the copy has read it
                other devices: a synchronous copy to host; CPU: a copy (the same code path, nothing to gain)
            inside the layer, checkpoint's own hooks are innermost: every tensor the layer saves is dropped
            and recomputed, never seen here (the tiled MLP's saved input included)
    backward, layer i (layers run in reverse):
        checkpoint unpacks h_i to recompute ── unpack ──> device
            CUDA: the H2D copy on the side stream (ordered after h_i's D2H), compute waits on its event; then
                the H2D of h_{i-1} (packed just before h_i) starts, landing during layer i's recompute/backward
        the recompute and the layer's backward run outside these hooks: nothing else is moved

Only checkpoint boundaries are offloaded: the hooks are active only inside a checkpoint call, where the only
tensors saved outside checkpoint's inner hooks are the layer's positional inputs (transformers passes the
hidden states positionally, everything else as keyword arguments). Embeddings, final norm, LM head and loss
keep their saved tensors on the device. Under CP h_i is this rank's shard, and the recompute re-runs the
layer's collectives as plain checkpointing does.

`moved` counts what was packed by (shape, dtype), `restored` what came back: a test and a log can check that
exactly the L layer inputs of each step were moved. Call it after gradient_checkpointing_enable (which resets
each layer's checkpoint function), instead of transformers' own offload=True (save_on_cpu: copies on the
compute stream).
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from transformers.modeling_layers import GradientCheckpointingLayer


@dataclass(eq=False)
class Parked:
    """One checkpointed layer input in host memory (pinned on CUDA)."""

    host: torch.Tensor
    device: torch.device
    earlier: weakref.ref | None  # the input packed just before this one: prefetched when this one is unpacked
    fetched: torch.Tensor | None = None  # CUDA: the device copy once its H2D copy has been started
    ready: torch.cuda.Event | None = None  # CUDA: recorded on the side stream after that copy


class ActivationOffload:
    """The pack / unpack hooks put around each checkpointed layer, and what they moved.

    moved: Counter of (shape, dtype) of every tensor packed to host; restored: how many came back."""

    def __init__(self):
        self.moved: Counter = Counter()
        self.restored = 0
        self._last: weakref.ref | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def pack(self, tensor: torch.Tensor) -> Parked:
        self.moved[(tuple(tensor.shape), tensor.dtype)] += 1
        host = self._to_host(tensor) if tensor.is_cuda else tensor.detach().to("cpu", copy=True)
        parked = Parked(host, tensor.device, self._last)
        self._last = weakref.ref(parked)
        return parked

    def unpack(self, parked: Parked) -> torch.Tensor:
        self.restored += 1
        if parked.device.type != "cuda":
            return parked.host.to(parked.device)  # CPU: the host copy itself
        if parked.fetched is None:
            self._fetch(parked)
        torch.cuda.current_stream(parked.device).wait_event(parked.ready)  # its H2D copy has landed
        tensor, parked.fetched = parked.fetched, None
        earlier = parked.earlier() if parked.earlier is not None else None
        if earlier is not None and earlier.fetched is None:
            self._fetch(earlier)  # the next layer backward will ask for: overlaps this layer's recompute
        return tensor

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Start the D2H copy of `tensor` on the side stream into a pinned buffer (filled asynchronously)."""
        stream = self._stream(tensor.device)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is computed
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # its memory is not reused before the copy has read it
        return host

    def _fetch(self, parked: Parked) -> None:
        """Start the H2D copy of a parked tensor on the side stream (after its D2H copy: same stream)."""
        stream = self._stream(parked.device)
        compute = torch.cuda.current_stream(parked.device)
        tensor = torch.empty(parked.host.shape, dtype=parked.host.dtype, device=parked.device)  # compute's memory
        stream.wait_stream(compute)  # compute work queued before may still use this memory
        with torch.cuda.stream(stream):
            tensor.copy_(parked.host, non_blocking=True)
            parked.ready = stream.record_event()
        parked.fetched = tensor


class OffloadedCheckpoint:
    """A layer's checkpoint function with the offload hooks pushed around each call."""

    def __init__(self, offload: ActivationOffload, checkpoint):
        self.offload, self.checkpoint = offload, checkpoint

    def __call__(self, function, *args, **kwargs):
        with saved_tensors_hooks(self.offload.pack, self.offload.unpack):
            return self.checkpoint(function, *args, **kwargs)


def enable_activation_offload(model: nn.Module) -> ActivationOffload:
    """Offload the inputs of every checkpointed decoder layer of `model` (in place); returns the hooks' owner.
    ValueError if no layer is checkpointed. Calling it again replaces the previous offload."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise ValueError(f"no decoder layer of {type(model).__name__} is checkpointed: enable activation "
                         "checkpointing first (model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                         "{'use_reentrant': False}); in the trainers model.activation_checkpointing=true)")
    offload = ActivationOffload()
    for layer in layers:
        checkpoint = layer._gradient_checkpointing_func
        if isinstance(checkpoint, OffloadedCheckpoint):
            checkpoint = checkpoint.checkpoint
        layer._gradient_checkpointing_func = OffloadedCheckpoint(offload, checkpoint)
    return offload
