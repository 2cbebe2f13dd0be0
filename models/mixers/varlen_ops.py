"""Varlen (packed-document) building blocks shared by the linear-attention and Mamba mixers.

A packed row holds several documents back to back; `doc_ids` [B, S] names the document of each
position (documents are contiguous runs; ids only need to differ between neighbours). Anything
that looks back in time must stop at a document start: no history leaks from the previous
document, exactly as if every document had been run alone.

    causal depthwise conv1d, kernel K (tap k looks k positions back):

    x [B, S, C] ──shift by k──> x[t-k]            (zeros before position 0)
                                  × [doc[t-k] == doc[t]]   (zero history at a document start)
                                  × weight[:, K-1-k]        (nn.Conv1d's tap order)
                ──sum over k = 0..K-1──> + bias ──> activation ──> out [B, S, C]

Math in float32 whatever the input dtype (the result is cast back to it); plain torch ops, so
autograd gives the backward. K is small (4 in Mamba2 / GatedDeltaNet): K shifted products are
cheaper than a per-document loop and never cross a document.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cp.documents import doc_ids_from_seq_lens  # noqa: F401  (re-exported: tests and callers import it here)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "swish": F.silu}


def _resolve_activation(activation: str | Callable | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if activation is None or callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown conv activation {activation!r}; pass a callable or one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def _shift_back(t: torch.Tensor, k: int, fill) -> torch.Tensor:
    """t[:, i] -> t[:, i - k] along dim 1, the first k positions set to `fill`."""
    if k == 0:
        return t
    head = t.new_full((t.shape[0], k, *t.shape[2:]), fill)
    return torch.cat([head, t[:, :-k]], dim=1)


def varlen_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, doc_ids: torch.Tensor, *,
                         activation: str | Callable | None = None) -> torch.Tensor:
    """Causal depthwise conv1d over x [B, S, C] that never looks across a document boundary.

    weight: [C, K] or nn.Conv1d's depthwise [C, 1, K] (tap K-1 multiplies the current position);
    bias: [C] or None; doc_ids: [B, S]. Returns activation(conv(x)) [B, S, C] in x's dtype.
    """
    if weight.dim() == 3:
        weight = weight.squeeze(1)  # [C, 1, K] -> [C, K]
    batch, length, channels = x.shape
    if weight.shape[0] != channels:
        raise ValueError(f"conv weight has {weight.shape[0]} channels, x has {channels}")
    if doc_ids.shape != (batch, length):
        raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, expected [B, S] = [{batch}, {length}]")
    kernel = weight.shape[1]
    xf, wf = x.float(), weight.float()
    out = xf * wf[:, kernel - 1]  # tap 0: the current position is always in its own document
    for k in range(1, min(kernel, length)):
        same_doc = doc_ids == _shift_back(doc_ids, k, -1)  # [B, S]: position t-k exists and is in t's document
        out = out + _shift_back(xf, k, 0.0) * same_doc.unsqueeze(-1) * wf[:, kernel - 1 - k]
    if bias is not None:
        out = out + bias.float()
    act = _resolve_activation(activation)
    if act is not None:
        out = act(out)
    return out.to(x.dtype)
