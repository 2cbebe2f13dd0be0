"""ParallelDims: data parallel x context parallel degrees, validated, and the DeviceMesh they make.

    world = dp * cp,  cp = cp_ring * cp_ulysses

    mesh dims (outer -> inner): dp, cp_ring, cp_ulysses
    flattened:                  cp    = (cp_ring, cp_ulysses)       the whole CP group
                                dp_cp = (dp, cp_ring, cp_ulysses)   FSDP shards over it

Ulysses is innermost, so a Ulysses group (two all-to-alls per layer, the heaviest traffic) sits
on neighbouring ranks (one node: torchrun numbers ranks node by node); the ring spans the slower
links. Two nodes x 2 ranks, cp=4 hybrid with cp_ulysses=2: Ulysses groups [0, 1] and [2, 3] (one
node each), ring groups [0, 2] and [1, 3] (across). `rank_groups(axis)` computes any axis's groups
from the degrees; build() warns when a Ulysses group cannot fit in a node (LOCAL_WORLD_SIZE). cp rank = ring_rank * cp_ulysses
+ ulysses_rank, matching `layouts.shard_indices([("zigzag", ring), ("contiguous", ulysses)])`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from cp.styles import CPConfigError, CPStyle, get_style


@dataclass
class ParallelDims:
    """Degrees of parallelism. Validated on construction; `build()` makes the mesh and groups."""

    world_size: int
    cp: int = 1
    cp_style: str = "ulysses"
    cp_ulysses: int | None = None  # hybrid only: the Ulysses degree inside each ring step
    mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _flat: dict[str, DeviceMesh] = field(default_factory=dict, init=False, repr=False)
    _ring: int = field(default=1, init=False, repr=False)  # (ring, Ulysses) degrees from the style's levels
    _ulysses: int = field(default=1, init=False, repr=False)
    _subgroups: dict[int, CPSubgroup] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise CPConfigError(f"world_size={self.world_size} must be >= 1", "world_size")
        self._ring, self._ulysses = get_style(self.cp_style).degrees(self.cp, self.cp_ulysses)  # validates
        if self.world_size % self.cp:
            raise CPConfigError(f"cp={self.cp} does not divide the world size {self.world_size}: launch a multiple "
                                f"of {self.cp} ranks or change cp", "cp")

    @property
    def style(self) -> CPStyle:
        """The registry entry of cp_style (cp.styles)."""
        return get_style(self.cp_style)

    @property
    def dp(self) -> int:
        return self.world_size // self.cp

    @property
    def ulysses(self) -> int:
        return self._ulysses

    @property
    def ring(self) -> int:
        return self._ring

    def rank_groups(self, axis: str) -> list[list[int]]:
        """Global ranks of every group along `axis` (dp, cp_ring, cp_ulysses, cp, dp_cp), from the degrees
        alone: the mesh is row-major over (dp, cp_ring, cp_ulysses), the order torchrun numbers ranks in
        (node by node). What build() makes; no process group needed (launch planning, tests)."""
        grid = torch.arange(self.world_size).reshape(self.dp, self.ring, self.ulysses)  # rank = (d*R + r)*U + u
        axes = {"dp": (0,), "cp_ring": (1,), "cp_ulysses": (2,), "cp": (1, 2), "dp_cp": (0, 1, 2)}
        if axis not in axes:
            raise ValueError(f"unknown mesh axis {axis!r}; choose one of {', '.join(axes)}")
        inner = axes[axis]
        outer = tuple(d for d in range(3) if d not in inner)
        size = 1
        for d in inner:
            size *= grid.shape[d]
        return grid.permute(*outer, *inner).reshape(-1, size).tolist()  # [groups, ranks of one group]

    def _warn_if_ulysses_crosses_nodes(self) -> None:
        """A Ulysses group should sit inside one node (its all-to-alls are the heaviest traffic)."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
        if local and self.ulysses > 1 and (self.ulysses > local or local % self.ulysses):
            warnings.warn(f"the Ulysses degree {self.ulysses} does not fit the {local} ranks per node: its all-to-alls "
                          "cross nodes; use cp_style=hybrid with cp_ulysses dividing the ranks per node (ring across "
                          "nodes)", stacklevel=3)

    def build(self, device_type: str = "cpu") -> DeviceMesh:
        """Make the DeviceMesh (needs the default process group, of size world_size)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build() needs torch.distributed initialised (init_process_group)")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"ParallelDims.world_size={self.world_size} but the process group has "
                             f"{dist.get_world_size()} ranks")
        self._warn_if_ulysses_crosses_nodes()
        mesh = init_device_mesh(device_type, (self.dp, self.ring, self.ulysses),
                                mesh_dim_names=("dp", "cp_ring", "cp_ulysses"))
        # Keep the flattened meshes: torch wants them bookkept, not re-sliced from the root.
        self._flat = {"cp": mesh["cp_ring", "cp_ulysses"]._flatten("cp"),
                      "dp_cp": mesh["dp", "cp_ring", "cp_ulysses"]._flatten("dp_cp")}
        self.mesh = mesh
        return mesh

    def _group(self, name: str) -> dist.ProcessGroup:
        if self.mesh is None:
            raise RuntimeError("call ParallelDims.build() before asking for process groups")
        mesh = self._flat[name] if name in self._flat else self.mesh[name]
        return mesh.get_group()

    @property
    def dp_cp_mesh(self) -> DeviceMesh:
        """The flattened 1-D (dp, cp_ring, cp_ulysses) mesh FSDP shards parameters over."""
        if self.mesh is None:
            raise RuntimeError("call ParallelDims.build() before asking for meshes")
        return self._flat["dp_cp"]

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self._group("cp")

    @property
    def ring_group(self) -> dist.ProcessGroup:
        return self._group("cp_ring")

    @property
    def ulysses_group(self) -> dist.ProcessGroup:
        return self._group("cp_ulysses")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self._group("dp")

    @property
    def dp_cp_group(self) -> dist.ProcessGroup:
        return self._group("dp_cp")

    @property
    def cp_rank(self) -> int:
        return dist.get_rank(self.cp_group)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    def cp_degrees(self) -> list[int]:
        """The degrees dynamic CP can give a micro-batch: the divisors of cp (a one-level style only)."""
        return [d for d in range(1, self.cp + 1) if self.cp % d == 0]

    def build_subgroups(self, degrees: list[int] | None = None) -> dict[int, CPSubgroup]:
        """Dynamic CP (collective, once at startup, on every rank): for each degree d in `degrees` (default:
        every divisor of cp), every cp group split into cp / d blocks of d consecutive cp ranks, each block a
        process group of its own. Returns {d: this rank's CPSubgroup}; degree cp is the cp group itself,
        degree 1 needs no group."""
        degrees = self.cp_degrees() if degrees is None else sorted(set(degrees))
        if any(self.cp % d for d in degrees):
            raise CPConfigError(f"CP subgroup degrees {degrees} must divide cp={self.cp}", "cp")
        if degrees != [self.cp] and self.style.two_level:
            raise CPConfigError(f"dynamic CP splits the cp group into smaller groups of one style; cp_style="
                                f"{self.cp_style} has two levels: use cp_style=ulysses or ring", "cp_style")
        if self.mesh is None:
            raise RuntimeError("call ParallelDims.build() before build_subgroups()")
        rank = dist.get_rank()
        for degree in degrees:
            blocks = self.cp // degree
            for group_index, ranks in enumerate(self.rank_groups("cp")):
                for block in range(blocks):
                    members = ranks[block * degree:(block + 1) * degree]
                    slot = group_index * blocks + block
                    if degree == self.cp:
                        if rank in members:
                            self._subgroups[degree] = CPSubgroup(
                                self.cp_style, degree, slot, self.ring, self.ulysses, self.cp_group, self.ring_group,
                                self.ulysses_group, self.mesh)
                        continue
                    group = dist.new_group(members) if degree > 1 else None  # every rank makes every group
                    if rank in members:
                        ring, ulysses = self.style.degrees(degree)
                        self._subgroups[degree] = CPSubgroup(
                            self.cp_style, degree, slot, ring, ulysses, group, group if ring > 1 else None,
                            group if ulysses > 1 else None, self.mesh)
        return dict(self._subgroups)


@dataclass(frozen=True)
class CPSubgroup:
    """CP at one degree on this rank: the block of `degree` consecutive cp ranks it belongs to (a cp group split
    into cp / degree blocks; degree cp: the cp group itself, any style). Global slot number: cp group index *
    (cp / degree) + block, so a micro-batch of this degree has world / degree slots, one row each. Passed to
    setup_cp_params as `dims` (it reads the style, the degrees and the groups)."""

    cp_style: str
    degree: int
    slot: int
    ring: int
    ulysses: int
    cp_group: dist.ProcessGroup | None  # None at degree 1
    ring_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    mesh: DeviceMesh  # the parent ParallelDims' (built)
