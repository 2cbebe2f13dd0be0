"""The fewest bytes each CP style must send per rank, from first principles (not from cp/'s code).

One attention call over a sequence of S tokens, P = cp ranks, H query / Hkv KV heads of size D,
e = bytes per activation element, a = bytes per gradient-accumulator element (fp32):

  ulysses   forward: every rank sends each other rank that rank's query heads (and the KV heads
            those query heads use) for its S/P tokens, and gets the output of its own S/P tokens
            back for the other ranks' heads. Backward moves the same tensors the other way
            (dout like q, dq/dk/dv like q/k/v). Nothing of it can be skipped: each rank needs
            every token of its heads.
  ring      forward: each rank's K/V block (S/P tokens, Hkv heads) must reach the P-1 other
            ranks: P-1 hops. Backward: K/V again (P-1 hops; the textbook ring keeps no remote
            block between forward and backward), and each other rank's partial dK/dV of the block
            must reach its owner: P-1 hops of the accumulator (fp32).
  hybrid    ulysses inside each group of U ranks on the ring block (S/R tokens), then the ring
            over R = P/U ranks on blocks of the KV heads this rank's query heads use.

Heads are split as contiguous chunks (tensor_split) and KV heads go to every rank whose query
heads use them; that replication is part of the minimum (the rank needs those keys).
"""

from __future__ import annotations


def head_split(num_heads: int, num_kv: int, size: int) -> tuple[list[int], list[int]]:
    """(query heads, KV heads needed) per rank for a contiguous split of the query heads."""
    base, extra = divmod(num_heads, size)
    counts = [base + (j < extra) for j in range(size)]
    groups = num_heads // num_kv
    q_sizes, kv_sizes, start = [], [], 0
    for c in counts:
        heads = range(start, start + c)
        q_sizes.append(c)
        kv_sizes.append(len({h // groups for h in heads}))
        start += c
    return q_sizes, kv_sizes


def ulysses_bytes(tokens: int, size: int, rank: int, heads: int, kv_heads: int, dim: int, elem: int) -> int:
    """Forward + backward bytes rank `rank` sends for one Ulysses attention over `tokens` tokens."""
    if size == 1:
        return 0
    local = tokens // size
    q, kv = head_split(heads, kv_heads, size)
    to_others = sum(q[j] + 2 * kv[j] for j in range(size) if j != rank)  # q/k/v heads others own
    back = (size - 1) * q[rank]  # this rank's heads of the output, the others' tokens
    forward = local * dim * (to_others + back)
    # backward: dout travels like the output's inverse (to the head owners), dq/dk/dv like q/k/v's inverse
    backward = local * dim * (sum(q[j] for j in range(size) if j != rank) + (size - 1) * (q[rank] + 2 * kv[rank]))
    return (forward + backward) * elem


def ring_bytes(tokens: int, size: int, kv_heads: int, dim: int, elem: int, acc_elem: int) -> int:
    """Forward + backward bytes each rank sends for one ring attention over `tokens` tokens."""
    if size == 1:
        return 0
    block = tokens // size * 2 * kv_heads * dim  # K and V of one block
    return (size - 1) * (2 * block * elem + block * acc_elem)


def min_bytes(style: str, *, tokens: int, cp: int, ulysses: int, rank: int, heads: int, kv_heads: int, dim: int,
              elem: int, acc_elem: int = 4) -> int:
    """Minimum bytes cp rank `rank` sends for one attention call (forward + backward)."""
    if style == "ulysses":
        return ulysses_bytes(tokens, cp, rank, heads, kv_heads, dim, elem)
    if style == "ring":
        return ring_bytes(tokens, cp, kv_heads, dim, elem, acc_elem)
    if style == "hybrid":
        ring = cp // ulysses
        u_rank = rank % ulysses
        a2a = ulysses_bytes(tokens // ring, ulysses, u_rank, heads, kv_heads, dim, elem)
        _, kv = head_split(heads, kv_heads, ulysses)
        return a2a + ring_bytes(tokens, ring, kv[u_rank], dim, elem, acc_elem)
    raise ValueError(f"no byte model for style {style!r}")
