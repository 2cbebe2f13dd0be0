"""Per-batch CP metadata (`CPParams`) and the sharding of a batch (`setup_cp_params`).

    full batch, same on every cp rank        setup_cp_params                    this rank
    input_ids    [B, S]          ─┐   1. validate shapes, packing (no collective yet)
    position_ids [B, S] or None   │   2. check every cp rank got the same shapes (one tiny all-gather)
    labels       [B, S] or None   ├─> 3. GLOBAL position_ids from seq_lens (before sharding)
    seq_lens     [[30, 1, 50]]    │   4. pad S -> S_pad (multiple of the layout's needs); the pad
                                 ─┘      is its own document, labels -100
                                      5. full-sequence cu_seqlens, doc ids; shard by the layout ─> CPBatch
                                                                         input_ids    [B, S_pad/cp]
                                                                         position_ids [B, S_pad/cp]
                                                                         labels       [B, S_pad/cp]
                                                                         params: CPParams

Packing with batch size > 1: every row is its own packed sequence (documents never cross rows);
`seq_lens` holds one list of document lengths per row. `cu_seqlens` covers the rows flattened
(THD order, row b starting at b * S_pad), pad documents included. Without `seq_lens`, documents
are read from `position_ids` (a new document wherever the position does not continue by +1), and
without either each row is one document.

CPParams travels with the call (model kwargs, attention functions): no global state, so policy and
reference models and successive micro-batches never see each other's metadata. The conversions between
seq_lens, cu_seqlens, doc ids and positions live in cp.documents (re-exported here: IGNORE_INDEX,
cu_seqlens_from_doc_ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist

from cp.collectives import gather_seq, group_size
from cp.dims import ParallelDims
from cp.documents import (  # noqa: F401  (IGNORE_INDEX, cu_seqlens_from_doc_ids re-exported: callers import them here)
    IGNORE_INDEX,
    cu_seqlens_from_doc_ids,
    doc_ids_from_seq_lens,
    positions_from_seq_lens,
    seq_lens_from_cu_seqlens,
    seq_lens_from_position_ids,
)
from cp.layouts import pad_multiple, shard_indices
from cp.styles import CP_STYLES, CPConfigError, get_style


@dataclass(frozen=True, eq=False)
class CPParams:
    """Everything a CP attention path needs about the current batch and the groups."""

    style: str  # a name in cp.styles.CP_STYLES (ulysses | ring | hybrid)
    layout: str  # contiguous | zigzag: the ring-level layout (Ulysses ranks always split contiguously)
    cp_size: int
    cp_rank: int
    ring_size: int
    ulysses_size: int
    cp_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    seq_len: int  # S as given
    padded_len: int  # S_pad: S rounded up so every rank gets an equal shard
    seq_lens: tuple[tuple[int, ...], ...]  # document lengths per row, the pad document included
    cu_seqlens: torch.Tensor  # int32 [n_docs + 1], rows flattened (row b starts at b * S_pad)
    max_seqlen: int
    doc_ids: torch.Tensor  # int64 [B, S_pad]: document of each global position, unique across rows
    shard_index: torch.Tensor  # int64 [cp, S_pad / cp]: global positions held by each cp rank

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def pad(self) -> int:
        return self.padded_len - self.seq_len

    @property
    def local_len(self) -> int:
        return self.padded_len // self.cp_size

    @property
    def local_index(self) -> torch.Tensor:
        """Global positions of this rank's tokens: [S_pad / cp]."""
        return self.shard_index[self.cp_rank]

    @property
    def ring_rank(self) -> int:
        return self.cp_rank // self.ulysses_size

    @property
    def ulysses_rank(self) -> int:
        return self.cp_rank % self.ulysses_size

    def ring_block_index(self, ring_rank: int) -> torch.Tensor:
        """Global positions, in order, of the block ring rank `ring_rank` holds once its Ulysses
        group has gathered its shards ([S_pad / ring]; with no Ulysses level, that rank's shard)."""
        first = ring_rank * self.ulysses_size
        return self.shard_index[first:first + self.ulysses_size].reshape(-1)

    def ulysses_gathered_index(self) -> torch.Tensor:
        """Global positions, in order, of the sequence a Ulysses all-to-all gathers on this rank."""
        return self.ring_block_index(self.ring_rank)

    @cached_property
    def memo(self) -> dict:
        """Per-micro-batch cache for plans derived from these params (e.g. the ring's), shared by every layer."""
        return {}

    @cached_property
    def document_spans(self) -> tuple[tuple[int, int, int], ...] | None:
        """(row, start, end) of every document in the sequence a Ulysses all-to-all gathers, when
        that sequence is the whole row in order (no ring level), so every document is one
        contiguous run of it; None otherwise. From seq_lens (host-side)."""
        gathered = self.ulysses_gathered_index()
        if self.ring_size != 1 or not torch.equal(gathered.cpu(), torch.arange(self.padded_len)):
            return None
        spans = []
        for row, lens in enumerate(self.seq_lens):
            ends = torch.tensor(lens).cumsum(0).tolist()
            spans += [(row, end - n, end) for n, end in zip(lens, ends)]
        return tuple(spans)


