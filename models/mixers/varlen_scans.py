"""Exact varlen scans of the packed-document mixers: plain torch, float32, autograd gives the backward.

The recurrent kernels twin to the fused GPU ones (models.mixers.fused_kernels picks between them), next to
the varlen causal conv (models.mixers.varlen_ops). Both restart their state at every document start of
`doc_ids` [B, S] (cp.documents), exactly as if every document ran alone:

    varlen_gated_delta_rule(q, k, v, g, beta, doc_ids)     Gated DeltaNet (Qwen3.5 / Qwen3-Next)
        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t
        chunked WY / UT form; each document cut into its own chunks (ChunkPlan): no chunk straddles
        two documents, every document starts from a zero state
    ssd_scan_varlen(x, dt, A, B, C, doc_ids, D=, dt_bias=)  Mamba2 SSD (NemotronH, Mamba2 LM)
        state_t = exp(dt_t A) state_{t-1} [t not a document start] + dt_t B_t x_t^T,  y_t = C_t . state_t + D x_t
        chunked SSD form; chunk-end states carried only while the document continues

Imports only downward (torch); the mixer wrappers and models.mixers.fused_kernels import from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

L2NORM_EPS = 1e-6  # the eps of HF's / fla's l2norm for q and k


# ---------------------------------------------------------------------------------------------
# Gated delta rule
# ---------------------------------------------------------------------------------------------


def l2_normalize(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (HF's and fla's l2norm)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


@dataclass(frozen=True)
class ChunkPlan:
    """Where every token goes when each document is cut into its own chunks of `chunk_size`.

    gather_index [N, C]: flat token (of B * S) in each chunk slot, B * S for a pad slot.
    slot_of_token [B * S]: the flat slot (of N * C) that holds each token.
    starts_document [N]: the chunk opens a document (its scan starts from a zero state).
    continues_document [N]: the next chunk belongs to the same document (its end state is needed).
    """

    gather_index: torch.Tensor
    slot_of_token: torch.Tensor
    starts_document: list[bool]
    continues_document: list[bool]

    @property
    def num_chunks(self) -> int:
        return self.gather_index.shape[0]


def document_chunk_plan(doc_ids: torch.Tensor, chunk_size: int) -> ChunkPlan:
    """Cut every contiguous document run of doc_ids [B, S] (rows flattened) into chunks of
    min(chunk_size, longest document) tokens; a document's last chunk is zero padded."""
    flat = doc_ids.reshape(-1)  # [B, S] -> [B * S]
    total, row_len = flat.numel(), doc_ids.shape[1]
    new_run = torch.ones_like(flat, dtype=torch.bool)
    new_run[1:] = flat[1:] != flat[:-1]
    new_run[::row_len] = True  # a row start always opens a document
    starts = new_run.nonzero().flatten()
    lengths = torch.diff(starts, append=starts.new_tensor([total]))
    chunk_size = min(chunk_size, int(lengths.max()))  # short documents only: smaller chunks, less padding
    chunks_per_doc = (lengths + chunk_size - 1) // chunk_size
    first_chunk = torch.cumsum(chunks_per_doc, 0) - chunks_per_doc

    doc_of_chunk = torch.repeat_interleave(torch.arange(starts.numel(), device=flat.device), chunks_per_doc)
    chunk_in_doc = torch.arange(doc_of_chunk.numel(), device=flat.device) - first_chunk[doc_of_chunk]
    offset = chunk_in_doc[:, None] * chunk_size + torch.arange(chunk_size, device=flat.device)  # [N, C]
    in_doc = offset < lengths[doc_of_chunk, None]
    gather_index = torch.where(in_doc, starts[doc_of_chunk, None] + offset, total)

    doc_of_token = torch.cumsum(new_run.long(), 0) - 1
    offset_of_token = torch.arange(total, device=flat.device) - starts[doc_of_token]
    slot_of_token = first_chunk[doc_of_token] * chunk_size + offset_of_token
    last_chunk = chunk_in_doc + 1 == chunks_per_doc[doc_of_chunk]
    return ChunkPlan(gather_index=gather_index, slot_of_token=slot_of_token,
                     starts_document=(chunk_in_doc == 0).tolist(), continues_document=(~last_chunk).tolist())


