"""What the mixer wrappers (Gated DeltaNet, Mamba2) share about transformers' modules.

    decoder layer ──mixer(hidden, cache=... | cache_params=..., attention_mask=..., **kwargs)──> wrapper
        take_cache(kwargs)       the cache under whichever name this transformers version uses
        call_original(...)       the original mixer, the cache passed under the name ITS forward declares
    wrapper.__init__ ── adopt(wrapper, mixer)   the mixer's children, parameters and buffers registered
                                                on the wrapper under their own names: state_dict keys,
                                                FSDP / optimizer / PEFT names stay the HF names

The calling convention moved between releases: transformers 5.23 passes a mixer's cache as
`cache_params=`, 5.24 as `cache=` (`cache_params` deprecated until 5.40). A convention cptrain
does not know must never be ignored silently (a cache nobody reads would let generation or CP run
on a stale state), so:
  - `cache_keyword(mixer)` refuses at wrap time (startup) a mixer whose forward declares neither name;
  - `take_cache(kwargs)` refuses at call time a transformers Cache passed under any other keyword.
"""

from __future__ import annotations

import inspect

import transformers
from torch import nn
from transformers.cache_utils import Cache

CACHE_KEYWORDS = ("cache", "cache_params")  # 5.24+, 5.23
SUPPORTED_TRANSFORMERS = ">=5.23,<5.25"  # what the suite has passed on; pyproject.toml pins the same range


def cache_keyword(mixer: nn.Module) -> str:
    """The keyword `mixer.forward` takes its cache under; ValueError (at startup) if it is not one cptrain knows."""
    declared = inspect.signature(type(mixer).forward).parameters
    for name in CACHE_KEYWORDS:
        if name in declared:
            return name
    raise ValueError(f"{type(mixer).__name__}.forward takes its cache under none of {list(CACHE_KEYWORDS)} "
                     f"(arguments: {list(declared)}) in transformers {transformers.__version__}: cptrain's mixer "
                     f"wrappers support transformers{SUPPORTED_TRANSFORMERS}; install a supported version")


def take_cache(kwargs: dict, mixer_name: str):
    """Pop the cache of a mixer call from `kwargs`, under any known name (None if absent).

    Raises ValueError if two names carry different caches, or if a Cache arrives under a keyword
    cptrain does not know (a newer transformers calling convention).
    """
    given = [kwargs.pop(name) for name in CACHE_KEYWORDS if name in kwargs]
    given = [c for c in given if c is not None]
    if len(given) > 1 and any(c is not given[0] for c in given):
        raise ValueError(f"{mixer_name} got two different caches ({', '.join(CACHE_KEYWORDS)})")
    unknown = [key for key, value in kwargs.items() if isinstance(value, Cache)]
    if unknown:
        raise ValueError(f"{mixer_name} got a cache under the keyword {unknown[0]!r}, which cptrain's wrappers do not "
                         f"know (transformers {transformers.__version__}; supported: transformers"
                         f"{SUPPORTED_TRANSFORMERS}): install a supported version")
    return given[0] if given else None


def call_original(mixer: nn.Module, hidden_states, cache, attention_mask, **kwargs):
    """The original mixer's forward, with the cache under the keyword it declares."""
    return mixer(hidden_states, attention_mask=attention_mask, **{cache_keyword(mixer): cache}, **kwargs)


def adopt(wrapper: nn.Module, mixer: nn.Module, attributes: tuple[str, ...]) -> None:
    """Register `mixer`'s children, parameters and buffers on `wrapper` under the same names, copy the plain
    `attributes`, and keep `mixer` itself unregistered as `wrapper._original` (no duplicate parameter names)."""
    for name in attributes:
        setattr(wrapper, name, getattr(mixer, name, None))
    for name, child in mixer.named_children():
        wrapper.add_module(name, child)
    for name, param in mixer.named_parameters(recurse=False):
        wrapper.register_parameter(name, param)
    for name, buffer in mixer.named_buffers(recurse=False):
        wrapper.register_buffer(name, buffer)
    object.__setattr__(wrapper, "_original", mixer)


def original_if_unchanged(wrapper: nn.Module, what: str) -> nn.Module:
    """The adopted original module, if it still shares every parameter with the wrapper (FSDP replaces the
    wrapper's parameters: then the original would run stale weights, and this raises)."""
    original = wrapper._original
    shared = dict(wrapper.named_parameters())
    if any(shared.get(name) is not param for name, param in original.named_parameters()):
        raise RuntimeError(f"the wrapped {what}'s parameters were replaced (e.g. by FSDP), so the original module "
                           "cannot run the cached generation path: generate with use_cache=False or with an "
                           "unwrapped model")
    return original
