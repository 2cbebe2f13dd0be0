"""Gated DeltaNet (Qwen3.5 / Qwen3.5-MoE / Qwen3-Next linear attention) under Ulysses CP, exact for
packed documents.

    rank r: hidden [B, S/P, hidden]  (its contiguous sequence shard)
        │ in_proj_* (local): q, k [B, S/P, Hk, Dk]; v, z [B, S/P, Hv, Dv]; b, a [B, S/P, Hv]
        │ seq_to_head: 2 all-to-alls (q|k by key head, v|b|a by value head); z stays local
        v
    full sequence, this rank's heads: q, k [B, S, hk_r, Dk]; v [B, S, hv_r, Dv]; b, a [B, S, hv_r]
        │ varlen_causal_conv1d + silu    (conv taps sliced to the local channels;
        │                                 zero history at every document start)
        │ g = -exp(A_log[heads]) * softplus(a + dt_bias[heads]);  beta = sigmoid(b)
        │ varlen_gated_delta_rule        (state reset to zero at every document start)
        v
    core [B, S, hv_r, Dv] ──head_to_seq──> [B, S/P, Hv, Dv]
        │ norm(core, z)                  (gated RMSNorm per token and head: z never travels)
        │ out_proj                       (local)
        v
    out [B, S/P, hidden]

Documents come from `cp_params.doc_ids` at the positions the all-to-all gathers; without
cp_params every row is one document (or `cu_seq_lens_q`, if HF passed one). The conv and the
recurrence look back in time, which is why they run on the full sequence of a head subset
(Ulysses) and why ring / hybrid CP cannot run this layer.

Heads: value heads split evenly (Hv % P == 0, else ValueError). Value head j reads key head
j // (Hv / Hk); a rank receives exactly the key heads its value heads read, so with Hk < P a key
head is replicated to several ranks inside the all-to-all (gradients summed on the way back).
The gated RMSNorm weight is per head dim, shared by all heads: nothing to slice.

The kernel, `varlen_gated_delta_rule` (models.mixers.varlen_scans, re-exported here), is the chunked
(WY / UT-transform) form of the recurrence

    S_t = exp(g_t) * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t

(q, k l2-normalised, q scaled by Dk^-1/2) with chunks aligned to documents: each document is
cut into its own chunks (the last one zero padded), so no chunk straddles two documents and
the scan starts every document from a zero state.

On CUDA, fla's chunk_gated_delta_rule (cu_seqlens) and causal-conv1d (seq_idx) replace the torch
kernels when importable and checked against them (models.mixers.fused_kernels).

With mixer_cp="state" (model.mixer_cp) the rank keeps its shard of every head instead: the projections, the conv
(with the previous shards' last K-1 inputs as its history: ShardChain.with_halo) and the delta rule run on
[B, S/P, ...], the rule starting from the state that enters the shard (ShardChain.entering_state: every shard's
final state and [Dk, Dk] transition, gathered and folded; cp.state_passing). No head split, no all-to-all.

The wrapper adopts the mixer's children and parameters under their own names, so
`state_dict()` keys and FSDP / optimizer names are unchanged by wrapping.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cp.collectives import head_to_seq, seq_to_head
from cp.documents import doc_ids_from_cu_seqlens
from cp.params import CPParams
from cp.state_passing import ShardChain, check_state_layout, matrix_transition
from cp.ulysses import GroupedHeadSplit, align_groups_to_heads, grouped_head_split
from models.mixers.hf_conventions import adopt, cache_keyword, call_original, original_if_unchanged, take_cache
from models.mixers.fused_kernels import pick as pick_mixer_kernel
from models.mixers.spec import MixerSpec
from models.mixers.varlen_ops import ACTIVATIONS

# The varlen kernel lives in models.mixers.varlen_scans (next to the varlen conv); these names stay importable here.
from models.mixers.varlen_scans import (  # noqa: F401
    L2NORM_EPS,
    ChunkPlan,
    document_chunk_plan,
    l2_normalize,
    varlen_gated_delta_rule,
)

# HF class name -> how its input projections are laid out.
#   "split": in_proj_qkv [q | k | v], in_proj_z, in_proj_b, in_proj_a (Qwen3.5 family)
#   "fused": in_proj_qkvz grouped per key head [q_g | k_g | v_g | z_g], in_proj_ba [b_g | a_g] (Qwen3-Next)
PROJECTION_LAYOUTS = {
    "Qwen3_5GatedDeltaNet": "split",
    "Qwen3_5MoeGatedDeltaNet": "split",
    "Qwen3NextGatedDeltaNet": "fused",
}
_LAYOUT_ATTRIBUTES = {
    "split": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
    "fused": ("in_proj_qkvz", "in_proj_ba"),
}
_SHARED_ATTRIBUTES = ("conv1d", "A_log", "dt_bias", "norm", "out_proj")
_CONFIG_ATTRIBUTES = ("hidden_size", "num_v_heads", "num_k_heads", "head_k_dim", "head_v_dim", "key_dim",
                      "value_dim", "conv_kernel_size", "layer_idx", "activation", "layer_type")


# ---------------------------------------------------------------------------------------------
# Heads: which value and key heads each Ulysses rank owns
# ---------------------------------------------------------------------------------------------


def split_heads(num_v_heads: int, num_k_heads: int, size: int) -> GroupedHeadSplit:
    """Even contiguous value-head split over `size` ranks and the key heads each rank then needs
    (key heads shared between ranks when Hk < P)."""
    if num_k_heads < 1 or num_v_heads % num_k_heads:
        raise ValueError(f"GatedDeltaNet with {num_v_heads} value heads and {num_k_heads} key heads: "
                         "value heads must be a multiple of key heads")
    if num_v_heads % size:
        raise ValueError(f"Ulysses CP over {size} ranks splits GatedDeltaNet value heads evenly, but the model has "
                         f"{num_v_heads} (linear_num_value_heads): set model.cp (Ulysses degree) to a divisor of "
                         f"{num_v_heads}")
    return grouped_head_split(num_v_heads, num_k_heads, size)


# ---------------------------------------------------------------------------------------------
# The wrapper module
# ---------------------------------------------------------------------------------------------


class UlyssesGatedDeltaNet(nn.Module):
    """A GatedDeltaNet mixer, exact for packed documents, under Ulysses CP when given cp_params.

    Registers the mixer's children and parameters under the same names (state_dict keys do not
    change); the original module is kept, unregistered, only for HF's cached generation path.
    """

    def __init__(self, mixer: nn.Module, *, chunk_size: int = 64, mixer_cp: str = "ulysses"):
        super().__init__()
        self.mixer_cp = mixer_cp  # ulysses (heads all-to-all) | state (cp.state_passing)
        self.projection_layout = projection_layout(mixer)
        cache_keyword(mixer)  # a calling convention the wrapper does not know fails here, at startup
        if mixer.activation not in ACTIVATIONS:
            raise ValueError(f"GatedDeltaNet conv activation {mixer.activation!r} is not supported by the varlen conv "
                             f"(known: {sorted(ACTIVATIONS)})")
        adopt(self, mixer, _CONFIG_ATTRIBUTES)
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        return (f"{type(self._original).__name__}, layout={self.projection_layout}, v_heads={self.num_v_heads}, "
                f"k_heads={self.num_k_heads}, chunk_size={self.chunk_size}, mixer_cp={self.mixer_cp}")

    # -- projections (on this rank's sequence shard, all heads) --------------------------------

    def project(self, hidden_states: torch.Tensor):
        """hidden [B, s, hidden] -> q, k [B, s, Hk, Dk]; v, z [B, s, Hv, Dv]; b, a [B, s, Hv]."""
        batch, seq = hidden_states.shape[:2]
        num_k, num_v, dk, dv = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        if self.projection_layout == "split":
            q, k, v = self.in_proj_qkv(hidden_states).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
            q = q.reshape(batch, seq, num_k, dk)  # [B, s, Hk * Dk] -> [B, s, Hk, Dk]
            k = k.reshape(batch, seq, num_k, dk)  # [B, s, Hk * Dk] -> [B, s, Hk, Dk]
            v = v.reshape(batch, seq, num_v, dv)  # [B, s, Hv * Dv] -> [B, s, Hv, Dv]
            z = self.in_proj_z(hidden_states).reshape(batch, seq, num_v, dv)  # [B, s, Hv * Dv] -> [B, s, Hv, Dv]
            return q, k, v, z, self.in_proj_b(hidden_states), self.in_proj_a(hidden_states)
        ratio = num_v // num_k
        qkvz = self.in_proj_qkvz(hidden_states).reshape(batch, seq, num_k, 2 * dk + 2 * ratio * dv)  # per key group
        q, k, v, z = qkvz.split([dk, dk, ratio * dv, ratio * dv], dim=-1)
        v = v.reshape(batch, seq, num_v, dv)  # [B, s, Hk, ratio * Dv] -> [B, s, Hv, Dv]
        z = z.reshape(batch, seq, num_v, dv)  # [B, s, Hk, ratio * Dv] -> [B, s, Hv, Dv]
        ba = self.in_proj_ba(hidden_states).reshape(batch, seq, num_k, 2 * ratio)  # [B, s, Hk * 2r] -> [B, s, Hk, 2r]
        b, a = ba.split([ratio, ratio], dim=-1)
        return q, k, v, z, b.reshape(batch, seq, num_v), a.reshape(batch, seq, num_v)  # [B, s, Hk, r] -> [B, s, Hv]

    # -- the token mixing (full sequence, a subset of heads) ------------------------------------

    def _local_conv_weight(self, key_heads: list[int], value_heads: list[int]):
        """conv1d taps / bias of the channels [q of key_heads | k of key_heads | v of value_heads]."""
        device = self.conv1d.weight.device

        def channels(heads: list[int], head_dim: int, offset: int) -> torch.Tensor:
            first = torch.tensor(heads, device=device)[:, None] * head_dim + offset  # [h, 1]
            return (first + torch.arange(head_dim, device=device)).flatten()  # [h, D] -> [h * D]

        index = torch.cat([channels(key_heads, self.head_k_dim, 0), channels(key_heads, self.head_k_dim, self.key_dim),
                           channels(value_heads, self.head_v_dim, 2 * self.key_dim)])
        weight = self.conv1d.weight.squeeze(1).index_select(0, index)  # [conv_dim, 1, K] -> [C_r, K]
        bias = None if self.conv1d.bias is None else self.conv1d.bias.index_select(0, index)
        return weight, bias

    def mix_heads(self, q, k, v, b, a, doc_ids: torch.Tensor, value_heads: list[int], key_heads: list[int],
                  key_of_value: list[int], chain: ShardChain | None = None) -> torch.Tensor:
        """Conv + gated delta rule of full sequences: q, k [B, S, hk, Dk]; v [B, S, hv, Dv]; b, a [B, S, hv].
        With `chain` (state-passing CP) the sequences are this rank's shard of every head: the conv reads the
        previous shard's tail and the rule starts from the state entering the shard (cp.state_passing).

        Returns the core output [B, S, hv, Dv] (before the gated norm).
        """
        batch, seq, num_k = q.shape[:3]
        num_v = v.shape[2]
        weight, bias = self._local_conv_weight(key_heads, value_heads)
        mixed = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)  # -> [B, S, 2 hk Dk + hv Dv]
        conv = pick_mixer_kernel("causal_conv1d", mixed.device, mixed.dtype)  # fused on CUDA when checked
        if chain is None:
            mixed = conv(mixed, weight, bias, doc_ids, activation=self.activation)
        else:  # the previous shards' last inputs as history
            mixed = chain.causal_conv(conv, mixed, weight, bias, activation=self.activation)
        q, k, v = mixed.split([num_k * self.head_k_dim, num_k * self.head_k_dim, num_v * self.head_v_dim], dim=-1)
        q = q.reshape(batch, seq, num_k, self.head_k_dim)  # [B, S, hk * Dk] -> [B, S, hk, Dk]
        k = k.reshape(batch, seq, num_k, self.head_k_dim)  # [B, S, hk * Dk] -> [B, S, hk, Dk]
        v = v.reshape(batch, seq, num_v, self.head_v_dim)  # [B, S, hv * Dv] -> [B, S, hv, Dv]
        q, k = align_groups_to_heads(q, k, key_of_value)  # [B, S, hk_r, Dk] -> heads line up with v

        heads = torch.tensor(value_heads, device=a.device)
        beta = b.sigmoid()
        a_log, dt_bias = self.A_log.index_select(0, heads), self.dt_bias.index_select(0, heads)  # [Hv] -> [hv_r]
        g = -a_log.float().exp() * F.softplus(a.float() + dt_bias)
        options = {}
        if chain is not None:  # the state entering the shard, from every earlier shard's summary
            options["entering_state"] = lambda final, transition: chain.entering_state(transition, final,
                                                                                       matrix_transition)
        delta_rule = pick_mixer_kernel("gated_delta_rule", v.device, v.dtype, entering_state=chain is not None)
        return delta_rule(q, k, v, g, beta, doc_ids, use_qk_l2norm=True, chunk_size=self.chunk_size, **options)

    def gated_output(self, core: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """core, z [B, s, Hv, Dv] -> out_proj(norm(core, z)) [B, s, hidden]."""
        batch, seq = z.shape[:2]
        normed = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))  # -> [B*s*Hv, Dv]
        return self.out_proj(normed.reshape(batch, seq, self.value_dim))  # [B*s*Hv, Dv] -> [B, s, Hv * Dv]

    # -- forward -----------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cp_params: CPParams | None = None, **kwargs) -> torch.Tensor:
        """The decoder layer's call: linear_attn(hidden_states=, cache= (5.24) | cache_params= (5.23),
        attention_mask=, **kwargs); cp_params arrives through **kwargs of the model's forward. hidden [B, S_local, hidden]."""
        cache = take_cache(kwargs, "GatedDeltaNet")
        if cache is not None:
            return self._cached_forward(hidden_states, cache, attention_mask, cp_params, **kwargs)
        if cp_params is None:
            doc_ids = self._documents_without_cp(hidden_states, kwargs.get("cu_seq_lens_q"))
            if attention_mask is not None:
                hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
            return self._forward_heads(hidden_states, doc_ids, None, 1, 0)
        check_cp_call(self, hidden_states, attention_mask, cp_params)
        if self.mixer_cp == "state":
            return self._forward_state(hidden_states, ShardChain.from_params(cp_params))
        group, size = cp_params.ulysses_group, cp_params.ulysses_size
        rank = dist.get_rank(group) if size > 1 else 0
        positions = cp_params.ulysses_gathered_index().to(cp_params.doc_ids.device)
        doc_ids = cp_params.doc_ids[:, positions].to(hidden_states.device)  # [B, S_pad] of the gathered tokens
        return self._forward_heads(hidden_states, doc_ids, group, size, rank)

    def _forward_heads(self, hidden_states, doc_ids, group, size: int, rank: int) -> torch.Tensor:
        split = split_heads(self.num_v_heads, self.num_k_heads, size)
        q, k, v, z, b, a = self.project(hidden_states)
        if size > 1:
            q, k, v, b, a = _gather_sequence_scatter_heads(q, k, v, b, a, group, split)
        core = self.mix_heads(q, k, v, b, a, doc_ids, split.head_index[rank], split.group_index[rank],
                              split.local_group_of_heads(rank))  # [B, S, hv_r, Dv]
        if size > 1:
            core = head_to_seq(core, group, split.head_index, self.num_v_heads)  # [B, S, hv_r, Dv] -> [B, S/P, Hv, Dv]
        return self.gated_output(core.to(z.dtype), z)

    def _forward_state(self, hidden_states: torch.Tensor, chain: ShardChain) -> torch.Tensor:
        """State-passing CP: every head of this rank's shard; only the conv halo and the shard states travel."""
        split = split_heads(self.num_v_heads, self.num_k_heads, 1)
        q, k, v, z, b, a = self.project(hidden_states)
        doc_ids = chain.local_doc_ids.to(hidden_states.device)
        core = self.mix_heads(q, k, v, b, a, doc_ids, split.head_index[0], split.group_index[0],
                              split.local_group_of_heads(0), chain=chain)  # [B, S/P, Hv, Dv]
        return self.gated_output(core.to(z.dtype), z)

    def _documents_without_cp(self, hidden_states: torch.Tensor, cu_seqlens) -> torch.Tensor:
        batch, seq = hidden_states.shape[:2]
        if cu_seqlens is not None:  # HF's packed-sequence kwarg (flattened rows)
            return doc_ids_from_cu_seqlens(cu_seqlens, batch, seq).to(hidden_states.device)
        return torch.arange(batch, device=hidden_states.device)[:, None].expand(batch, seq)

    def _cached_forward(self, hidden_states, cache, attention_mask, cp_params, **kwargs):
        """HF generation (a cache present): the original module's own path, one document per row."""
        if cp_params is not None:
            raise ValueError("GatedDeltaNet under CP does not fill a generation cache: call the model with "
                             "use_cache=False (HF's default use_cache=True makes a DynamicCache even in training)")
        original = original_if_unchanged(self, "GatedDeltaNet")
        return call_original(original, hidden_states, cache, attention_mask, **kwargs)


