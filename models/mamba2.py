"""NemotronH's Mamba2 mixer under Ulysses context parallelism, exact for packed documents.

Ulysses turns the sequence-sharded activations into head-sharded ones around the SSM, so every
rank scans the FULL sequence of its own heads (a scan cannot be split along time without
passing states; split along heads it needs nothing). Document boundaries come from CPParams:
the causal conv and the SSM state restart at every document start.

    hidden [B, S/P, d] ── in_proj (local) ──> z [B, S/P, I]  (stays here, used by the norm)
                                              x [B, S/P, H, hd] ┐ cat ─ seq_to_head ─> [B, S, H/P, hd+1]
                                              dt [B, S/P, H]    ┘   (by heads)
                                              B, C [B, S/P, G, N] ─ cat ─ seq_to_head ─> [B, S, g_r, 2N]
                                                                    (by groups; a group is replicated
                                                                     to every rank whose heads read it)
    [x | B | C] of this rank's heads/groups ── varlen causal conv1d (conv weights sliced) + act
        ── varlen SSD scan (A_log, D, dt_bias sliced; state reset at document starts) ──> y [B, S, H/P, hd]
    y ── head_to_seq ──> [B, S/P, H, hd] ── gated RMSNorm(y, z) ── out_proj (local) ──> [B, S/P, d]

The gated RMSNorm is per token, so it runs on the sequence shard after the all-to-all back:
the norm groups never have to line up with the rank's heads (n_groups < P works) and z is never
communicated. Cost per layer: two all-to-alls forward (x+dt, B+C), one back (y, float32 like
the transformers path), the same again in backward.

Constraints: Ulysses only (the scan needs whole sequences: any ring degree > 1 is refused),
mamba_num_heads % P == 0 (ValueError naming the fix), no cache continuation and no 2D padding mask
together with cp_params (padding is a document of its own). Without cp_params every row is one
document (same kernels, no collectives); with a cache (HF generation) or a padding mask the
original mixer runs unchanged. The wrapper adopts the mixer's children and parameters under their own names, so
state_dict keys, FSDP / optimizer / PEFT names are the HF names (models.hf_mixers).

The kernels here are plain torch in float32 (`ssd_scan_varlen`, `models.varlen_ops.varlen_causal_conv1d`);
autograd gives the backward. On CUDA, mamba-ssm's scan and causal-conv1d (with seq_idx) replace them
when importable and checked against them (models.mixer_kernels).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

from cp.collectives import head_to_seq, seq_to_head
from cp.dims import ParallelDims
from cp.ulysses import GroupedHeadSplit, align_groups_to_heads, grouped_head_split
from cp.params import CPParams
from models.hf_mixers import adopt, cache_keyword, call_original, original_if_unchanged, take_cache
from models.mixer_kernels import pick as pick_mixer_kernel

# Plain attributes of NemotronHMamba2Mixer the wrapper reads (its children and parameters are adopted).
_MIXER_ATTRIBUTES = ("num_heads", "n_groups", "head_dim", "ssm_state_size", "intermediate_size", "time_step_limit",
                     "chunk_size", "activation", "layer_idx", "hidden_size", "conv_kernel_size")

# ----------------------------------------------------------------------------------------------
# Varlen SSD scan
# ----------------------------------------------------------------------------------------------


def _segment_sum(log_decay: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T]: out[i, j] = sum(log_decay[j+1 .. i]) for i >= j, -inf above the diagonal.

    Built from a masked cumulative sum (not a difference of cumsums) so long chunks lose no precision.
    """
    length = log_decay.shape[-1]
    strictly_lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=log_decay.device), -1)
    expanded = log_decay.unsqueeze(-1).expand(*log_decay.shape, length)  # [..., T] -> [..., T(i), T(j)]
    sums = torch.cumsum(expanded.masked_fill(~strictly_lower, 0), dim=-2)
    lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=log_decay.device))
    return sums.masked_fill(~lower, -torch.inf)


