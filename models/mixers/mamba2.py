"""Mamba2 mixers (NemotronH's; Bamba's through models/mixers/bamba.py) under Ulysses context parallelism, exact for
packed documents.

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
state_dict keys, FSDP / optimizer / PEFT names are the HF names (models.mixers.hf_conventions).

With mixer_cp="state" (model.mixer_cp) the rank keeps its shard of every head instead: the conv reads the previous
shards' last K-1 inputs (ShardChain.with_halo), the scan starts from the state entering the shard (every shard's
final state [H, hd, N] and scalar decay per head, gathered and folded: cp.state_passing), which adds
C_t . (decay from the shard start to t) . state to the shard's first document. No head split, no all-to-all.

The kernels are plain torch in float32 (`models.mixers.varlen_scans.ssd_scan_varlen`, re-exported here, and
`models.mixers.varlen_ops.varlen_causal_conv1d`); autograd gives the backward. On CUDA, mamba-ssm's scan and causal-conv1d (with seq_idx) replace them
when importable and checked against them (models.mixers.fused_kernels).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

from cp.collectives import head_to_seq, seq_to_head
from cp.dims import ParallelDims
from cp.params import CPParams
from cp.state_passing import ShardChain, check_state_layout, decay_transition
from cp.ulysses import GroupedHeadSplit, align_groups_to_heads, grouped_head_split
from models.mixers.hf_conventions import adopt, cache_keyword, call_original, original_if_unchanged, take_cache
from models.mixers.fused_kernels import pick as pick_mixer_kernel
from models.mixers.spec import MixerSpec

# The varlen scan lives in models.mixers.varlen_scans (next to the varlen conv); these names stay importable here.
from models.mixers.varlen_scans import discretise_dt, ssd_scan_varlen  # noqa: F401

# Plain attributes of a Mamba2 mixer the wrapper reads (its children and parameters are adopted), and the
# children / parameters it runs: NemotronHMamba2Mixer and transformers' Mamba2Mixer share this layout.
_MIXER_ATTRIBUTES = ("num_heads", "n_groups", "head_dim", "ssm_state_size", "intermediate_size", "time_step_limit",
                     "chunk_size", "activation", "layer_idx", "hidden_size", "conv_kernel_size")
_MIXER_PARTS = ("in_proj", "conv1d", "A_log", "D", "dt_bias", "norm", "out_proj")

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


def check_mamba2_cp(mixer: nn.Module, *, cp_style: str, ulysses_size: int, ring_size: int = 1,
                    mixer_cp: str = "ulysses") -> None:
    """Raise a ValueError naming the fix if this mixer cannot run under the given CP layout.

    Any ring degree > 1 is refused: a ring rank never sees the whole sequence of a head, which the
    scan and its causal conv need. (With ring degree 1 every style shards contiguously = Ulysses.)
    Under mixer_cp=state no heads are split.
    """
    if ring_size > 1:
        raise ValueError(f"model.cp_style={cp_style} (ring degree {ring_size}) cannot run Mamba2 layers "
                         f"({type(mixer).__name__}): "
                         "the SSM scan and its causal conv need the whole sequence of a head, which only Ulysses "
                         "gives; use model.cp_style=ulysses")
    mamba2_sharding(mixer.num_heads, mixer.n_groups, 1 if mixer_cp == "state" else ulysses_size)


# ----------------------------------------------------------------------------------------------
# The wrapper module
# ----------------------------------------------------------------------------------------------


class UlyssesMamba2Mixer(nn.Module):
    """Runs a Mamba2 mixer (NemotronHMamba2Mixer, Mamba2Mixer) exactly for packed documents, under Ulysses CP
    when cp_params say so.

    Adopts the mixer's children and parameters under their own names (state_dict keys, FSDP and
    optimizer names are the HF names); the original module is kept, unregistered, only for HF's
    cached generation / padding path. Without cp_params, a cache or a mask, every row is one document.
    """

    def __init__(self, mixer: nn.Module, mixer_cp: str = "ulysses") -> None:
        super().__init__()
        self.mixer_cp = mixer_cp  # ulysses (heads all-to-all) | state (cp.state_passing)
        cache_keyword(mixer)  # a calling convention the wrapper does not know fails here, at startup
        check_mamba2_layout(mixer)
        adopt(self, mixer, _MIXER_ATTRIBUTES)

    def extra_repr(self) -> str:
        return (f"{type(self._original).__name__}, heads={self.num_heads}, n_groups={self.n_groups}, "
                f"mixer_cp={self.mixer_cp}")

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
        if self.mixer_cp == "state":
            return self._forward_heads(hidden_states, None, None, 1, 0, chain=ShardChain.from_params(cp_params))
        group, size = cp_params.ulysses_group, cp_params.ulysses_size
        rank = dist.get_rank(group) if size > 1 else 0
        positions = cp_params.ulysses_gathered_index().to(hidden_states.device)
        doc_ids = cp_params.doc_ids.to(hidden_states.device)[:, positions]  # [B, S] of the gathered tokens
        return self._forward_heads(hidden_states, doc_ids, group, size, rank)

    def _check_call(self, hidden_states, cache, attention_mask, params: CPParams) -> None:
        """Everything a rank can check alone, before the first collective (ranks fail together)."""
        check_mamba2_cp(self, cp_style=params.style, ulysses_size=params.ulysses_size, ring_size=params.ring_size,
                        mixer_cp=self.mixer_cp)
        if self.mixer_cp == "state":
            check_state_layout(params)
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

    def _forward_heads(self, hidden_states: torch.Tensor, doc_ids: torch.Tensor | None, group, size: int,
                       rank: int, chain: ShardChain | None = None) -> torch.Tensor:
        """hidden [B, S/P, d] -> out [B, S/P, d]; doc_ids [B, S] of the full (gathered) sequence. With `chain`
        (state-passing CP, size 1): every head of this rank's shard, the conv halo and the entering state from the
        chain (cp.state_passing)."""
        if chain is not None:
            doc_ids = chain.local_doc_ids.to(hidden_states.device)
        sharding = mamba2_sharding(self.num_heads, self.n_groups, size)
        heads = sharding.head_index[rank]
        batch, local_len, _ = hidden_states.shape

        z, x_dt, bc = self._project(hidden_states)
        if size > 1:
            x_dt = seq_to_head(x_dt, group, sharding.head_index)  # [B, S/P, H, hd+1] -> [B, S, H/P, hd+1]
            bc = seq_to_head(bc, group, sharding.group_index)  # [B, S/P, G, 2N] -> [B, S, g_r, 2N]
        x, dt = x_dt[..., :-1], x_dt[..., -1]  # [B, S, h, hd], [B, S, h]

        x, B, C = self._conv(x, bc, doc_ids, heads, sharding.group_index[rank], chain)
        B, C = align_groups_to_heads(B, C, sharding.local_group_of_heads(rank))

        index = torch.tensor(heads, device=hidden_states.device)
        scan = pick_mixer_kernel("ssd_scan", x.device, x.dtype, entering_state=chain is not None)  # fused if checked
        options = {}
        if chain is not None:  # the state entering the shard, from every earlier shard's summary
            options["entering_state"] = lambda final, decay: chain.entering_state(decay, final, decay_transition)
        y = scan(x, dt, -torch.exp(self.A_log.float().index_select(0, index)), B, C, doc_ids,
                 D=self.D.index_select(0, index), dt_bias=self.dt_bias.index_select(0, index),
                 dt_limit=self.time_step_limit, chunk_size=self.chunk_size, **options)  # [B, S, h, hd] float32
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

    def _conv(self, x: torch.Tensor, bc: torch.Tensor, doc_ids: torch.Tensor, heads: list[int], groups: list[int],
              chain: ShardChain | None = None):
        """Varlen causal conv1d + activation over this rank's x / B / C channels (weights sliced); with `chain`,
        over the shard with the previous shard's tail as its history."""
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
        if chain is None:
            out = conv(channels, weight, bias, doc_ids, activation=m.activation)
        else:  # the previous shards' last inputs as history
            out = chain.causal_conv(conv, channels, weight, bias, activation=m.activation)
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


