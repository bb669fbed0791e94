"""A Mesh: the execution context of a program on one region.

It binds a region to a mode (``numeric``: tiles are numpy arrays and really move;
``dry``: shapes only), a cost ledger (shareable between regions of one wafer), SRAM
accounting and route accounting. Primitives live in :mod:`comm` and :mod:`compute`
and take tensors of this mesh; both modes run the same code and charge the same cost.
"""

from __future__ import annotations

import numpy as np

from waferllm.errors import MeshError
from waferllm.mesh.ledger import Ledger
from waferllm.mesh.memory import SRAM
from waferllm.mesh.region import Region
from waferllm.mesh.routes import Routes
from waferllm.mesh.tensor import NP_DTYPES, DistTensor, check_layout, tile_shape_for

MODES = ("numeric", "dry")


class Mesh:
    def __init__(self, region: Region, mode: str = "numeric", ledger: Ledger | None = None,
                 route_policy: str = "relay"):
        if mode not in MODES:
            raise MeshError(f"mode must be one of {MODES}, got {mode!r}")
        self.region = region
        self.wafer = region.wafer
        self.mode = mode
        self.ledger = ledger if ledger is not None else Ledger(region.wafer)
        self.sram = SRAM(region)
        self.routes = Routes(region, policy=route_policy)

    def cache(self, name: str) -> dict:
        """A dict kept on this mesh under ``name``, for figures a program derives again and
        again from the mesh's shape and constants alone (schedule costs, chosen K-trees)."""
        return self.__dict__.setdefault(f"_cache_{name}", {})

    def dry_twin(self) -> "Mesh":
        """A shape-only mesh on the same region and ledger whose SRAM accounting starts as a
        copy of this one's (the same allocations, under the same handles) and whose routes
        start empty: a program run on it (with its tensors' ``shape_on(twin)``) charges the
        ledger what it would charge here, without computing values. Its SRAM footprint
        (``SRAM.recording``) and routes (``Routes.absorb``) then apply here."""
        twin = Mesh(self.region, mode="dry", ledger=self.ledger, route_policy=self.routes.policy)
        twin.sram = self.sram.copy()
        # the same region and constants: what this mesh has derived holds there too
        twin.__dict__.update({k: v for k, v in self.__dict__.items() if k.startswith("_cache_")})
        return twin

    @classmethod
    def square(cls, wafer, n: int, mode: str = "numeric", **kw) -> "Mesh":
        return cls(Region(wafer, n, n, name=f"{n}x{n}"), mode=mode, **kw)

    @property
    def numeric(self) -> bool:
        return self.mode == "numeric"

    @property
    def rows(self) -> int:
        return self.region.rows

    @property
    def cols(self) -> int:
        return self.region.cols

    @property
    def shape(self) -> tuple[int, int]:
        return self.region.shape

    def axis_size(self, axis: str) -> int:
        return self.rows if axis == "y" else self.cols

    # ---- tensors -------------------------------------------------------------
    def place(self, array, layout, dtype="fp32", name="tensor", blocks=None) -> DistTensor:
        """Put a host array (or, dry run, a shape tuple) on the mesh. Placement itself is not charged."""
        if not self.numeric and not isinstance(array, tuple):
            array = tuple(np.shape(array))
        return DistTensor.from_global(self, array, layout, dtype, name=name, blocks=blocks)

    def zeros(self, shape, layout, dtype="fp32", name="zeros", partial=None) -> DistTensor:
        tshape = tile_shape_for(shape, check_layout(shape, layout), self.shape)
        tiles = np.zeros((self.rows, self.cols, *tshape), NP_DTYPES[dtype]) if self.numeric else None
        return DistTensor(self, shape, layout, dtype, tiles, name=name, partial=partial)