def discretise_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, *, softplus: bool = True,
                  limit: tuple[float, float] = (0.0, math.inf)) -> torch.Tensor:
    """Mamba2's time step in float32: clamp(softplus(dt + dt_bias), *limit)."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if softplus:
        dt = F.softplus(dt)
    return torch.clamp(dt, min=limit[0], max=limit[1])


def _chunked(t: torch.Tensor, chunk: int, fill=0) -> torch.Tensor:
    """[b, S, ...] -> [b, S_pad / chunk, chunk, ...], padding the end of the sequence with `fill`."""
    pad = (-t.shape[1]) % chunk
    if pad:
        t = torch.cat([t, t.new_full((t.shape[0], pad, *t.shape[2:]), fill)], dim=1)
    return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])  # [b, S_pad, ...] -> [b, c, l, ...]


def ssd_scan_varlen(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    doc_ids: torch.Tensor, *, D: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                    dt_softplus: bool = True, dt_limit: tuple[float, float] = (0.0, math.inf),
                    chunk_size: int = 64) -> torch.Tensor:
    """Mamba2 SSD scan over packed documents, the SSM state reset at every document start.

    x [b, S, h, p]; dt [b, S, h] (raw, before dt_bias/softplus); A [h] (negative: -exp(A_log));
    B, C [b, S, g, n] with h % g == 0 (head i reads group i // (h/g)); doc_ids [b, S];
    D, dt_bias [h]. Returns y [b, S, h, p] in float32:

        state_t = exp(dt_t A) * state_{t-1} * [t is not a document start] + dt_t * B_t x_t^T
        y_t     = C_t . state_t + D * x_t

    Chunked (SSD) form: within a chunk a decay-weighted, document-masked C B^T product; between
    chunks the chunk-end states are carried only while the document continues.
    """
    batch, length, heads, head_dim = x.shape
    groups = B.shape[2]
    if heads % groups or B.shape != C.shape or B.shape[:2] != (batch, length):
        raise ValueError(f"ssd_scan_varlen: x {tuple(x.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}: B/C must be "
                         "[b, S, g, n] with g dividing the heads")
    if dt.shape != (batch, length, heads) or doc_ids.shape != (batch, length):
        raise ValueError(f"ssd_scan_varlen: dt {tuple(dt.shape)} / doc_ids {tuple(doc_ids.shape)} do not match x "
                         f"{tuple(x.shape)}")
    dt = discretise_dt(dt, dt_bias, softplus=dt_softplus, limit=dt_limit)  # [b, S, h]
    x = x.float()
    B_heads = B.float().repeat_interleave(heads // groups, dim=2)  # [b, S, g, n] -> [b, S, h, n]
    C_heads = C.float().repeat_interleave(heads // groups, dim=2)  # [b, S, g, n] -> [b, S, h, n]
    x_dt = x * dt.unsqueeze(-1)  # [b, S, h, p]
    log_decay = A.float() * dt  # [b, S, h], <= 0

    chunk = min(chunk_size, length)
    x_dt_c, B_c, C_c = (_chunked(t, chunk) for t in (x_dt, B_heads, C_heads))  # [b, c, l, h, p|n]
    doc_c = _chunked(doc_ids, chunk, fill=-1)  # [b, c, l]; the tail pad contributes nothing (x_dt = 0)
    log_decay_c = _chunked(log_decay, chunk).permute(0, 3, 1, 2)  # [b, c, l, h] -> [b, h, c, l]
    cum_decay = torch.cumsum(log_decay_c, dim=-1)  # [b, h, c, l]

    y_diag = _intra_chunk(x_dt_c, B_c, C_c, log_decay_c, doc_c)
    doc_end = doc_c[:, :, -1]  # [b, c]: the document a chunk-end state belongs to
    chunk_states = _chunk_end_states(x_dt_c, B_c, cum_decay, doc_c, doc_end)
    start_states, doc_at_start = _carry_states(chunk_states, cum_decay[..., -1], doc_end)
    y_off = _from_start_states(C_c, start_states, cum_decay, doc_c, doc_at_start)

    y = (y_diag + y_off).reshape(batch, -1, heads, head_dim)[:, :length]  # [b, c, l, h, p] -> [b, S, h, p]
    if D is not None:
        y = y + D.float()[:, None] * x
    return y


def _intra_chunk(x_dt, B, C, log_decay, doc):
    """Contributions from the same chunk: y[l] = sum_{s <= l, same doc} (C_l . B_s) decay(s -> l) x_dt[s]."""
    decay = torch.exp(_segment_sum(log_decay))  # [b, h, c, l, s]
    same_doc = doc.unsqueeze(-1) == doc.unsqueeze(-2)  # [b, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bclsh", C, B)  # [b, c, l, s, h]
    weights = scores * decay.permute(0, 2, 3, 4, 1) * same_doc.unsqueeze(-1)  # [b, h, c, l, s] -> [b, c, l, s, h]
    return torch.einsum("bclsh,bcshp->bclhp", weights, x_dt)  # [b, c, l, h, p]


def _chunk_end_states(x_dt, B, cum_decay, doc, doc_end):
    """State at the end of each chunk from that chunk's positions of the chunk's last document: [b, c, h, p, n]."""
    decay_to_end = torch.exp(cum_decay[..., -1:] - cum_decay)  # [b, h, c, l]
    in_last_doc = doc == doc_end.unsqueeze(-1)  # [b, c, l]
    weight = decay_to_end.permute(0, 2, 3, 1) * in_last_doc.unsqueeze(-1)  # [b, h, c, l] -> [b, c, l, h]
    return torch.einsum("bclhn,bclh,bclhp->bchpn", B, weight, x_dt)


def _carry_states(chunk_states, chunk_decay, doc_end):
    """Start state of every chunk: the earlier chunk-end states of the same document, decayed.

    chunk_states [b, c, h, p, n]; chunk_decay [b, h, c] (total log decay of each chunk);
    doc_end [b, c]. Slot k of the recurrence is "end of chunk k-1" (slot 0: before the sequence,
    a zero state). Slot j reaches slot i only while the document goes on: doc_end[j-1] == doc_end[i-1]
    (documents are contiguous, so every chunk end in between belongs to it too).
    Returns (start_states [b, c, h, p, n], document of each start state [b, c]).
    """
    slots = torch.cat([torch.zeros_like(chunk_states[:, :1]), chunk_states], dim=1)  # [b, c+1, h, p, n]
    doc_at_slot = torch.cat([doc_end[:, :1], doc_end], dim=1)  # [b, c+1]; slot 0 holds zeros, its id is moot
    decay = torch.exp(_segment_sum(F.pad(chunk_decay, (1, 0))))  # [b, h, c+1 (i), c+1 (j)]
    same_doc = doc_at_slot.unsqueeze(-1) == doc_at_slot.unsqueeze(-2)  # [b, c+1, c+1]
    decay = decay * same_doc.unsqueeze(1)  # [b, h, i, j]
    carried = torch.einsum("bhij,bjhpn->bihpn", decay, slots)  # [b, c+1, h, p, n]
    return carried[:, :-1], doc_at_slot[:, :-1]


def _from_start_states(C, start_states, cum_decay, doc, doc_at_start):
    """Contribution of each chunk's start state to positions that continue its document: [b, c, l, h, p]."""
    decay_from_start = torch.exp(cum_decay).permute(0, 2, 3, 1)  # [b, h, c, l] -> [b, c, l, h]
    continues = doc == doc_at_start.unsqueeze(-1)  # [b, c, l]
    read = torch.einsum("bclhn,bchpn->bclhp", C, start_states)  # [b, c, l, h, p]
    return read * (decay_from_start * continues.unsqueeze(-1)).unsqueeze(-1)


# ----------------------------------------------------------------------------------------------
# Head / group sharding
# ----------------------------------------------------------------------------------------------


def mamba2_sharding(num_heads: int, n_groups: int, size: int) -> GroupedHeadSplit:
    """Split num_heads evenly over `size` ranks; each rank receives every B/C group its heads read."""
    if n_groups < 1 or num_heads % n_groups:
        raise ValueError(f"Mamba2 mixer has {num_heads} heads and n_groups={n_groups}: the heads must split "
                         "evenly into the B/C groups (check the model config)")
    if num_heads % size:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(f"Ulysses CP over {size} ranks splits the Mamba2 heads evenly, but mamba_num_heads="
                         f"{num_heads} is not divisible by {size}: use a Ulysses degree (model.cp, or "
                         f"model.cp_ulysses) in {divisors}")
    return grouped_head_split(num_heads, n_groups, size)


def check_mamba2_cp(mixer: nn.Module, *, cp_style: str, ulysses_size: int, ring_size: int = 1) -> None:
    """Raise a ValueError naming the fix if this mixer cannot run under the given CP layout.

    Any ring degree > 1 is refused: a ring rank never sees the whole sequence of a head, which the
    scan and its causal conv need. (With ring degree 1 every style shards contiguously = Ulysses.)
    """
    if ring_size > 1:
        raise ValueError(f"model.cp_style={cp_style} (ring degree {ring_size}) cannot run Mamba2 layers (NemotronH): "
                         "the SSM scan and its causal conv need the whole sequence of a head, which only Ulysses "
                         "gives; use model.cp_style=ulysses")
    mamba2_sharding(mixer.num_heads, mixer.n_groups, ulysses_size)


# ----------------------------------------------------------------------------------------------
# The wrapper module
# ----------------------------------------------------------------------------------------------


class UlyssesMamba2Mixer(nn.Module):
    """Runs a NemotronHMamba2Mixer exactly for packed documents, under Ulysses CP when cp_params say so.

    Adopts the mixer's children and parameters under their own names (state_dict keys, FSDP and
    optimizer names are the HF names); the original module is kept, unregistered, only for HF's
    cached generation / padding path. Without cp_params, a cache or a mask, every row is one document.
    """

    def __init__(self, mixer: NemotronHMamba2Mixer) -> None:
        super().__init__()
        cache_keyword(mixer)  # a calling convention the wrapper does not know fails here, at startup
        adopt(self, mixer, _MIXER_ATTRIBUTES)

    def extra_repr(self) -> str:
        return f"{type(self._original).__name__}, heads={self.num_heads}, n_groups={self.n_groups}"

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cp_params: CPParams | None = None, **kwargs) -> torch.Tensor:
        """The decoder layer's call: mixer(hidden, cache= (5.24) | cache_params= (5.23), attention_mask=, **kwargs)."""
        cache = take_cache(kwargs, "Mamba2 mixer")
        if cp_params is None:
            if cache is not None or attention_mask is not None:  # HF generation / padding: the original's own path
                return call_original(original_if_unchanged(self, "Mamba2 mixer"), hidden_states, cache,
                                     attention_mask, **kwargs)
            batch, seq = hidden_states.shape[:2]
            doc_ids = torch.arange(batch, device=hidden_states.device)[:, None].expand(batch, seq)  # a row = a doc
            return self._forward_heads(hidden_states, doc_ids, None, 1, 0)
        self._check_call(hidden_states, cache, attention_mask, cp_params)
        group, size = cp_params.ulysses_group, cp_params.ulysses_size
        rank = dist.get_rank(group) if size > 1 else 0
        positions = cp_params.ulysses_gathered_index().to(hidden_states.device)
        doc_ids = cp_params.doc_ids.to(hidden_states.device)[:, positions]  # [B, S] of the gathered tokens
        return self._forward_heads(hidden_states, doc_ids, group, size, rank)

    def _check_call(self, hidden_states, cache, attention_mask, params: CPParams) -> None:
        """Everything a rank can check alone, before the first collective (ranks fail together)."""
        check_mamba2_cp(self, cp_style=params.style, ulysses_size=params.ulysses_size, ring_size=params.ring_size)
        if hidden_states.dim() != 3 or hidden_states.shape[:2] != (params.batch_size, params.local_len):
            raise ValueError(f"Mamba2 mixer got hidden_states {tuple(hidden_states.shape)} but CPParams describe "
                             f"[B, S_local] = [{params.batch_size}, {params.local_len}] (S_pad={params.padded_len}, "
                             f"cp={params.cp_size}): pass this rank's shard (batch.input_ids) with its own params")
        if attention_mask is not None:
            raise ValueError("a 2D padding attention_mask is not supported with cp_params: packed documents and "
                             "padding are described by cp_params (setup_cp_params makes the tail pad its own "
                             "document); drop attention_mask")
        if cache is not None and self._cache_has_state(cache):
            raise ValueError("Mamba2 under cp_params cannot continue from a filled cache (packed documents have no "
                             "single recurrent state): call the model with use_cache=False")

    def _cache_has_state(self, cache) -> bool:
        return cache.get_conv_state(self.layer_idx) is not None or cache.get_recurrent_state(self.layer_idx) is not None

    def _forward_heads(self, hidden_states: torch.Tensor, doc_ids: torch.Tensor, group, size: int,
                       rank: int) -> torch.Tensor:
        """hidden [B, S/P, d] -> out [B, S/P, d]; doc_ids [B, S] of the full (gathered) sequence."""
        sharding = mamba2_sharding(self.num_heads, self.n_groups, size)
        heads = sharding.head_index[rank]
        batch, local_len, _ = hidden_states.shape

        z, x_dt, bc = self._project(hidden_states)
        if size > 1:
            x_dt = seq_to_head(x_dt, group, sharding.head_index)  # [B, S/P, H, hd+1] -> [B, S, H/P, hd+1]
            bc = seq_to_head(bc, group, sharding.group_index)  # [B, S/P, G, 2N] -> [B, S, g_r, 2N]
        x, dt = x_dt[..., :-1], x_dt[..., -1]  # [B, S, h, hd], [B, S, h]

        x, B, C = self._conv(x, bc, doc_ids, heads, sharding.group_index[rank])
        B, C = align_groups_to_heads(B, C, sharding.local_group_of_heads(rank))

        index = torch.tensor(heads, device=hidden_states.device)
        scan = pick_mixer_kernel("ssd_scan", x.device, x.dtype)  # fused on CUDA when checked
        y = scan(x, dt, -torch.exp(self.A_log.float().index_select(0, index)), B, C, doc_ids,
                 D=self.D.index_select(0, index), dt_bias=self.dt_bias.index_select(0, index),
                 dt_limit=self.time_step_limit, chunk_size=self.chunk_size)  # [B, S, h, hd] float32
        if size > 1:
            y = head_to_seq(y, group, sharding.head_index, self.num_heads)  # [B, S, h, hd] -> [B, S/P, H, hd]
        y = self.norm(y.reshape(batch, local_len, self.intermediate_size), z)  # [B, S/P, H, hd] -> [B, S/P, I]
        return self.out_proj(y.to(hidden_states.dtype))

    def _project(self, hidden_states: torch.Tensor):
        """in_proj on the local shard -> z [B, s, I], x+dt [B, s, H, hd+1], B+C [B, s, G, 2N]."""
        m = self
        batch, local_len, _ = hidden_states.shape
        groups_width = m.n_groups * m.ssm_state_size
        z, x, B, C, dt = m.in_proj(hidden_states).split(
            [m.intermediate_size, m.intermediate_size, groups_width, groups_width, m.num_heads], dim=-1)
        x = x.reshape(batch, local_len, m.num_heads, m.head_dim)  # [B, s, I] -> [B, s, H, hd]
        x_dt = torch.cat([x, dt.unsqueeze(-1)], dim=-1)  # [B, s, H, hd] + [B, s, H, 1] -> [B, s, H, hd+1]
        B = B.reshape(batch, local_len, m.n_groups, m.ssm_state_size)  # [B, s, G*N] -> [B, s, G, N]
        C = C.reshape(batch, local_len, m.n_groups, m.ssm_state_size)  # [B, s, G*N] -> [B, s, G, N]
        return z, x_dt, torch.cat([B, C], dim=-1)  # B+C: [B, s, G, 2N]

    def _conv(self, x: torch.Tensor, bc: torch.Tensor, doc_ids: torch.Tensor, heads: list[int], groups: list[int]):
        """Varlen causal conv1d + activation over this rank's x / B / C channels (weights sliced)."""
        m = self
        batch, length, num_local, head_dim = x.shape
        state = m.ssm_state_size
        B, C = bc[..., :state], bc[..., state:]  # [B, S, g, 2N] -> [B, S, g, N] each
        channels = torch.cat([x.reshape(batch, length, num_local * head_dim),  # [B, S, h, hd] -> [B, S, h*hd]
                              B.reshape(batch, length, len(groups) * state),  # [B, S, g, N] -> [B, S, g*N]
                              C.reshape(batch, length, len(groups) * state)], dim=-1)  # [B, S, g, N] -> [B, S, g*N]
        index = _local_conv_channels(heads, groups, head_dim=head_dim, state=state,
                                     intermediate=m.intermediate_size, n_groups=m.n_groups).to(x.device)
        weight = m.conv1d.weight.index_select(0, index)  # [conv_dim, 1, K] -> [c_r, 1, K]
        bias = None if m.conv1d.bias is None else m.conv1d.bias.index_select(0, index)
        conv = pick_mixer_kernel("causal_conv1d", channels.device, channels.dtype)
        out = conv(channels, weight, bias, doc_ids, activation=m.activation)
        x, B, C = out.split([num_local * head_dim, len(groups) * state, len(groups) * state], dim=-1)
        return (x.reshape(batch, length, num_local, head_dim),  # [B, S, h*hd] -> [B, S, h, hd]
                B.reshape(batch, length, len(groups), state),  # [B, S, g*N] -> [B, S, g, N]
                C.reshape(batch, length, len(groups), state))  # [B, S, g*N] -> [B, S, g, N]


