"""Rows of a batch on the mesh: the tokens of several requests decoded together.

A batch of B vectors [B, N] keeps its rows side by side in every PE's tile (layout
(None, axis)); each row is an address range of that tile. Taking a row, or writing a
request's result into its row, moves nothing: these are views and in-place writes,
charged nothing here (the ops that produce the values pay for their own writes).
"""

from __future__ import annotations

import numpy as np

from waferllm.errors import MeshError
from waferllm.mesh.tensor import DistTensor


def as_batch(t: DistTensor) -> DistTensor:
    """A 1-d tensor [N] (axis,) as a batch of one [1, N] (None, axis): the same storage."""
    if len(t.shape) != 1:
        raise MeshError(f"as_batch: {t.name} is not 1-d (shape {t.shape})")
    tiles = None if t.tiles is None else t.tiles[:, :, None]
    t.mesh.sram.release(t)  # the same bytes, now under the batch's name
    return DistTensor(t.mesh, (1,) + t.shape, (None,) + t.layout, t.dtype, tiles, name=t.name, partial=t.partial,
                      tile_shape=(1,) + t.tile_shape)


def unbatch(t: DistTensor) -> DistTensor:
    """A batch of one [1, N] back to the 1-d tensor [N]: the same storage."""
    if len(t.shape) != 2 or t.shape[0] != 1:
        raise MeshError(f"unbatch: {t.name} is not a batch of one (shape {t.shape})")
    tiles = None if t.tiles is None else t.tiles[:, :, 0]
    t.mesh.sram.release(t)
    return DistTensor(t.mesh, t.shape[1:], t.layout[1:], t.dtype, tiles, name=t.name, partial=t.partial,
                      tile_shape=t.tile_shape[1:])


def row(t: DistTensor, b: int) -> DistTensor:
    """Row ``b`` of a batch [B, ...] as a tensor of its own: a view of the batch's tiles
    (no SRAM of its own; the batch holds it)."""
    if t.layout[0] is not None:
        raise MeshError(f"row: {t.name}'s batch dim is split over the mesh (layout {t.layout})")
    tiles = None if t.tiles is None else t.tiles[:, :, b]
    return DistTensor(t.mesh, t.shape[1:], t.layout[1:], t.dtype, tiles, name=f"{t.name}[{b}]", partial=t.partial,
                      tile_shape=t.tile_shape[1:], charge_sram=False)


def stack(rows: list[DistTensor], name: str = "batch") -> DistTensor:
    """Per-request results [N] (axis,) as one batch [B, N] (None, axis): each was written into
    its row of the batch's buffer, which now holds them (their own space is released)."""
    first = rows[0]
    for r in rows[1:]:
        if r.shape != first.shape or r.layout != first.layout or r.mesh is not first.mesh:
            raise MeshError(f"stack: {r.name} {r.shape} {r.layout} does not match {first.name} {first.shape} "
                            f"{first.layout}")
    tiles = None if first.tiles is None else np.stack([r.tiles for r in rows], axis=2)
    first.mesh.sram.release(*rows)
    return DistTensor(first.mesh, (len(rows),) + first.shape, (None,) + first.layout, first.dtype, tiles, name=name,
                      tile_shape=(len(rows),) + first.tile_shape)

