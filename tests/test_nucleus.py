"""models/nucleus.py: the top-p support is the one transformers' TopPLogitsWarper (and vLLM's apply_top_k_top_p,
the same algorithm) samples from, the sampled token always kept."""

import torch
from transformers.generation.logits_process import TopPLogitsWarper

from models.nucleus import entropy_of, top_p_truncated


def test_the_kept_set_is_the_samplers_and_keeps_the_sampled_token():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(64, 300, generator=g) * 3  # [N, V] scaled logits
    targets = torch.randint(0, 300, (64,), generator=g)
    for top_p in (0.3, 0.8, 0.95):
        hf = TopPLogitsWarper(top_p)(None, y.clone())  # -inf outside HF's nucleus
        ours = top_p_truncated(y, targets, top_p)
        inside = ~hf.isinf()
        inside[torch.arange(64), targets] = True  # ours adds the sampled token
        assert torch.equal(~ours.isinf(), inside), top_p
        assert torch.equal(ours[inside], y[inside])
        logp = torch.log_softmax(ours, -1)
        assert logp.gather(-1, targets[:, None]).isfinite().all() and entropy_of(logp, True).isfinite().all()
    assert top_p_truncated(y, targets, 1.0) is y
