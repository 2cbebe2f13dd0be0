"""A mixer family described once: the HF classes it matches, how to wrap them, what CP they allow.

    models/<family>.py ── SPEC = MixerSpec(...)            one file per family (its wrapper + its spec)
    models/mixers/registry.py ── MIXER_FAMILIES = (...)      the registry: one line per family
        └─ spec.register()  ──> cp.validation.register_sequence_mixer(class, description, cp_styles=, ...)
                                (cp learns the supported mixer names from models/, never imports it)
    models.apply_cp(model, dims)
        cp.assert_cp_style_supports_model(style, model)    refuses unregistered mixers, ring for mixers
        for spec in MIXER_FAMILIES:                          every module spec.matches -> spec.wrap(module, dims)

A wrapper keeps the HF parameter names: it adopts the mixer's children and parameters under their
own names (models.mixers.hf_conventions.adopt), so state_dict keys, checkpoints and PEFT target_modules are
those of the untouched model. A wrapper is idempotent (`wrap` of a wrapper returns it, re-checked).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from cp.validation import register_sequence_mixer
from models.mixers.fused_kernels import MIXER_OPS


@dataclass(frozen=True)
class MixerSpec:
    """One mixer family.

    name:            the family's name (models/<name>.py holds its wrapper)
    class_names:     {HF mixer class name: description}: the modules it wraps, by class name
    wrapper:         the Ulysses wrapper class (accepted as already prepared when apply_cp runs again)
    wrap:            wrap(module, dims, mixer_cp) -> wrapper; raises ValueError naming the fix for a head split
                     or CP layout it cannot run
    mixer_cp:        how its sequence is parallelised (model.mixer_cp): "ulysses" (the heads' all-to-all) and,
                     where the family's wrapper has a state-passing path, "state" (cp.state_passing; opt-in)
    cp_styles:       the CP styles it runs under (a recurrence needs whole sequences: Ulysses only)
    kernels:         the models.mixers.fused_kernels ops it runs (torch twin everywhere, fused on CUDA)
    description:     what the wrapper class is reported as (shared by families with one wrapper)
    """

    name: str
    class_names: dict[str, str]
    wrapper: type[nn.Module]
    wrap: Callable[..., nn.Module]
    cp_styles: tuple[str, ...] = ("ulysses",)
    mixer_cp: tuple[str, ...] = ("ulysses",)
    kernels: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        unknown = [op for op in self.kernels if op not in MIXER_OPS]
        if unknown:
            raise ValueError(f"mixer family {self.name}: kernels {unknown} are not models.mixers.fused_kernels ops "
                             f"{list(MIXER_OPS)}: add the op (torch twin, fused adapter, probe) there first")

    def matches(self, module: nn.Module) -> bool:
        """True for an unwrapped module of one of this family's HF classes."""
        return type(module).__name__ in self.class_names

    def register(self) -> None:
        """Tell cp.validation about this family's classes (its wrapper included: a prepared model re-validates)."""
        for class_name, description in {**self.class_names,
                                        self.wrapper.__name__: f"{self.description} under Ulysses"}.items():
            register_sequence_mixer(class_name, description, cp_styles=self.cp_styles)
