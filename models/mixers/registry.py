"""The registry of mixer families: one line per family (its file defines a models.mixers.spec.MixerSpec).

    MIXER_FAMILIES ──> models.apply_cp            wraps every module a spec matches
                   ──> cp.validation (register)   the mixer classes cp accepts, under which styles

Adding a family: write models/<family>.py with its wrapper and SPEC, add it below (README "Extending:
a mixer family"; models/mixers/bamba.py is the worked example).
"""

from __future__ import annotations

from models.mixers import bamba, gated_deltanet, mamba2
from models.mixers.spec import MixerSpec

MIXER_FAMILIES: tuple[MixerSpec, ...] = (
    gated_deltanet.SPEC,  # Qwen3.5 / Qwen3.5-MoE / Qwen3-Next linear attention
    mamba2.SPEC,  # NemotronH's Mamba2 layers
    bamba.SPEC,  # Bamba's Mamba2 layers (the worked example: README "Extending: a mixer family")
)

for _spec in MIXER_FAMILIES:
    _spec.register()


def spec_of(module) -> MixerSpec | None:
    """The family whose HF class `module` is (None: not a registered mixer)."""
    return next((spec for spec in MIXER_FAMILIES if spec.matches(module)), None)