@dataclass(frozen=True, eq=False)
class CPBatch:
    """This rank's shards of a batch and the CPParams that describe it."""

    input_ids: torch.Tensor  # [B, S_pad / cp]
    position_ids: torch.Tensor  # [B, S_pad / cp], global (document-relative) positions
    labels: torch.Tensor | None  # [B, S_pad / cp], pad positions -100
    params: CPParams


def _normalise_seq_lens(seq_lens, cu_seqlens, position_ids, batch: int, length: int) -> list[list[int]]:
    if seq_lens is not None and cu_seqlens is not None:
        raise ValueError("give seq_lens or cu_seqlens, not both")
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"cu_seqlens describes one row; batch has {batch} rows: pass seq_lens (one list per row)")
        seq_lens = seq_lens_from_cu_seqlens(cu_seqlens, length)
    if seq_lens is None:
        if position_ids is not None:
            return seq_lens_from_position_ids(position_ids)
        return [[length] for _ in range(batch)]
    if isinstance(seq_lens, torch.Tensor):
        seq_lens = seq_lens.tolist()
    seq_lens = [list(seq_lens)] if seq_lens and isinstance(seq_lens[0], int) else [list(r) for r in seq_lens]
    if len(seq_lens) != batch:
        raise ValueError(f"seq_lens has {len(seq_lens)} rows but the batch has {batch}: give one list of "
                         "document lengths per row")
    for b, row in enumerate(seq_lens):
        if any(int(n) <= 0 for n in row):
            raise ValueError(f"seq_lens row {b} has a document of length <= 0: {row}")
        if sum(row) != length:
            raise ValueError(f"seq_lens row {b} sums to {sum(row)}, but the sequence length is {length}")
    return [[int(n) for n in row] for row in seq_lens]


def _check_same_on_all_ranks(group, input_ids, seq_lens, position_ids, labels) -> None:
    """One fixed-size all-gather so mismatched inputs fail here, on every rank, not in a later collective."""
    fingerprint = torch.tensor([input_ids.shape[0], input_ids.shape[1], sum(len(r) for r in seq_lens),
                                hash(tuple(map(tuple, seq_lens))) % (2 ** 61), position_ids is not None,
                                labels is not None], dtype=torch.int64)
    parts = [torch.empty_like(fingerprint) for _ in range(group_size(group))]
    dist.all_gather(parts, fingerprint, group=group)
    if any(not torch.equal(p, fingerprint) for p in parts):
        table = "; ".join(f"rank {i}: B={p[0]} S={p[1]} docs={p[2]} pos={bool(p[4])} labels={bool(p[5])}"
                          for i, p in enumerate(parts))
        raise ValueError("setup_cp_params: the cp ranks were given different batches (every rank of a cp group "
                         f"must pass the same full batch): {table}")