def _gather_sequence_scatter_heads(q, k, v, b, a, group, split: GroupedHeadSplit):
    """Sequence shard, all heads -> full sequence, this rank's heads: two all-to-alls (by key head,
    by value head) of packed tensors."""
    head_k, head_v = q.shape[-1], v.shape[-1]
    qk = torch.cat([q, k], dim=-1)  # [B, s, Hk, Dk] x 2 -> [B, s, Hk, 2 Dk]
    vba = torch.cat([v, b.unsqueeze(-1).to(v.dtype), a.unsqueeze(-1).to(v.dtype)], dim=-1)  # -> [B, s, Hv, Dv + 2]
    qk = seq_to_head(qk, group, split.group_index)  # [B, s, Hk, 2 Dk] -> [B, S, hk_r, 2 Dk]
    vba = seq_to_head(vba, group, split.head_index)  # [B, s, Hv, Dv + 2] -> [B, S, hv_r, Dv + 2]
    q, k = qk.split([head_k, head_k], dim=-1)
    v, b, a = vba.split([head_v, 1, 1], dim=-1)
    return q, k, v, b.squeeze(-1), a.squeeze(-1)  # b, a: [B, S, hv_r, 1] -> [B, S, hv_r]


def check_cp_call(module: UlyssesGatedDeltaNet, hidden_states: torch.Tensor, attention_mask, params: CPParams) -> None:
    """Everything that would otherwise deadlock or silently corrupt the collectives; raise first."""
    if params.ring_size > 1:
        raise ValueError(f"{params.style} CP cannot run linear-attention layers (GatedDeltaNet): the conv and the "
                         "recurrence need the full sequence of their heads; use model.cp_style=ulysses")
    if attention_mask is not None:
        raise ValueError("GatedDeltaNet under CP got a padding attention_mask: describe padding and packing with "
                         "cp.setup_cp_params(seq_lens=...) (the pad is its own document) and pass no attention_mask")
    if tuple(hidden_states.shape[:2]) != (params.batch_size, params.local_len):
        raise ValueError(f"GatedDeltaNet got hidden states [B, S_local] = {list(hidden_states.shape[:2])} but CPParams "
                         f"describe [{params.batch_size}, {params.local_len}] (S_pad={params.padded_len}, "
                         f"cp={params.cp_size})")
    if module.mixer_cp == "state":
        check_state_layout(params)
    else:
        split_heads(module.num_v_heads, module.num_k_heads, params.ulysses_size)