def check_mamba2_layout(mixer: nn.Module) -> None:
    """ValueError unless `mixer` has the Mamba2 layout the wrapper computes exactly: in_proj -> [z: I | x: I |
    B: G*N | C: G*N | dt: H], a depthwise conv over [x | B | C], per-head A_log / D / dt_bias, a gated norm
    over the I channels of a token, out_proj."""
    name = type(mixer).__name__
    missing = [a for a in _MIXER_ATTRIBUTES + _MIXER_PARTS if not hasattr(mixer, a)]
    if missing:
        raise ValueError(f"{name} lacks {missing}: not the Mamba2 layout cptrain's wrapper runs; use a supported "
                         "transformers version or another model family")
    width = 2 * mixer.intermediate_size + 2 * mixer.n_groups * mixer.ssm_state_size + mixer.num_heads
    conv = mixer.intermediate_size + 2 * mixer.n_groups * mixer.ssm_state_size
    if mixer.in_proj.out_features != width or mixer.conv1d.out_channels != conv or mixer.conv1d.groups != conv:
        raise ValueError(f"{name}: in_proj gives {mixer.in_proj.out_features} features and conv1d "
                         f"{mixer.conv1d.out_channels} channels (groups {mixer.conv1d.groups}), not the Mamba2 layout "
                         f"[z | x | B | C | dt] = {width} and a depthwise conv over {conv}: refusing to run it wrong")
    if mixer.num_heads * mixer.head_dim != mixer.intermediate_size:
        raise ValueError(f"{name}: num_heads * head_dim = {mixer.num_heads * mixer.head_dim} differs from "
                         f"intermediate_size {mixer.intermediate_size}: check the model config")


