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



def rows_as_heads(t: DistTensor, lo: int, hi: int, name: str = "queries") -> DistTensor:
    """Rows ``lo..hi-1`` of a batch [B, N] (None, x) whose tile is r query heads' blocks
    [r, F] (one request's tokens in a verification pass) as one query of (hi-lo)*r heads
    [(hi-lo)*N] (x): each PE's tile the rows' blocks side by side, [T, r, F] read as
    [T*r, F]. A view of the batch's tiles (no SRAM of its own; the batch holds it)."""
    if t.layout[0] is not None or len(t.shape) != 2:
        raise MeshError(f"rows_as_heads: {t.name} is not a batch of vectors (shape {t.shape}, layout {t.layout})")
    n = hi - lo
    tiles = None if t.tiles is None else t.tiles[:, :, lo:hi].reshape(t.tiles.shape[:2] + (-1,))
    return DistTensor(t.mesh, (n * t.shape[1],), t.layout[1:], t.dtype, tiles, name=name, partial=t.partial,
                      tile_shape=(n * t.tile_shape[1],), charge_sram=False)


def heads_as_rows(t: DistTensor, n: int, name: str = "attention") -> list[DistTensor]:
    """The inverse of :func:`rows_as_heads` for a result [n*N] (x): its ``n`` rows, each [N]
    (x) an address range of the tile, each holding its share of ``t``'s SRAM (released)."""
    if len(t.shape) != 1 or t.shape[0] % n or t.tile_shape[0] % n:
        raise MeshError(f"heads_as_rows: {t.name} (shape {t.shape}) does not split into {n} rows")
    tiles = None if t.tiles is None else t.tiles.reshape(t.tiles.shape[:2] + (n, -1))
    t.mesh.sram.release(t)  # the same bytes, now under the rows' names
    return [DistTensor(t.mesh, (t.shape[0] // n,), t.layout, t.dtype, None if tiles is None else tiles[:, :, i],
                       name=f"{name}[{i}]", partial=t.partial, tile_shape=(t.tile_shape[0] // n,))
            for i in range(n)]
