"""What every attention kernel agrees on: which keys a query sees, the scale, GQA, the accumulation dtype.

    AttnMask   a kernel call's mask, from GLOBAL positions and document ids (never a [S, S] tensor
               unless a kernel asks for one):
                   query i may see key j  <=>  doc[i] == doc[j]
                                               and (not causal or pos[j] <= pos[i])
                                               and (window is None or |pos[i] - pos[j]| < window)
    BlockMask  one (query block, key block) piece of the ring: "causal" (one document's diagonal),
               "full" (all visible) or "dense" (a window cuts it: the only kind with a [B, Sq, Sk] tensor)

`window` has HF's `sliding_window` meaning: a causal query sees at most `window` keys, itself
included. Tensors are BSHD: q [B, Sq, H, D], k/v [B, Sk, Hkv, D], query head h using KV head
h // (H / Hkv). The bottom of the kernel stack: cp.block_kernels, cp.cuda_kernels and cp.kernels
import it; it imports nothing of cp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class AttnMask:
    """Which keys each query may see, from global positions and document ids."""

    q_pos: torch.Tensor  # [Sq] global sequence positions of the queries
    k_pos: torch.Tensor  # [Sk] global sequence positions of the keys
    q_doc: torch.Tensor  # [B, Sq] document id of each query
    k_doc: torch.Tensor  # [B, Sk] document id of each key
    causal: bool = True
    window: int | None = None

    def dense(self) -> torch.Tensor:
        """Boolean mask [B, Sq, Sk], True where the query may attend to the key."""
        allowed = self.q_doc[:, :, None] == self.k_doc[:, None, :]  # [B, Sq, Sk]
        diff = self.q_pos[:, None] - self.k_pos[None, :]  # [Sq, Sk]
        if self.causal:
            allowed = allowed & (diff >= 0)
        if self.window is not None:
            allowed = allowed & ((diff if self.causal else diff.abs()) < self.window)
        return allowed

    def is_plain_causal(self) -> bool:
        """True when the mask is exactly 'causal over one document, no window' on aligned q/k."""
        if not self.causal or self.q_pos.shape != self.k_pos.shape or not torch.equal(self.q_pos, self.k_pos):
            return False
        if not bool((self.q_pos[1:] > self.q_pos[:-1]).all()):
            return False
        return self._one_document_unwindowed()

    def is_unmasked(self) -> bool:
        """True when every query sees every key: non-causal, one document, no effective window."""
        return not self.causal and self._one_document_unwindowed()

    def _one_document_unwindowed(self) -> bool:
        """One document per row on both sides, and no query-key pair as far apart as the window."""
        one_doc = bool((self.q_doc == self.q_doc[:, :1]).all()) and bool((self.k_doc == self.q_doc[:, :1]).all())
        if not one_doc or self.window is None:
            return one_doc
        farthest = max(int(self.q_pos.max() - self.k_pos.min()), int(self.k_pos.max() - self.q_pos.min()))
        return farthest < self.window


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Which keys of one (query block, key block) each query sees, without building what is not needed:

        "causal"  square block of one document's diagonal: key j visible to query i iff j <= i
        "full"    every key visible to every query
        "dense"   anything else: the explicit bool tensor [B, Sq, Sk]

    Fused kernels run the first two as is_causal / no mask; only "dense" has a mask tensor. Block
    kernels accept a BlockMask or a bool tensor (classified by `BlockMask.of`).
    """

    kind: str
    shape: tuple[int, int, int]  # B, Sq, Sk
    tensor: torch.Tensor | None = None

    @staticmethod
    def of(allowed: BlockMask | torch.Tensor) -> BlockMask:
        if isinstance(allowed, BlockMask):
            return allowed
        B, sq, sk = allowed.shape
        if sq == sk and torch.equal(allowed, torch.ones(sq, sk, dtype=torch.bool, device=allowed.device).tril()
                                    .expand_as(allowed)):
            return BlockMask("causal", (B, sq, sk))
        if bool(allowed.all()):
            return BlockMask("full", (B, sq, sk))
        return BlockMask("dense", (B, sq, sk), allowed)

    @staticmethod
    def from_attn_mask(mask: AttnMask) -> BlockMask:
        shape = (mask.q_doc.shape[0], len(mask.q_pos), len(mask.k_pos))
        if mask.is_plain_causal():
            return BlockMask("causal", shape)
        if mask.is_unmasked():
            return BlockMask("full", shape)
        return BlockMask("dense", shape, mask.dense())

    def dense(self, device=None) -> torch.Tensor:
        """The bool mask [B, Sq, Sk] (built for causal / full blocks)."""
        if self.tensor is not None:
            return self.tensor if device is None else self.tensor.to(device)
        B, sq, sk = self.shape
        ones = torch.ones(sq, sk, dtype=torch.bool, device=device)
        return (ones.tril() if self.kind == "causal" else ones).expand(B, sq, sk)

    def rows_without_keys(self) -> torch.Tensor | None:
        """[B, Sq] True where a query sees no key of the block; None when every query sees one."""
        return None if self.tensor is None else ~self.tensor.any(-1)

    def visible_pairs(self) -> int:
        B, sq, sk = self.shape
        if self.kind == "causal":
            return B * sq * (sq + 1) // 2
        return B * sq * sk if self.kind == "full" else int(self.tensor.sum())


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def check_gqa(q: torch.Tensor, k: torch.Tensor) -> int:
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
    return q.shape[2] // k.shape[2]


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (tests prove exactness to rounding)."""
    return torch.promote_types(t.dtype, torch.float32)