def projection_layout(module: nn.Module) -> str:
    """'split' or 'fused' for a supported HF GatedDeltaNet; ValueError naming the supported classes otherwise."""
    name = type(module).__name__
    layout = PROJECTION_LAYOUTS.get(name)
    if layout is None:
        raise ValueError(f"{name} is not a supported GatedDeltaNet (supported: {sorted(PROJECTION_LAYOUTS)})")
    missing = [a for a in _SHARED_ATTRIBUTES + _LAYOUT_ATTRIBUTES[layout] if not hasattr(module, a)]
    if missing:
        raise ValueError(f"{name} lacks {missing}: this transformers version lays out GatedDeltaNet differently")
    return layout


def is_gated_deltanet(module: nn.Module) -> bool:
    """True for an unwrapped HF GatedDeltaNet this file can wrap."""
    return type(module).__name__ in PROJECTION_LAYOUTS


def wrap_gated_deltanet(module: nn.Module, *, ulysses_size: int | None = None, chunk_size: int = 64,
                        mixer_cp: str = "ulysses") -> UlyssesGatedDeltaNet:
    """Wrap an HF GatedDeltaNet (idempotent; mixer_cp set again). With `ulysses_size` and mixer_cp=ulysses, check
    the head split now, at startup (state passing splits no heads)."""
    if isinstance(module, UlyssesGatedDeltaNet):
        wrapped = module
        wrapped.mixer_cp = mixer_cp
    else:
        wrapped = UlyssesGatedDeltaNet(module, chunk_size=chunk_size, mixer_cp=mixer_cp)
    if ulysses_size is not None and mixer_cp == "ulysses":
        split_heads(wrapped.num_v_heads, wrapped.num_k_heads, ulysses_size)
    return wrapped


SPEC = MixerSpec(
    name="gated_deltanet",
    description="GatedDeltaNet (linear attention)",
    class_names={"Qwen3_5GatedDeltaNet": "Qwen3.5 GatedDeltaNet (linear attention)",
                 "Qwen3_5MoeGatedDeltaNet": "Qwen3.5-MoE GatedDeltaNet (linear attention)",
                 "Qwen3NextGatedDeltaNet": "Qwen3-Next GatedDeltaNet (linear attention)"},
    wrapper=UlyssesGatedDeltaNet,
    wrap=lambda module, dims, mixer_cp="ulysses": wrap_gated_deltanet(
        module, ulysses_size=None if dims is None else dims.ulysses, mixer_cp=mixer_cp),
    kernels=("causal_conv1d", "gated_delta_rule"),
    mixer_cp=("ulysses", "state"),
)