def _to_chunks(x: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    """[T, H, ...] tokens -> [N, H, C, ...] document chunks (pad slots are zeros)."""
    padded = torch.cat([x, x.new_zeros(1, *x.shape[1:])])  # [T, H, ...] -> [T + 1, H, ...]
    chunks = padded.index_select(0, plan.gather_index.reshape(-1))  # -> [N * C, H, ...]
    chunks = chunks.view(plan.num_chunks, -1, *x.shape[1:])  # [N * C, H, ...] -> [N, C, H, ...]
    return chunks.transpose(1, 2)  # [N, C, H, ...] -> [N, H, C, ...]


def _from_chunks(chunks: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    """[N, H, C, D] document chunks -> [T, H, D] tokens (pad slots dropped)."""
    num_heads, head_dim = chunks.shape[1], chunks.shape[3]
    slots = chunks.transpose(1, 2).reshape(-1, num_heads, head_dim)  # [N, H, C, D] -> [N * C, H, D]
    return slots.index_select(0, plan.slot_of_token)  # [N * C, H, D] -> [T, H, D]


@dataclass(frozen=True)
class ChunkTerms:
    """What each chunk needs that does not depend on the state entering it (leading dims [N, H])."""

    writes_from_values: torch.Tensor  # [N, H, C, Dv]: the delta-rule writes if the entering state were zero
    writes_per_state: torch.Tensor  # [N, H, C, Dk]: how the entering state changes them (minus this @ S_0)
    intra_attention: torch.Tensor  # [N, H, C, C]: exp(G_t - G_j) (q_t . k_j), j <= t
    q_from_start: torch.Tensor  # [N, H, C, Dk]: exp(G_t) q_t, reads the entering state
    k_to_end: torch.Tensor  # [N, H, C, Dk]: exp(G_C - G_j) k_j, writes into the leaving state
    chunk_decay: torch.Tensor  # [N, H]: exp(G_C), the entering state's decay across the chunk


def _solve_unit_lower(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(I + system)^-1 rhs for a strictly lower triangular system [..., C, C]."""
    return torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)


def _intra_chunk_terms(q, k, v, g, beta) -> ChunkTerms:
    """q, k [N, H, C, Dk]; v [N, H, C, Dv]; g, beta [N, H, C]. With G_t = cumsum(g)_t inside the chunk,
    S_0 the state entering it and u_t = beta_t (v_t - k_t^T S'_t) the write of token t (S'_t: the
    decayed state just before it):
        (I + A) u = beta v - (beta exp(G) k) S_0,    A[t, j] = beta_t (k_t . k_j) exp(G_t - G_j), j < t
        o_t = exp(G_t) q_t^T S_0 + sum_{j <= t} exp(G_t - G_j) (q_t . k_j) u_j
        S_C = exp(G_C) S_0 + sum_j exp(G_C - G_j) k_j u_j^T
    """
    size = g.shape[-1]
    cum = g.cumsum(-1)  # [N, H, C]
    causal = torch.ones(size, size, dtype=torch.bool, device=g.device).tril()
    pair_decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [N, H, C, C]
    write_system = (beta[..., None] * (k @ k.transpose(-1, -2)) * pair_decay).tril(-1)  # A [N, H, C, C]
    return ChunkTerms(
        writes_from_values=_solve_unit_lower(write_system, beta[..., None] * v),
        writes_per_state=_solve_unit_lower(write_system, (beta * cum.exp())[..., None] * k),
        intra_attention=(q @ k.transpose(-1, -2)) * pair_decay,
        q_from_start=q * cum.exp()[..., None],
        k_to_end=k * (cum[..., -1:] - cum).exp()[..., None],
        chunk_decay=cum[..., -1].exp(),
    )


def _scan_chunks(terms: ChunkTerms, plan: ChunkPlan, chunks=None, entering: dict | None = None,
                 end_states: set | frozenset = frozenset()) -> tuple[dict, dict]:
    """Carry the state [H, Dk, Dv] chunk to chunk over `chunks` (default all, in order); zero it at every document
    start, except that chunk n in `entering` starts from entering[n]. Returns ({n: out [H, C, Dv]},
    {n: state leaving chunk n} for n in end_states)."""
    entering = entering or {}
    outputs, ends, state = {}, {}, None
    for n in range(plan.num_chunks) if chunks is None else chunks:
        start = entering.get(n, None if plan.starts_document[n] else state)
        writes = terms.writes_from_values[n]  # [H, C, Dv]
        if start is None:  # zero entering state: its terms vanish
            out = terms.intra_attention[n] @ writes
        else:
            writes = writes - terms.writes_per_state[n] @ start
            out = terms.q_from_start[n] @ start + terms.intra_attention[n] @ writes
        outputs[n] = out
        if plan.continues_document[n] or n in end_states:
            carried = terms.k_to_end[n].transpose(-1, -2) @ writes  # [H, Dk, C] @ [H, C, Dv] -> [H, Dk, Dv]
            if start is not None:
                carried = carried + start * terms.chunk_decay[n][:, None, None]
            state = ends[n] = carried
    return outputs, ends


def _row_chunks(plan: ChunkPlan, row_len: int, rows: int) -> list[list[int]]:
    """The chunks of each row, in order (rows are flattened into the plan's token stream)."""
    row_of_chunk = (plan.gather_index[:, 0] // row_len).tolist()  # a chunk's first slot is always a token
    chunks = [[] for _ in range(rows)]
    for n, row in enumerate(row_of_chunk):
        chunks[row].append(n)
    return chunks


def _chained_scan(terms: ChunkTerms, plan: ChunkPlan, row_len: int, rows: int, entering_state) -> torch.Tensor:
    """State passing (cp.state_passing): scan from zero, summarise each row for the chain (its final state from
    zero; the transition of its last document), get the entering states, rescan each row's first document from
    its entering state. -> [N, H, C, Dv]."""
    row_chunks = _row_chunks(plan, row_len, rows)
    outputs, ends = _scan_chunks(terms, plan, end_states={chunks[-1] for chunks in row_chunks})
    heads, dk = terms.k_to_end.shape[1], terms.k_to_end.shape[-1]
    eye = torch.eye(dk, dtype=terms.k_to_end.dtype, device=terms.k_to_end.device)
    transitions = []
    for chunks in row_chunks:  # of the row's last document (the fold uses it for rows that are one document)
        transition = eye.expand(heads, dk, dk)
        last_start = max(i for i, n in enumerate(chunks) if plan.starts_document[n])
        for n in chunks[last_start:]:  # S_C = (decay I - k_to_end^T writes_per_state) S_0 + (terms without S_0)
            decay = terms.chunk_decay[n][:, None, None] * eye  # [H, Dk, Dk]
            transition = (decay - terms.k_to_end[n].transpose(-1, -2) @ terms.writes_per_state[n]) @ transition
        transitions.append(transition)
    finals = torch.stack([ends[chunks[-1]] for chunks in row_chunks])  # [B, H, Dk, Dv]
    entering = entering_state(finals, torch.stack(transitions)).to(eye.dtype)  # [B, H, Dk, Dv]
    for row, chunks in enumerate(row_chunks):
        next_start = next((i for i, n in enumerate(chunks[1:], 1) if plan.starts_document[n]), len(chunks))
        outputs.update(_scan_chunks(terms, plan, chunks[:next_start], {chunks[0]: entering[row]})[0])
    return torch.stack([outputs[n] for n in range(plan.num_chunks)])


def varlen_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                            doc_ids: torch.Tensor, *, use_qk_l2norm: bool = True, scale: float | None = None,
                            chunk_size: int = 64, entering_state=None) -> torch.Tensor:
    """Gated delta rule over packed documents, the state reset to zero at every document start.

    q, k [B, S, Hk, Dk]; v [B, S, Hv, Dv] (Hv % Hk == 0: value head j reads key head j // (Hv/Hk));
    g (log decay, <= 0), beta [B, S, Hv]; doc_ids [B, S]. Same math as HF's
    torch_chunk_gated_delta_rule / torch_recurrent_gated_delta_rule run on each document alone.
    Float32 math (float64 stays float64). Returns [B, S, Hv, Dv] in v's dtype.

    entering_state (state-passing CP): each row is a shard of a longer sequence whose first document may have
    begun on earlier ranks; entering_state(final [B, Hv, Dk, Dv], transition [B, Hv, Dk, Dk]) gets each row's
    summary (the state leaving it from zero, and how a state entering its last document reaches its end: the whole
    row's transition when the row is one document) and returns the state entering each row [B, Hv, Dk, Dv]
    (cp.state_passing.ShardChain.entering_state); that state starts the row's first document.
    """
    batch, seq_len, num_k, head_k = k.shape
    num_v = v.shape[2]
    if num_v % num_k:
        raise ValueError(f"{num_v} value heads are not a multiple of {num_k} key heads")
    if doc_ids.shape != (batch, seq_len):
        raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}; q/k/v need [{batch}, {seq_len}]")
    out_dtype = v.dtype
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    if num_v != num_k:
        q = q.repeat_interleave(num_v // num_k, dim=2)  # [B, S, Hk, Dk] -> [B, S, Hv, Dk]
        k = k.repeat_interleave(num_v // num_k, dim=2)  # [B, S, Hk, Dk] -> [B, S, Hv, Dk]
    q, k, v, g, beta = (x.to(dtype).flatten(0, 1) for x in (q, k, v, g, beta))  # [B, S, ...] -> [B * S, ...]
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * (head_k ** -0.5 if scale is None else scale)

    plan = document_chunk_plan(doc_ids, chunk_size)
    q, k, v = (_to_chunks(x, plan) for x in (q, k, v))  # [T, Hv, D] -> [N, Hv, C, D]
    g, beta = (_to_chunks(x, plan) for x in (g, beta))  # [T, Hv] -> [N, Hv, C]
    terms = _intra_chunk_terms(q, k, v, g, beta)
    if entering_state is None:
        out = torch.stack(list(_scan_chunks(terms, plan)[0].values()))  # [N, Hv, C, Dv]
    else:
        out = _chained_scan(terms, plan, seq_len, batch, entering_state)  # [N, Hv, C, Dv]
    out = _from_chunks(out, plan)  # [N, Hv, C, Dv] -> [B * S, Hv, Dv]
    return out.view(batch, seq_len, num_v, -1).to(out_dtype)  # [B * S, Hv, Dv] -> [B, S, Hv, Dv]


# ---------------------------------------------------------------------------------------------
# Mamba2 SSD scan
# ---------------------------------------------------------------------------------------------


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


def _chunked(t: torch.Tensor, chunk: int) -> torch.Tensor:
    """[b, S, ...] -> [b, S_pad / chunk, chunk, ...], padding the end of the sequence with zeros."""
    pad = (-t.shape[1]) % chunk
    if pad:
        t = torch.cat([t, t.new_zeros((t.shape[0], pad, *t.shape[2:]))], dim=1)
    return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])  # [b, S_pad, ...] -> [b, c, l, ...]


def ssd_scan_varlen(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    doc_ids: torch.Tensor, *, D: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                    dt_softplus: bool = True, dt_limit: tuple[float, float] = (0.0, math.inf),
                    chunk_size: int = 64, entering_state=None) -> torch.Tensor:
    """Mamba2 SSD scan over packed documents, the SSM state reset at every document start.

    x [b, S, h, p]; dt [b, S, h] (raw, before dt_bias/softplus); A [h] (negative: -exp(A_log));
    B, C [b, S, g, n] with h % g == 0 (head i reads group i // (h/g)); doc_ids [b, S];
    D, dt_bias [h]. Returns y [b, S, h, p] in float32:

        state_t = exp(dt_t A) * state_{t-1} * [t is not a document start] + dt_t * B_t x_t^T
        y_t     = C_t . state_t + D * x_t

    Chunked (SSD) form: within a chunk a decay-weighted, document-masked C B^T product; between
    chunks the chunk-end states are carried only while the document continues.

    entering_state (state-passing CP): each row is a shard of a longer sequence; entering_state(final
    [b, h, p, n], decay [b, h]) gets each row's state leaving it from zero (its last document's) and the decay a
    state entering the row gets across it, and returns the state entering each row [b, h, p, n], which then
    reaches the row's first document: y_t += C_t . state * exp(sum of dt A up to t).
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
    pad = (-length) % chunk  # the tail pad continues each row's last document: it adds nothing (x_dt = 0) and
    doc_c = _chunked(torch.cat([doc_ids, doc_ids[:, -1:].expand(batch, pad)], dim=1), chunk)  # decays by 1: [b, c, l]
    log_decay_c = _chunked(log_decay, chunk).permute(0, 3, 1, 2)  # [b, c, l, h] -> [b, h, c, l]
    cum_decay = torch.cumsum(log_decay_c, dim=-1)  # [b, h, c, l]

    y_diag = _intra_chunk(x_dt_c, B_c, C_c, log_decay_c, doc_c)
    doc_end = doc_c[:, :, -1]  # [b, c]: the document a chunk-end state belongs to
    chunk_states = _chunk_end_states(x_dt_c, B_c, cum_decay, doc_c, doc_end)
    carried, doc_at_slot = _carry_states(chunk_states, cum_decay[..., -1], doc_end)  # [b, c+1, h, p, n]
    y_off = _from_start_states(C_c, carried[:, :-1], cum_decay, doc_c, doc_at_slot[:, :-1])

    y = (y_diag + y_off).reshape(batch, -1, heads, head_dim)[:, :length]  # [b, c, l, h, p] -> [b, S, h, p]
    if entering_state is not None:
        entering = entering_state(carried[:, -1], log_decay.sum(1).exp())  # [b, h, p, n]
        y = y + ssd_from_entering_state(entering, C_heads, log_decay, doc_ids)
    if D is not None:
        y = y + D.float()[:, None] * x
    return y


def ssd_from_entering_state(entering: torch.Tensor, C_heads: torch.Tensor, log_decay: torch.Tensor,
                            doc_ids: torch.Tensor) -> torch.Tensor:
    """What a state entering each row adds to its first document's outputs: C_t . (exp(sum_{s <= t} dt_s A) state).
    entering [b, h, p, n]; C_heads [b, S, h, n]; log_decay (dt A) [b, S, h]; doc_ids [b, S] -> [b, S, h, p] fp32."""
    decay_from_start = torch.cumsum(log_decay.float(), dim=1).exp()  # [b, S, h]
    first_document = (doc_ids == doc_ids[:, :1]).unsqueeze(-1)  # [b, S, 1]
    read = torch.einsum("bshn,bhpn->bshp", C_heads.float(), entering.float())  # [b, S, h, p]
    return read * (decay_from_start * first_document).unsqueeze(-1)


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
    Returns (the state at every slot [b, c+1, h, p, n]: slots 0..c-1 start the chunks, slot c ends the row; the
    document of each slot [b, c+1]).
    """
    slots = torch.cat([torch.zeros_like(chunk_states[:, :1]), chunk_states], dim=1)  # [b, c+1, h, p, n]
    doc_at_slot = torch.cat([doc_end[:, :1], doc_end], dim=1)  # [b, c+1]; slot 0 holds zeros, its id is moot
    decay = torch.exp(_segment_sum(F.pad(chunk_decay, (1, 0))))  # [b, h, c+1 (i), c+1 (j)]
    same_doc = doc_at_slot.unsqueeze(-1) == doc_at_slot.unsqueeze(-2)  # [b, c+1, c+1]
    decay = decay * same_doc.unsqueeze(1)  # [b, h, i, j]
    carried = torch.einsum("bhij,bjhpn->bihpn", decay, slots)  # [b, c+1, h, p, n]
    return carried, doc_at_slot


def _from_start_states(C, start_states, cum_decay, doc, doc_at_start):
    """Contribution of each chunk's start state to positions that continue its document: [b, c, l, h, p]."""
    decay_from_start = torch.exp(cum_decay).permute(0, 2, 3, 1)  # [b, h, c, l] -> [b, c, l, h]
    continues = doc == doc_at_start.unsqueeze(-1)  # [b, c, l]
    read = torch.einsum("bclhn,bchpn->bclhp", C, start_states)  # [b, c, l, h, p]
    return read * (decay_from_start * continues.unsqueeze(-1)).unsqueeze(-1)
