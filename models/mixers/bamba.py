"""Bamba's Mamba2 layers (transformers' BambaForCausalLM, model_type "bamba") under Ulysses CP.

The worked example of adding a mixer family: this file (the family's MixerSpec) plus one line in
models/mixers/registry.py. Bamba is a hybrid stack of attention and Mamba2 layers, like NemotronH,
and its mixer `BambaMixer` has the Mamba2 layout exactly (checked at wrap time by
models.mixers.mamba2.check_mamba2_layout):

    hidden [B, S, d] ── in_proj ──> [z: I | x: I | B: G*N | C: G*N | dt: H]
        [x | B | C] ── depthwise causal conv1d + silu ── SSD scan (A = -exp(A_log), D, dt_bias,
        dt clamped to time_step_limit) ──> y ── gated RMSNorm(y, z) (groups of I / n_groups channels
        of one token) ── out_proj ──> [B, S, d]

so models.mixers.mamba2.UlyssesMamba2Mixer runs it unchanged: the scan and conv see whole sequences of a
head subset, the gated norm runs per token on the sequence shard; the decoder layer passes the
model's kwargs (cp_params) down to the mixer. Ring and hybrid CP are refused, as for every
recurrent mixer.

(The plain Mamba2 LM, Mamba2ForCausalLM, has the same mixer, but its forward does not pass kwargs on
to its backbone: cp_params would never reach the mixers, so it stays refused.)
"""

from __future__ import annotations

from models.mixers.mamba2 import UlyssesMamba2Mixer, wrap_mamba2_mixer
from models.mixers.spec import MixerSpec

SPEC = MixerSpec(
    name="bamba",
    description="Mamba2 (SSM)",
    class_names={"BambaMixer": "Bamba Mamba2 (SSM)"},
    wrapper=UlyssesMamba2Mixer,
    wrap=lambda module, dims, mixer_cp="ulysses": wrap_mamba2_mixer(module, dims=dims, classes=("BambaMixer",),
                                                                   mixer_cp=mixer_cp),
    kernels=("causal_conv1d", "ssd_scan"),
    mixer_cp=("ulysses", "state"),
)
