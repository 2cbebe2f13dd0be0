"""ParallelDims: data parallel x context parallel degrees, validated, and the DeviceMesh they make.

    world = dp * cp,  cp = cp_ring * cp_ulysses

    mesh dims (outer -> inner): dp, cp_ring, cp_ulysses
    flattened:                  cp    = (cp_ring, cp_ulysses)       the whole CP group
                                dp_cp = (dp, cp_ring, cp_ulysses)   FSDP shards over it

Ulysses is innermost, so a Ulysses group (two all-to-alls per layer, the heaviest traffic) sits
on neighbouring ranks (one node); the ring spans the slower links. cp rank = ring_rank * cp_ulysses
+ ulysses_rank, matching `layouts.shard_indices([("zigzag", ring), ("contiguous", ulysses)])`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

CP_STYLES = ("ulysses", "ring", "hybrid")


@dataclass
class ParallelDims:
    """Degrees of parallelism. Validated on construction; `build()` makes the mesh and groups."""

    world_size: int
    cp: int = 1
    cp_style: str = "ulysses"
    cp_ulysses: int | None = None  # hybrid only: the Ulysses degree inside each ring step
    mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _flat: dict[str, DeviceMesh] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.cp_style not in CP_STYLES:
            raise ValueError(f"unknown model.cp_style={self.cp_style!r}; choose one of {', '.join(CP_STYLES)}")
        if self.world_size < 1 or self.cp < 1:
            raise ValueError(f"world_size ({self.world_size}) and model.cp ({self.cp}) must be >= 1")
        if self.world_size % self.cp:
            raise ValueError(f"model.cp={self.cp} does not divide the world size {self.world_size}: "
                             f"launch a multiple of {self.cp} ranks or change model.cp")
        if self.cp_style == "hybrid":
            if self.cp_ulysses is None:
                raise ValueError("model.cp_style=hybrid needs model.cp_ulysses (the Ulysses degree; ring = cp / cp_ulysses)")
            if self.cp_ulysses < 1 or self.cp % self.cp_ulysses:
                raise ValueError(f"model.cp_ulysses={self.cp_ulysses} must divide model.cp={self.cp}")
        elif self.cp_ulysses not in (None, self.ulysses):
            raise ValueError(f"model.cp_ulysses is only used with model.cp_style=hybrid (got {self.cp_ulysses} "
                             f"with cp_style={self.cp_style})")

    @property
    def dp(self) -> int:
        return self.world_size // self.cp

    @property
    def ulysses(self) -> int:
        if self.cp_style == "hybrid":
            return self.cp_ulysses
        return self.cp if self.cp_style == "ulysses" else 1

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    def build(self, device_type: str = "cpu") -> DeviceMesh:
        """Make the DeviceMesh (needs the default process group, of size world_size)."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build() needs torch.distributed initialised (init_process_group)")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"ParallelDims.world_size={self.world_size} but the process group has "
                             f"{dist.get_world_size()} ranks")
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
