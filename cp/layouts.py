"""Sharding layouts: which GLOBAL sequence positions each CP rank holds.

The one registry used by data loading (`setup_cp_params`), `shard`/`unshard`, the attention
paths and the tests. A layout splits a padded sequence of length S_pad among `size` ranks:

    contiguous, size=2, S_pad=8      rank 0: 0 1 2 3          rank 1: 4 5 6 7
    zigzag,     size=2, S_pad=8      chunks of S_pad/(2*size): c0=[0 1] c1=[2 3] c2=[4 5] c3=[6 7]
                                     rank 0: c0 c3 = 0 1 6 7  rank 1: c1 c2 = 2 3 4 5

Zigzag balances causal attention: rank r holds chunks r and 2*size-1-r, so every rank owns one
"early" and one "late" chunk and does the same amount of causal work.

Levels compose from outer to inner (`shard_indices`): the hybrid style shards over the ring
(zigzag) first, then splits each ring shard contiguously among its Ulysses ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """A way to cut a sequence into `size` equal shards."""

    name: str
    chunks_per_rank: int

    def pad_multiple(self, size: int) -> int:
        """The padded length must be a multiple of this for equal shards."""
        return size * self.chunks_per_rank

    def chunk_ids(self, size: int, rank: int) -> tuple[int, ...]:
        """Which of the `size * chunks_per_rank` equal chunks rank `rank` holds, in order."""
        if self.name == "contiguous":
            return (rank,)
        return (rank, 2 * size - 1 - rank)

    def indices(self, length: int, size: int, rank: int) -> torch.Tensor:
        """Positions (into a sequence of `length`) held by `rank`, as a LongTensor [length/size]."""
        multiple = self.pad_multiple(size)
        if length % multiple:
            raise ValueError(f"layout {self.name!r}: length {length} is not a multiple of {multiple}")
        chunk = length // multiple
        return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in self.chunk_ids(size, rank)])


LAYOUTS: dict[str, Layout] = {
    "contiguous": Layout("contiguous", chunks_per_rank=1),
    "zigzag": Layout("zigzag", chunks_per_rank=2),
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown CP layout {name!r}; known: {sorted(LAYOUTS)}") from None


ShardLevel = tuple[str, int]  # (layout name, group size), outermost first


def pad_multiple(levels: list[ShardLevel]) -> int:
    """Smallest multiple of which the padded length must be so every level splits evenly."""
    multiple = 1
    for name, size in levels:
        multiple *= get_layout(name).pad_multiple(size)
    return multiple


def shard_indices(length: int, levels: list[ShardLevel]) -> torch.Tensor:
    """Global positions held by every rank: LongTensor [n_ranks, length / n_ranks].

    Ranks are numbered with the innermost level fastest: rank = ((r0 * s1) + r1) * s2 + r2 ...,
    matching a DeviceMesh whose last dimension is the innermost level.
    """
    shards = [torch.arange(length)]
    for name, size in levels:
        layout = get_layout(name)
        shards = [s[layout.indices(len(s), size, r)] for s in shards for r in range(size)]
    return torch.stack(shards)
