"""Long-context memory techniques: exact, FSDP2-safe, and HF names unchanged (DESIGN rule 10).

    chunked_head.py        LM-head loss / log-probs / entropy in token chunks: the [S/cp, vocab] logits never exist
    tiled_mlp.py           every decoder MLP (dense or MoE) over token tiles, recomputed per tile in backward
    activation_offload.py  checkpointed layer inputs parked in host memory until the layer's recompute
"""
