"""CP styles as registry entries: everything the rest of cptrain needs to know about a style, in one place.

    cp/ulysses.py ─┐
    cp/ring.py     ├─ register_cp_style(CPStyle(name, levels, default_layout, attention, kernel_kind,
    cp/hybrid.py  ─┘                             recurrent_mixers, options))       ──> CP_STYLES
                       read by:  ParallelDims (degrees, validation)     cp.dims
                                 setup_cp_params (shard levels, layout)  cp.params
                                 assert_cp_style_supports_model          cp.validation
                                 the AttentionInterface function         models.attention

A style splits the sequence over one or two levels, outermost first: "ring" (K/V blocks travel;
the style's layout, zigzag for causal balance) and "ulysses" (all-to-alls swap sequence for heads;
always contiguous). cp = ring x ulysses; a one-level style takes the whole cp degree for its level,
a two-level one needs `cp_ulysses` (the Ulysses degree). `kernel_kind` says which inner kernel the
attention function takes as `kernel=`: "local" (attention over a whole sequence of some heads,
cp.kernels) or "block" (a block kernel with log-sum-exp, cp.block_kernels / cp.cuda_kernels).
`recurrent_mixers`: linear-attention / SSM mixers may run under the style (their recurrences need
every token of a head on one rank: only styles without a ring level).

Errors about a style's arguments are `CPConfigError`s naming the argument as `name=value` in cp's
terms (cp, cp_style, cp_ulysses, chunks, attn); a trainer re-raises them in its config keys
(trainer.config.cp_errors_in_config_terms).

Adding a style: a module with its attention function `fn(q, k, v, params, *, causal, scale, window,
sinks, kernel, **options)` and one `register_cp_style(CPStyle(...))` call, imported by cp/__init__.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cp.layouts import LAYOUTS, ShardLevel

LEVELS = ("ring", "ulysses")  # outermost first; the Ulysses level is innermost (neighbouring ranks)
KERNEL_KINDS = ("local", "block")


class CPConfigError(ValueError):
    """A CP argument that cannot work, named in cp's terms (`cp=3`); `names` are the arguments involved."""

    def __init__(self, message: str, *names: str):
        super().__init__(message)
        self.names = names


@dataclass(frozen=True)
class CPStyle:
    """One CP style: how it shards and which attention function runs it."""

    name: str
    levels: tuple[str, ...]  # shard levels, outermost first: ("ring",), ("ulysses",) or ("ring", "ulysses")
    default_layout: str  # the ring level's layout (a Ulysses-only style is contiguous)
    attention: Callable  # fn(q, k, v, params, *, causal, scale, window, sinks, kernel, **options) -> out
    kernel_kind: str  # "local" | "block": what `kernel=` of the attention function is
    recurrent_mixers: bool  # linear-attention / SSM mixers may run under this style
    options: tuple[str, ...] = ()  # extra keyword options `attention` takes (Ulysses: chunks)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.levels or any(level not in LEVELS for level in self.levels) or list(self.levels) != sorted(
                self.levels, key=LEVELS.index):
            raise ValueError(f"CP style {self.name!r}: levels {self.levels} must be a non-empty ordered subset of {LEVELS}")
        if self.default_layout not in LAYOUTS or self.kernel_kind not in KERNEL_KINDS:
            raise ValueError(f"CP style {self.name!r}: layout {self.default_layout!r} / kernel kind "
                             f"{self.kernel_kind!r} unknown ({sorted(LAYOUTS)}, {KERNEL_KINDS})")

    @property
    def two_level(self) -> bool:
        return len(self.levels) == 2

    def degrees(self, cp: int, cp_ulysses: int | None = None) -> tuple[int, int]:
        """(ring degree, Ulysses degree) of `cp` ranks; validated (CPConfigError names the fix)."""
        if cp < 1:
            raise CPConfigError(f"cp={cp} must be >= 1", "cp")
        if self.two_level:
            if cp_ulysses is None:
                raise CPConfigError(f"cp_style={self.name} needs cp_ulysses (the Ulysses degree; ring = cp / "
                                    "cp_ulysses)", "cp_style", "cp_ulysses")
            if cp_ulysses < 1 or cp % cp_ulysses:
                raise CPConfigError(f"cp_ulysses={cp_ulysses} must divide cp={cp}", "cp_ulysses", "cp")
            return cp // cp_ulysses, cp_ulysses
        own = cp if self.levels == ("ulysses",) else 1
        if cp_ulysses not in (None, own):
            two = [s.name for s in CP_STYLES.values() if s.two_level]
            raise CPConfigError(f"cp_ulysses is only used with cp_style={' or '.join(two) or 'a two-level style'} "
                                f"(got cp_ulysses={cp_ulysses} with cp_style={self.name})", "cp_ulysses", "cp_style")
        return (1, cp) if self.levels == ("ulysses",) else (cp, 1)

    def shard_levels(self, layout: str, ring: int, ulysses: int) -> list[ShardLevel]:
        """(layout, size) of every level, outermost first (cp.layouts.shard_indices)."""
        sizes = {"ring": (layout, ring), "ulysses": ("contiguous", ulysses)}
        return [sizes[level] for level in self.levels]


CP_STYLES: dict[str, CPStyle] = {}


def register_cp_style(style: CPStyle) -> CPStyle:
    """Add `style` to CP_STYLES (called once by the module that defines its attention function)."""
    CP_STYLES[style.name] = style
    return style


def get_style(name: str) -> CPStyle:
    try:
        return CP_STYLES[name]
    except KeyError:
        raise CPConfigError(f"unknown cp_style={name!r}; choose one of {', '.join(CP_STYLES)}", "cp_style") from None