def setup_cp_params(input_ids: torch.Tensor, dims: ParallelDims | None = None, *,
                    position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                    seq_lens: Sequence | None = None, cu_seqlens: torch.Tensor | Sequence[int] | None = None,
                    style: str | None = None, layout: str | None = None,
                    group: dist.ProcessGroup | None = None, pad_token_id: int = 0,
                    check_ranks: bool = True) -> CPBatch:
    """Shard a full batch for context parallelism. Returns this rank's CPBatch.

    dims: a built ParallelDims (groups and style from it). Without dims, `group` (a process group
    or None for cp=1) is the CP group and `style` picks ulysses (default) or ring.
    layout: override the ring-level layout (e.g. "contiguous" for non-causal ring); default per style.
    check_ranks: all-gather a small fingerprint so ranks with different batches fail here.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if length < 1:
        raise ValueError("input_ids has an empty sequence")
    for name, t in (("position_ids", position_ids), ("labels", labels)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(input_ids.shape)}")
    lens = _normalise_seq_lens(seq_lens, cu_seqlens, position_ids, batch, length)

    if dims is not None:
        if dims.mesh is None:
            raise ValueError("setup_cp_params: call dims.build() first")
        style, ring, ulysses = dims.cp_style, dims.ring, dims.ulysses
        cp_group, ring_group, ulysses_group = dims.cp_group, dims.ring_group, dims.ulysses_group
    else:
        style = style or "ulysses"
        if get_style(style).two_level:
            one_level = [name for name, s in CP_STYLES.items() if not s.two_level]
            raise CPConfigError(f"cp_style={style!r} without dims: pass a built ParallelDims for its two levels; "
                                f"an explicit group takes a one-level style ({', '.join(one_level)})", "cp_style")
        ring, ulysses = get_style(style).degrees(group_size(group))
        cp_group = group
        ring_group, ulysses_group = (None, group) if get_style(style).levels == ("ulysses",) else (group, None)
    spec = get_style(style)
    layout = layout or spec.default_layout
    cp_size = ring * ulysses
    cp_rank = dist.get_rank(cp_group) if cp_size > 1 else 0

    if check_ranks and cp_size > 1:
        _check_same_on_all_ranks(cp_group, input_ids, lens, position_ids, labels)

    levels = spec.shard_levels(layout, ring, ulysses)
    multiple = pad_multiple(levels)
    padded = -(-length // multiple) * multiple
    pad = padded - length
    device = input_ids.device

    if position_ids is None:
        position_ids = positions_from_seq_lens(lens, device)  # global positions, made BEFORE sharding
    if pad:
        lens = [row + [pad] for row in lens]  # the pad is a document of its own
        input_ids = torch.cat([input_ids, input_ids.new_full((batch, pad), pad_token_id)], dim=1)
        position_ids = torch.cat([position_ids, torch.arange(pad, device=device).expand(batch, pad)], dim=1)
        if labels is not None:
            labels = torch.cat([labels, labels.new_full((batch, pad), IGNORE_INDEX)], dim=1)

    flat = [n for row in lens for n in row]
    cu = torch.zeros(len(flat) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(torch.tensor(flat, device=device), 0)
    doc_ids = doc_ids_from_seq_lens(lens, device=device)  # [B, S_pad]
    index = shard_indices(padded, levels).to(device)
    params = CPParams(style=style, layout=layout, cp_size=cp_size, cp_rank=cp_rank, ring_size=ring,
                      ulysses_size=ulysses, cp_group=cp_group, ring_group=ring_group, ulysses_group=ulysses_group,
                      seq_len=length, padded_len=padded, seq_lens=tuple(map(tuple, lens)), cu_seqlens=cu,
                      max_seqlen=max(flat), doc_ids=doc_ids, shard_index=index)
    local = params.local_index
    return CPBatch(input_ids=input_ids[:, local], position_ids=position_ids[:, local],
                   labels=None if labels is None else labels[:, local], params=params)


def shard(t: torch.Tensor, params: CPParams, dim: int = 1, pad_value: float = 0) -> torch.Tensor:
    """A full tensor (length S or S_pad along `dim`) -> this rank's shard (padded with pad_value)."""
    dim = dim % t.dim()
    if t.shape[dim] == params.seq_len and params.pad:
        pad_shape = list(t.shape)
        pad_shape[dim] = params.pad
        t = torch.cat([t, t.new_full(pad_shape, pad_value)], dim=dim)
    elif t.shape[dim] != params.padded_len:
        raise ValueError(f"shard: dim {dim} has length {t.shape[dim]}; expected {params.seq_len} "
                         f"(or padded {params.padded_len})")
    return t.index_select(dim, params.local_index.to(t.device))


def unshard(t: torch.Tensor, params: CPParams, dim: int = 1) -> torch.Tensor:
    """This rank's shard -> the full tensor in global order, pad stripped. Keeps autograd
    (backward keeps this rank's slice: the code after unshard must be the same on every cp rank)."""
    dim = dim % t.dim()
    if t.shape[dim] != params.local_len:
        raise ValueError(f"unshard: dim {dim} has length {t.shape[dim]}; this rank's shard is {params.local_len}")
    gathered = gather_seq(t, params.cp_group, dim=dim)  # [..., cp * S_local (cp-rank order), ...]
    order = torch.argsort(params.shard_index.reshape(-1)).to(t.device)  # gathered slot of each global position
    return gathered.index_select(dim, order).narrow(dim, 0, params.seq_len)
