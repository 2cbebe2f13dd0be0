"""Ring attention: K/V blocks travel around the ring, queries stay; blocks merged by online softmax.

    ring of R ranks, rank r holds q_r, k_r, v_r (zigzag: chunks r and 2R-1-r of the sequence)

    forward, step s = 0 .. R-1 (block j = r - s mod R):
        start  isend(k_j, v_j -> r+1), irecv(k_{j-1}, v_{j-1} <- r-1)       [batch_isend_irecv]
        for each (query run, key run) of the block that has a visible pair:  [skip the rest]
            out_b, lse_b = kernel.forward(q[run], k_j[run], v_j[run], mask)
            out, lse = merge_attention(out, lse, out_b, lse_b)               [fp32]
        wait
    sinks: merged once at the end as a key with logit s_h and a zero value.

    backward (flash style, with the FINAL lse and delta = rowsum(dout * out)):
        K/V travel the ring again; the dK/dV accumulator of block j starts on rank j+1 and travels
        WITH the block, each rank adding its queries' share; one last hop returns it to its owner
        (R-1 hops: the owner's own share never travels).

The mask of a block comes from GLOBAL positions and document ids (CPParams), so packed documents
crossing shard and zigzag boundaries, sliding windows and causality are exact; a (query run, key
run) pair with no visible key (future chunk, out of window, no shared document) costs nothing.
Pairs are cut per row and per document, and each piece's BlockMask is classified from position
ranges (diagonal -> "causal", keys all earlier -> "full"), so no mask tensor is built unless a
window cuts a piece; the plan is built once per micro-batch (CPParams.memo) for all layers.
Runs are maximal stretches of consecutive positions (2 per rank for zigzag), so half-masked zigzag
blocks are computed on their visible half only. K/V travel with Hkv heads (GQA expanded locally).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cp.block_kernels import LseAttention, merge_attention
from cp.collectives import RingExchange, group_size
from cp.kernels import resolve_block_kernel
from cp.masks import AttnMask, BlockMask, acc_dtype, default_scale
from cp.params import CPParams
from cp.styles import CPStyle, register_cp_style
from cp.validation import check_qkv

Piece = tuple[slice, slice, slice, BlockMask]  # (rows, query run, key run, which pairs are visible)


def _runs(pos: torch.Tensor) -> list[slice]:
    """Maximal stretches of consecutive global positions, as slices into `pos`."""
    breaks = ((pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1).tolist()
    bounds = [0] + breaks + [len(pos)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _doc_runs(docs: list[int]) -> dict[int, slice]:
    """Document id -> its stretch of a run (a run holds consecutive positions, so each document of
    it is one stretch)."""
    runs, start = {}, 0
    for i in range(1, len(docs) + 1):
        if i == len(docs) or docs[i] != docs[start]:
            runs[docs[start]] = slice(start, i)
            start = i
    return runs


def _sub(outer: slice, inner: slice) -> slice:
    return slice(outer.start + inner.start, outer.start + inner.stop)


def _may_see(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, window: int | None) -> bool:
    """Cheap range test on two runs of consecutive positions, before any mask is built."""
    q_lo, q_hi, k_lo, k_hi = int(q_pos[0]), int(q_pos[-1]), int(k_pos[0]), int(k_pos[-1])
    if causal and k_lo > q_hi:
        return False
    if window is not None:
        gap = q_lo - k_hi if causal else max(q_lo - k_hi, k_lo - q_hi)
        if gap >= window:
            return False
    return True


@dataclass(frozen=True, eq=False)
class RingPlan:
    """Which pieces each ring step computes, with their masks.

    A piece is one document's part of a (query run, key run) pair of a row: documents never see
    each other, so splitting by document only drops masked work, and the masks that remain are
    the kernels' fast cases (a diagonal piece is plain causal, a piece of keys all before its
    queries is unmasked) unless a window cuts through it.
    """

    group: dist.ProcessGroup | None
    steps: list[list[Piece]]  # steps[s]: pieces against the block received at step s

    @staticmethod
    def build(params: CPParams, causal: bool, window: int | None) -> RingPlan:
        size, rank = params.ring_size, params.ring_rank
        q_pos = params.ring_block_index(rank)
        doc_ids = params.doc_ids.cpu()
        steps = []
        for step in range(size):
            k_pos = params.ring_block_index((rank - step) % size)
            pieces = []
            for qs in _runs(q_pos):
                for ks in _runs(k_pos):
                    if _may_see(q_pos[qs], k_pos[ks], causal, window):
                        pieces += _document_pieces(q_pos, k_pos, qs, ks, doc_ids, causal, window)
            steps.append(pieces)
        return RingPlan(group=params.ring_group, steps=steps)

    @staticmethod
    def cached(params: CPParams, causal: bool, window: int | None) -> RingPlan:
        """The plan for these params (built once per micro-batch, shared by every layer)."""
        key = ("ring_plan", causal, window)
        if key not in params.memo:
            params.memo[key] = RingPlan.build(params, causal, window)
        return params.memo[key]


def _document_pieces(q_pos, k_pos, qs: slice, ks: slice, doc_ids: torch.Tensor, causal: bool,
                     window: int | None) -> list[Piece]:
    """The pieces of one (query run, key run) pair: per row, per document the two runs share."""
    pieces = []
    q_docs, k_docs = doc_ids[:, q_pos[qs].cpu()].tolist(), doc_ids[:, k_pos[ks].cpu()].tolist()
    for row, (q_row, k_row) in enumerate(zip(q_docs, k_docs)):
        k_runs = _doc_runs(k_row)
        for doc, q_doc_run in _doc_runs(q_row).items():
            if doc not in k_runs:
                continue
            qd, kd = _sub(qs, q_doc_run), _sub(ks, k_runs[doc])
            mask = _piece_mask(q_pos[qd], k_pos[kd], causal, window)
            if mask is not None:
                pieces.append((slice(row, row + 1), qd, kd, mask))
    return pieces


def _piece_mask(qp: torch.Tensor, kp: torch.Tensor, causal: bool, window: int | None) -> BlockMask | None:
    """The mask of one document's piece (consecutive positions on both sides), classified from the
    position ranges alone; a dense mask only when a window cuts through the piece. None: nothing visible."""
    shape = (1, len(qp), len(kp))
    q_lo, q_hi, k_lo, k_hi = int(qp[0]), int(qp[-1]), int(kp[0]), int(kp[-1])
    nearest, farthest = q_lo - k_hi, q_hi - k_lo  # smallest and largest query - key distance
    if causal and (q_lo, q_hi) == (k_lo, k_hi):  # the document's diagonal
        if window is None or window >= len(qp):
            return BlockMask("causal", shape)
    elif causal and nearest > 0:  # keys all before the queries
        if window is None or farthest < window:
            return BlockMask("full", shape)
        if nearest >= window:
            return None
    elif causal and farthest < 0:  # keys all after the queries
        return None
    elif not causal and (window is None or max(abs(nearest), abs(farthest)) < window):
        return BlockMask("full", shape)
    same = torch.zeros(1, len(qp), dtype=torch.long, device=qp.device)
    allowed = AttnMask(qp, kp, same, same[:, :1].expand(1, len(kp)), causal, window).dense()  # [1, q, k]
    return BlockMask("dense", shape, allowed) if allowed.any() else None


def _exchange(plan: RingPlan) -> RingExchange | None:
    return RingExchange(plan.group) if group_size(plan.group) > 1 else None


def ring_forward(q, k, v, plan: RingPlan, scale: float, kernel):
    """Returns out [B, L, H, D] and lse [B, H, L] (fp32, fp64 for fp64) over all blocks of the ring."""
    B, L, H, D = q.shape
    out = torch.zeros(B, L, H, v.shape[-1], dtype=acc_dtype(q), device=q.device)
    lse = torch.full((B, H, L), float("-inf"), dtype=acc_dtype(q), device=q.device)
    exchange, (k_cur, v_cur) = _exchange(plan), (k, v)
    for step, pieces in enumerate(plan.steps):
        last = step == len(plan.steps) - 1
        if not last:
            exchange.start([k_cur, v_cur])  # the next block travels while this one is computed
        for rows, qs, ks, allowed in pieces:
            block_out, block_lse = kernel.forward(q[rows, qs], k_cur[rows, ks], v_cur[rows, ks], allowed, scale)
            out[rows, qs], lse[rows, :, qs] = merge_attention(out[rows, qs], lse[rows, :, qs], block_out, block_lse)
        if not last:
            k_cur, v_cur = exchange.wait()
    return out, lse


def ring_backward(q, k, v, out, dout, lse, delta, plan: RingPlan, scale: float, kernel):
    """dq for this rank's queries; dk, dv for this rank's own K/V block (accumulated in acc_dtype).

    Step 0 works on this rank's own block: that share stays here. From step 1 on, the dK/dV
    accumulator of the block in hand travels with it (rank j+1 starts it, j+2 ... add to it) and
    the hop after the last step brings it home: R-1 hops per block, the minimum.
    """
    zeros = lambda t: torch.zeros(t.shape, dtype=acc_dtype(q), device=q.device)
    dq, own_dk, own_dv = zeros(q), zeros(k), zeros(v)
    kv_exchange, grad_exchange = _exchange(plan), _exchange(plan)
    k_cur, v_cur, acc_dk, acc_dv = k, v, own_dk, own_dv
    for step, pieces in enumerate(plan.steps):
        last = step == len(plan.steps) - 1
        if not last:
            kv_exchange.start([k_cur, v_cur])
        for rows, qs, ks, allowed in pieces:
            dq_b, dk_b, dv_b = kernel.backward(q[rows, qs], k_cur[rows, ks], v_cur[rows, ks], out[rows, qs],
                                               dout[rows, qs], lse[rows, :, qs], delta[rows, :, qs], allowed, scale)
            dq[rows, qs] += dq_b
            acc_dk[rows, ks] += dk_b
            acc_dv[rows, ks] += dv_b
        if step > 0:  # pass the accumulator on with its block; after the last step it reaches the owner
            grad_exchange.start([acc_dk, acc_dv])
        if not last:
            k_cur, v_cur = kv_exchange.wait()
        if step > 0:
            acc_dk, acc_dv = grad_exchange.wait()  # the next block's accumulator (after the last step: ours)
        elif not last:
            acc_dk, acc_dv = zeros(k), zeros(v)  # step 1's block: this rank starts its accumulator
    if grad_exchange is not None:  # acc now holds every other rank's share of this rank's block
        own_dk += acc_dk
        own_dv += acc_dv
    return dq, own_dk, own_dv


def ring_core(q, k, v, params: CPParams, *, causal: bool, scale: float | None, window: int | None,
              sinks: torch.Tensor | None, kernel=None) -> torch.Tensor:
    """The ring over params.ring_group on blocks laid out as params.ring_block_index describes."""
    plan = RingPlan.cached(params, causal, window)
    kernel, scale = resolve_block_kernel(kernel, q.device, q.dtype), default_scale(q, scale)
    return LseAttention.apply(q, k, v, sinks, lambda *qkv: ring_forward(*qkv, plan, scale, kernel),
                              lambda *args: ring_backward(*args, plan, scale, kernel))


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: CPParams, *, causal: bool = True,
                   scale: float | None = None, window: int | None = None, sinks: torch.Tensor | None = None,
                   kernel=None) -> torch.Tensor:
    """Exact attention of this rank's shards q [B, L, H, D], k/v [B, L, Hkv, D] over the ring.

    params come from setup_cp_params with style "ring" (zigzag layout by default; "contiguous"
    also works). kernel: a block kernel name in cp.block_kernels.BLOCK_KERNELS or an object with the
    same forward/backward (test override). Returns [B, L, H, D].
    """
    check_qkv(q, k, v, params, window, sinks)
    if params.ulysses_size > 1:
        raise ValueError(f"these CPParams have a Ulysses level of {params.ulysses_size}: use cp.hybrid_attention")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
    return ring_core(q, k, v, params, causal=causal, scale=scale, window=window, sinks=sinks, kernel=kernel)


STYLE = register_cp_style(CPStyle(
    name="ring", levels=("ring",), default_layout="zigzag", attention=ring_attention, kernel_kind="block",
    recurrent_mixers=False, description="K/V ring with online-softmax merge; any head count"))