def is_mamba2_mixer(module: nn.Module) -> bool:
    """True for an unwrapped NemotronH Mamba2 mixer (block_type "mamba" in NemotronH)."""
    return isinstance(module, NemotronHMamba2Mixer)


def wrap_mamba2_mixer(mixer: nn.Module, *, dims: ParallelDims | None = None,
                      classes: tuple[str, ...] = ("NemotronHMamba2Mixer",),
                      mixer_cp: str = "ulysses") -> UlyssesMamba2Mixer:
    """Wrap a Mamba2 mixer of one of `classes` (default NemotronH's); with dims, refuse (ValueError) a CP layout it
    cannot run. Idempotent (mixer_cp set again)."""
    if not isinstance(mixer, UlyssesMamba2Mixer) and type(mixer).__name__ not in classes:
        raise TypeError(f"wrap_mamba2_mixer expects a {' or '.join(classes)}, got {type(mixer).__name__}")
    if dims is not None:
        check_mamba2_cp(mixer, cp_style=dims.cp_style, ulysses_size=dims.ulysses, ring_size=dims.ring,
                        mixer_cp=mixer_cp)
    if isinstance(mixer, UlyssesMamba2Mixer):
        mixer.mixer_cp = mixer_cp
        return mixer
    return UlyssesMamba2Mixer(mixer, mixer_cp=mixer_cp)


SPEC = MixerSpec(
    name="mamba2",
    description="Mamba2 (SSM)",
    class_names={"NemotronHMamba2Mixer": "NemotronH Mamba2 (SSM)"},
    wrapper=UlyssesMamba2Mixer,
    wrap=lambda module, dims, mixer_cp="ulysses": wrap_mamba2_mixer(module, dims=dims, mixer_cp=mixer_cp),
    kernels=("causal_conv1d", "ssd_scan"),
    mixer_cp=("ulysses", "state"),
)