def _local_conv_channels(heads: list[int], groups: list[int], *, head_dim: int, state: int, intermediate: int,
                         n_groups: int) -> torch.Tensor:
    """Conv channels (layout [x: I | B: G*N | C: G*N]) of these heads and groups, in the local layout."""
    x_channels = [h * head_dim + i for h in heads for i in range(head_dim)]
    b_channels = [intermediate + g * state + i for g in groups for i in range(state)]
    c_channels = [intermediate + n_groups * state + g * state + i for g in groups for i in range(state)]
    return torch.tensor(x_channels + b_channels + c_channels)


# ----------------------------------------------------------------------------------------------
# Installation helpers (used by models.apply_cp)
# ----------------------------------------------------------------------------------------------


def is_mamba2_mixer(module: nn.Module) -> bool:
    """True for an unwrapped NemotronH Mamba2 mixer (block_type "linear_attention" in NemotronH)."""
    return isinstance(module, NemotronHMamba2Mixer)


def wrap_mamba2_mixer(mixer: nn.Module, *, dims: ParallelDims | None = None) -> UlyssesMamba2Mixer:
    """Wrap a NemotronHMamba2Mixer; with dims, refuse (ValueError) a CP layout it cannot run. Idempotent."""
    if not isinstance(mixer, UlyssesMamba2Mixer) and not is_mamba2_mixer(mixer):
        raise TypeError(f"wrap_mamba2_mixer expects a NemotronHMamba2Mixer, got {type(mixer).__name__}")
    if dims is not None:
        check_mamba2_cp(mixer, cp_style=dims.cp_style, ulysses_size=dims.ulysses, ring_size=dims.ring)
    return mixer if isinstance(mixer, UlyssesMamba2Mixer) else UlyssesMamba2Mixer(mixer)
