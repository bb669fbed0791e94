"""Distributed tensors: a logical tensor, a layout over the mesh, and its tiles as one array.

Layout: one entry per logical dim, ``"y"`` (split over mesh rows), ``"x"`` (split over
mesh columns) or ``None`` (whole dim in every tile). A mesh axis no dim is split along
holds replicas. Tiles are one array of shape ``(rows, cols, *tile_shape)``; sizes that
do not divide are zero-padded, and the pad never reaches ``to_global()``.

Two extras make algorithm states exact:
- ``blocks``: for a split dim, which logical block each PE holds (default: its own
  coordinate). Skewed and rotating operands (Cannon, MeshGEMM) carry it, in dry runs
  too (a move is priced from it). A rotation that is the same on every line is kept as
  a pending permutation of rows and columns and applied only when ``blocks`` is read,
  so a kernel's N ring steps cost O(N) each, not O(PEs).
- ``partial``: ``("y"|"x", "sum"|"max")`` when the logical value is the reduction of the
  tiles along a mesh axis (a GEMV's partial products before the allreduce).

In dry-run mode ``tiles`` is ``None``: shapes, layouts, SRAM and cost are identical.

A tensor placed from a host array whose values are already exact in its dtype
(``from_global(..., exact=True)``: a fused layer's outputs) keeps that array and cuts its
tiles only when they are first read; reading it back whole (``to_global``) or by elements
(``comm.elements``) then needs no tiles at all.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from waferllm.errors import MeshError
from waferllm.hardware.plmr import DTYPE_BYTES

NP_DTYPES = {"fp16": np.float16, "fp32": np.float32}
AXES = {"y": 0, "x": 1}

#: Block-quantised storage of a weight matrix [K, N] (GGUF Q8_0 / Q4_0): bits per value;
#: values come in blocks of QBLOCK along K, each block with one fp16 scale per column.
QUANT_BITS = {"int8": 8, "int4": 4}
QBLOCK = 32
SCALE_BYTES = 2
# host arrays by storage dtype (a quantised tile's integers are held one per int8)
_STORAGE = {**NP_DTYPES, "int8": np.int8, "int4": np.int8}


def quant_tile_bytes(fmt: str, elems: int, tile_cols: int, slots: int) -> int:
    """Bytes a PE stores for a quantised tile of ``elems`` values and ``tile_cols`` columns:
    the packed integers plus ``slots`` fp16 block scales per column."""
    return math.ceil(elems * QUANT_BITS[fmt] / 8) + slots * tile_cols * SCALE_BYTES


_VALID_LAYOUTS: set = set()


def check_layout(shape: Sequence[int], layout: Sequence) -> tuple:
    layout = tuple(layout)
    if (len(shape), layout) in _VALID_LAYOUTS:  # the same few layouts recur in every step
        return layout
    if len(layout) != len(shape):
        raise MeshError(f"layout {layout} has {len(layout)} entries for a {len(shape)}-d tensor of shape {tuple(shape)}")
    for a in layout:
        if a not in ("y", "x", None):
            raise MeshError(f"layout entries must be 'y', 'x' or None, got {a!r}")
    for a in ("y", "x"):
        if layout.count(a) > 1:
            raise MeshError(f"layout {layout} splits two dims along mesh axis {a}")
    _VALID_LAYOUTS.add((len(shape), layout))
    return layout


def tile_shape_for(shape, layout, mesh_shape) -> tuple[int, ...]:
    r, c = mesh_shape
    return tuple(
        math.ceil(n / r) if a == "y" else math.ceil(n / c) if a == "x" else int(n) for n, a in zip(shape, layout)
    )


class DistTensor:
    """A logical tensor distributed over a mesh; see the module docstring."""

    __slots__ = ("mesh", "shape", "layout", "dtype", "_tiles", "_source", "tile_shape", "_blocks", "_moved", "partial",
                 "name", "_handle", "_view", "_elems", "_host", "__weakref__")

    def __init__(self, mesh, shape, layout, dtype, tiles=None, *, name="tensor", blocks=None, partial=None,
                 tile_shape=None, charge_sram=True, host_f32=False, moved=None, source=None):
        self.mesh = mesh
        self.shape = tuple(map(int, shape))
        self.layout = check_layout(self.shape, layout)
        if dtype not in _STORAGE or (dtype in QUANT_BITS and not isinstance(self, QuantTensor)):
            raise MeshError(f"dtype must be fp16 or fp32, got {dtype!r}")
        self.dtype = dtype
        self.tile_shape = tuple(tile_shape) if tile_shape is not None else tile_shape_for(self.shape, self.layout, mesh.shape)
        if tiles is not None:
            expect = (mesh.rows, mesh.cols, *self.tile_shape)
            if tuple(tiles.shape) != expect:
                raise MeshError(f"{name}: tiles of shape {tuple(tiles.shape)}, expected {expect}")
            # host_f32: fp16 values already held exactly in float32 (a compute view, and
            # the tiles it moves), so products need no conversion at every step
            if tiles.dtype != _STORAGE[dtype] and not (host_f32 and tiles.dtype == np.float32):
                tiles = tiles.astype(_STORAGE[dtype])
        elif mesh.numeric and source is None:
            raise MeshError(f"{name}: numeric mesh needs tile data")
        self._tiles = tiles if mesh.numeric else None
        # the logical array the tiles are cut from when first read (exact in ``dtype``)
        self._source = source if mesh.numeric and tiles is None else None
        self._blocks = blocks
        # (py, px): the tile on PE (i, j) is the one ``blocks`` puts on PE (py[i], px[j])
        # (None on an axis: no move along it); see with_moved_tiles
        self._moved = moved if moved is not None and ("y" in self.layout or "x" in self.layout) else None
        self.partial = partial
        self.name = name
        self._handle = None
        self._view = None
        self._elems = None
        self._host = None
        if charge_sram:
            self._handle = mesh.sram.alloc(name, self.bytes_per_pe)

    def __del__(self):
        # the last reference is gone: the tensor's SRAM is free (unless released before)
        handle = getattr(self, "_handle", None)
        if handle is not None:
            try:
                self.mesh.sram.free(handle)
            except (TypeError, AttributeError):  # interpreter shutdown: the modules are already gone
                pass

    @property
    def tiles(self) -> np.ndarray | None:
        """The tiles ``(rows, cols, *tile_shape)`` (None in a dry run)."""
        if self._tiles is None and self._source is not None:
            self._tiles = _tiles_of(self.mesh, self._source, self.layout, self._blocks, _STORAGE[self.dtype])
            self._source = None
        return self._tiles

    @tiles.setter
    def tiles(self, value) -> None:
        self._tiles, self._source = value, None

    @property
    def source(self) -> np.ndarray | None:
        """The logical array of a tensor placed from one whose tiles are not cut yet (read only)."""
        return self._source

    # ---- block maps ----------------------------------------------------------
    @property
    def blocks(self) -> dict | None:
        """Split dim -> (rows, cols) array of the block each PE holds (None: every PE its own)."""
        if self._moved is not None:
            py, px = self._moved
            r, c = self.mesh.shape
            rows = np.arange(r) if py is None else np.asarray(py)
            cols = np.arange(c) if px is None else np.asarray(px)
            base = self._blocks or {}
            out = {}
            for d, a in enumerate(self.layout):
                if a is None:
                    continue
                b = base.get(d)
                if b is None:  # its own coordinate, taken from where the tile came from
                    own = rows[:, None] if a == "y" else cols[None, :]
                    out[d] = np.broadcast_to(own, (r, c))
                else:
                    out[d] = np.broadcast_to(b, (r, c))[rows[:, None], cols[None, :]]
            self._blocks, self._moved = out, None
        return self._blocks

    def with_moved_tiles(self, tiles, axis: str, src, *, name=None) -> "DistTensor":
        """The tensor after its tiles moved along ``axis`` the same way on every line: the tile
        now at position p of a line came from position ``src[p]``. The block map is updated
        in O(line length); ``blocks`` applies it when read."""
        src = np.asarray(src)
        py, px = self._moved or (None, None)
        if axis == "y":
            py = src if py is None else np.asarray(py)[src]
        else:
            px = src if px is None else np.asarray(px)[src]
        return self.with_tiles(tiles, name=name, blocks=self._blocks, moved=(py, px))

    # ---- sizes -------------------------------------------------------------
    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def tile_elems(self) -> int:
        if self._elems is None:
            self._elems = math.prod(self.tile_shape)
        return self._elems

    def host_layout(self, key: str, build):
        """A derived host-side arrangement of the tiles, built once (weights reuse it every
        token). Only the simulator's own speed depends on it, never the numbers or cost."""
        if self._host is None:
            self._host = {}
        if key not in self._host:
            self._host[key] = build(self.tiles)
        return self._host[key]

    def compute_view(self) -> "DistTensor":
        """The same tensor with float32 host tiles (fp16 values exactly), for repeated products.

        It is not a new allocation on the wafer (no SRAM is charged); weights keep theirs
        cached, so a placed weight is converted once, not at every step of every GEMM.
        """
        if self.tiles is None or self.tiles.dtype == np.float32:
            return self
        if self._view is None:
            self._view = DistTensor(self.mesh, self.shape, self.layout, self.dtype, self.tiles.astype(np.float32),
                                    name=self.name, blocks=self._blocks, moved=self._moved, partial=self.partial,
                                    tile_shape=self.tile_shape, charge_sram=False, host_f32=True)
        return self._view

    @property
    def bytes_per_pe(self) -> int:
        return self.tile_elems * self.itemsize

    def axis_dim(self, axis: str) -> int | None:
        """Logical dim split along mesh ``axis`` (or None)."""
        return self.layout.index(axis) if axis in self.layout else None

    def __repr__(self) -> str:
        extra = f", partial={self.partial}" if self.partial else ""
        return (f"DistTensor({self.name}, shape={self.shape}, layout={self.layout}, tile={self.tile_shape}, "
                f"{self.dtype}, {'numeric' if self._tiles is not None or self._source is not None else 'dry'}{extra})")

    # ---- conversion --------------------------------------------------------
    @classmethod
    def from_global(cls, mesh, array, layout, dtype="fp32", *, name="tensor", blocks=None,
                    exact: bool = False) -> "DistTensor":
        """Place a host array on the mesh (numeric) or just its shape (dry run: pass a shape tuple).

        ``exact``: the array's values are already exact in ``dtype`` (rounded to it by the
        caller); the tensor keeps a read-only copy and cuts its tiles only if they are read."""
        if isinstance(array, tuple) or not mesh.numeric:
            shape = tuple(array) if isinstance(array, tuple) else tuple(np.shape(array))
            return cls(mesh, shape, layout, dtype, None, name=name, blocks=blocks)
        array = np.asarray(array)
        if dtype not in NP_DTYPES:
            raise MeshError(f"dtype must be fp16 or fp32, got {dtype!r}")
        if exact and blocks is None:
            array = np.array(array, np.float32)  # its own copy (fp16 values held exactly in float32)
            array.flags.writeable = False
            return cls(mesh, array.shape, layout, dtype, None, name=name, source=array)
        tiles = _tiles_of(mesh, array, layout, blocks, NP_DTYPES[dtype])
        return cls(mesh, array.shape, layout, dtype, tiles, name=name, blocks=blocks)

    def to_global(self, dtype=None) -> np.ndarray:
        """Reassemble the logical tensor on the host (numeric mode only)."""
        if self._source is not None:
            return np.array(self._source, dtype=dtype or NP_DTYPES[self.dtype])
        if self.tiles is None:
            raise MeshError(f"{self.name}: dry-run tensors hold no data")
        tiles = self.tiles
        if self.partial is not None:
            axis, op = self.partial
            red = np.sum if op == "sum" else np.max
            tiles = red(tiles.astype(np.float32, copy=False), axis=AXES[axis], keepdims=True)
            tiles = np.broadcast_to(tiles, self.tiles.shape)
        if self.blocks:
            tiles = _apply_blocks(tiles, self.layout, self.blocks, inverse=True)
        nd = len(self.layout)
        y = tiles if "y" in self.layout else tiles[:1]
        y = y if "x" in self.layout else y[:, :1]
        want = np.dtype(dtype or NP_DTYPES[self.dtype])
        own = y.dtype != want
        if own:  # converted once, as whole tiles; what follows rearranges this private copy
            y = y.astype(want)
        # y: (ry, cx, *tile) -> interleave parts back next to their dims
        ydim, xdim = self.axis_dim("y"), self.axis_dim("x")
        src_axes = []
        for d in range(nd):
            if d == ydim:
                src_axes += [0, 2 + d]
            elif d == xdim:
                src_axes += [1, 2 + d]
            else:
                src_axes += [2 + d]
        leftovers = [a for a in (0, 1) if a not in src_axes]
        arr = y.transpose(src_axes + leftovers)
        full = arr.reshape([y.shape[0] * self.tile_shape[d] if d == ydim else y.shape[1] * self.tile_shape[d]
                            if d == xdim else self.tile_shape[d] for d in range(nd)])
        out = full[tuple(slice(0, n) for n in self.shape)]
        return np.ascontiguousarray(out) if own else np.array(out)

    def pad_mask(self, dims=None):
        """Boolean array broadcastable to ``tiles``: True where an element is real data,
        False on the zero padding of split dims that do not divide; None if there is none.
        ``dims`` restricts the mask to those logical dims."""
        mask = None
        ii = jj = None
        for d, a in enumerate(self.layout):
            if a is None or (dims is not None and d not in dims):
                continue
            t = self.tile_shape[d]
            parts = self.mesh.rows if a == "y" else self.mesh.cols
            if parts * t == self.shape[d]:
                continue
            if ii is None:
                ii, jj = np.meshgrid(np.arange(self.mesh.rows), np.arange(self.mesh.cols), indexing="ij")
            block = (self.blocks or {}).get(d, ii if a == "y" else jj)
            idx = np.arange(t).reshape((1,) * d + (t,) + (1,) * (len(self.shape) - d - 1))
            valid = (np.asarray(block).reshape(block.shape + (1,) * len(self.shape)) * t + idx) < self.shape[d]
            mask = valid if mask is None else mask & valid
        return mask

    def shape_on(self, twin) -> "DistTensor":
        """This tensor on a shape-only twin of its mesh (``Mesh.dry_twin``): the same shape,
        layout, block map and allocation (which the twin's accounting holds too), no values."""
        t = DistTensor(twin, self.shape, self.layout, self.dtype, None, name=self.name, blocks=self._blocks,
                       partial=self.partial, tile_shape=self.tile_shape, charge_sram=False, moved=self._moved)
        t._handle = self._handle
        return t

    def with_tiles(self, tiles, *, name=None, layout=None, shape=None, blocks="keep", partial="keep", dtype=None,
                   moved=None) -> "DistTensor":
        """A new tensor on the same mesh with new tiles and optionally new metadata."""
        keep = isinstance(blocks, str) and blocks == "keep"
        return DistTensor(
            self.mesh,
            self.shape if shape is None else shape,
            self.layout if layout is None else layout,
            dtype or self.dtype,
            tiles,
            name=name or self.name,
            blocks=self._blocks if keep else blocks,
            moved=self._moved if keep else moved,
            partial=self.partial if partial == "keep" else partial,
            tile_shape=None if (layout is not None or shape is not None) else self.tile_shape,
            host_f32=(dtype is None or dtype == self.dtype) and tiles is not None and tiles.dtype == np.float32,
        )


class QuantTensor(DistTensor):
    """A weight matrix [K, N] stored block-quantised on every PE (GGUF Q8_0 / Q4_0 layouts).

    ``dtype`` is the storage format (``int8`` or ``int4``); the PE keeps its tile's integers
    and, per tile column, the fp16 scale of each of the ``scale_slots`` blocks of 32 values
    along K its tile's rows touch: ``bytes_per_pe`` is that stored size, what SRAM is
    charged and what a shift of the tile carries. A product dequantises the tile in the
    PE's SIMD unit into ``compute_dtype`` (see :func:`waferllm.mesh.compute.matmul_tiles`).

    Numeric host tiles hold the integers (int8 arrays) and ``scales`` the scale of every
    value (the block scales expanded, fp16); :meth:`compute_view` holds the dequantised
    values ``q * d`` rounded to ``compute_dtype``, kept as float32, with the same stored size.
    """

    __slots__ = ("compute_dtype", "scale_slots", "scales", "dequantized")

    def __init__(self, mesh, shape, layout, fmt, tiles=None, *, compute_dtype="fp16", scale_slots=0, scales=None,
                 dequantized=False, name="qtensor", blocks=None, tile_shape=None, charge_sram=True, moved=None,
                 partial=None):
        if fmt not in QUANT_BITS:
            raise MeshError(f"{name}: quantised dtype must be one of {', '.join(QUANT_BITS)}, got {fmt!r}")
        if compute_dtype not in NP_DTYPES:
            raise MeshError(f"{name}: a quantised tensor dequantises into fp16 or fp32, got {compute_dtype!r}")
        if len(shape) != 2 or None in tuple(layout):
            raise MeshError(f"{name}: a quantised tensor is a 2D-partitioned matrix, got shape {tuple(shape)} "
                            f"layout {tuple(layout)}")
        if partial is not None:
            raise MeshError(f"{name}: a quantised weight cannot be partial")
        self.compute_dtype = compute_dtype
        self.scale_slots = int(scale_slots)
        self.scales = scales if mesh.numeric else None
        self.dequantized = dequantized
        if tiles is not None and mesh.numeric and not dequantized and scales is None:
            raise MeshError(f"{name}: numeric quantised tiles need their scales")
        super().__init__(mesh, shape, layout, fmt, tiles, name=name, blocks=blocks, tile_shape=tile_shape,
                         charge_sram=charge_sram, host_f32=dequantized, moved=moved)

    @classmethod
    def from_global(cls, mesh, array, layout, fmt="int8", *, scales=None, compute_dtype="fp16", scale_slots=0,
                    name="qtensor", blocks=None) -> "QuantTensor":
        """Place a quantised matrix: ``array`` its integers [K, N] and ``scales`` every value's
        fp16 scale [K, N] (numeric), or ``array`` a shape tuple (dry run)."""
        kw = dict(compute_dtype=compute_dtype, scale_slots=scale_slots, name=name, blocks=blocks)
        if isinstance(array, tuple) or not mesh.numeric:
            shape = tuple(array) if isinstance(array, tuple) else tuple(np.shape(array))
            return cls(mesh, shape, layout, fmt, None, **kw)
        array = np.asarray(array)
        if scales is None or np.shape(scales) != array.shape:
            raise MeshError(f"{name}: a quantised matrix of shape {array.shape} needs one scale per value, got "
                            f"{None if scales is None else np.shape(scales)}")
        tiles = _tiles_of(mesh, array, layout, blocks, np.int8)
        return cls(mesh, array.shape, layout, fmt, tiles, scales=_tiles_of(mesh, scales, layout, blocks, np.float16),
                   **kw)

    @property
    def itemsize(self) -> float:
        """Stored bytes per value, its share of the block scale included (a full block)."""
        return QUANT_BITS[self.dtype] / 8 + SCALE_BYTES / QBLOCK

    @property
    def bytes_per_pe(self) -> int:
        return quant_tile_bytes(self.dtype, self.tile_elems, self.tile_shape[1], self.scale_slots)

    def compute_view(self) -> "QuantTensor":
        """The same tensor with its values dequantised on the host (float32, rounded to the
        compute dtype), for repeated products; no SRAM is charged. The cost of dequantising
        is charged by each product (the PE dequantises the tile it multiplies, every time)."""
        if self.tiles is None or self.dequantized:
            return self
        if self._view is None:
            self._view = QuantTensor(self.mesh, self.shape, self.layout, self.dtype, self.dequantized_tiles(),
                                     compute_dtype=self.compute_dtype, scale_slots=self.scale_slots,
                                     dequantized=True, name=self.name, blocks=self._blocks, moved=self._moved,
                                     tile_shape=self.tile_shape, charge_sram=False)
        return self._view

    def dequantized_tiles(self) -> np.ndarray:
        """The tiles' values ``q * d`` rounded to the compute dtype, as float32 (numeric only)."""
        if self.dequantized:
            return self.tiles
        values = self.tiles.astype(np.float32) * self.scales.astype(np.float32)
        return values.astype(NP_DTYPES[self.compute_dtype]).astype(np.float32)

    def shape_on(self, twin) -> "QuantTensor":
        t = QuantTensor(twin, self.shape, self.layout, self.dtype, None, compute_dtype=self.compute_dtype,
                        scale_slots=self.scale_slots, name=self.name, blocks=self._blocks, tile_shape=self.tile_shape,
                        charge_sram=False, moved=self._moved)
        t._handle = self._handle
        return t

    def to_global(self, dtype=None) -> np.ndarray:
        """The logical matrix as the PEs multiply with it: its dequantised values (float32
        unless ``dtype``), not the stored integers."""
        if self.tiles is None:
            raise MeshError(f"{self.name}: dry-run tensors hold no data")
        values = DistTensor(self.mesh, self.shape, self.layout, "fp32", self.dequantized_tiles(), name=self.name,
                            blocks=self._blocks, moved=self._moved, tile_shape=self.tile_shape, charge_sram=False)
        return values.to_global(dtype or np.float32)

    def with_tiles(self, tiles, *, name=None, layout=None, shape=None, blocks="keep", partial="keep", dtype=None,
                   moved=None) -> "QuantTensor":
        """The tensor after its tiles moved (a MeshGEMM operand's ring shift): the same stored
        format; numeric tiles must be dequantised values (a compute view), whose scales moved with them."""
        if layout is not None or shape is not None or (dtype is not None and dtype != self.dtype) or \
                (partial != "keep" and partial is not None):
            raise MeshError(f"{self.name}: a quantised weight only moves whole; it cannot change its layout, "
                            "shape or dtype")
        if tiles is not None and not self.dequantized:
            raise MeshError(f"{self.name}: move the compute view of a quantised weight (its scales move with it)")
        keep = isinstance(blocks, str) and blocks == "keep"
        return QuantTensor(self.mesh, self.shape, self.layout, self.dtype, tiles, compute_dtype=self.compute_dtype,
                           scale_slots=self.scale_slots, dequantized=self.dequantized, name=name or self.name,
                           blocks=self._blocks if keep else blocks, moved=self._moved if keep else moved,
                           tile_shape=self.tile_shape)

    def __repr__(self) -> str:
        return (f"QuantTensor({self.name}, shape={self.shape}, layout={self.layout}, tile={self.tile_shape}, "
                f"{self.dtype}->{self.compute_dtype}, {self.scale_slots} scales/column, "
                f"{'numeric' if self.tiles is not None else 'dry'})")


def _tiles_of(mesh, array: np.ndarray, layout, blocks, np_dtype) -> np.ndarray:
    """A host array cut into the tiles ``(rows, cols, *tile)`` of ``layout`` (zero padding),
    moved to the PEs ``blocks`` names."""
    layout = check_layout(array.shape, layout)
    tshape = tile_shape_for(array.shape, layout, mesh.shape)
    r, c = mesh.shape
    parts = [r if a == "y" else c if a == "x" else 1 for a in layout]
    pad = [(0, p * t - n) for p, t, n in zip(parts, tshape, array.shape)]
    arr = np.asarray(array, dtype=np_dtype)
    if any(p[1] for p in pad):
        arr = np.pad(arr, pad)
    # (p0, t0, p1, t1, ...) then bring the y-parts and x-parts axes to the front.
    split = arr.reshape([v for p, t in zip(parts, tshape) for v in (p, t)])
    nd = len(layout)
    part_axis = {a: 2 * d for d, a in enumerate(layout) if a}
    tile_axes = [2 * d + 1 for d in range(nd)]
    unused = [2 * d for d, a in enumerate(layout) if not a]
    order = [part_axis.get("y"), part_axis.get("x")]
    front = [o for o in order if o is not None]
    moved = split.transpose(front + unused + tile_axes)
    # unused part axes have size 1: drop them
    moved = moved.reshape([split.shape[a] for a in front] + [split.shape[a] for a in tile_axes])
    if "y" not in layout:
        moved = moved[None]
    if "x" not in layout:
        moved = moved[:, None]
    tiles = np.broadcast_to(moved, (r, c, *tshape))
    if blocks:
        tiles = _apply_blocks(tiles, layout, blocks, inverse=False)
    else:
        tiles = np.ascontiguousarray(tiles) if tiles.strides[0] and tiles.strides[1] else tiles
    return tiles


def _apply_blocks(tiles, layout, blocks, inverse: bool):
    """Move tiles between 'PE (i,j) holds its own block' and 'PE (i,j) holds blocks[d][i,j]'."""
    r, c = tiles.shape[:2]
    ii, jj = np.meshgrid(np.arange(r), np.arange(c), indexing="ij")
    by = blocks.get(layout.index("y"), ii) if "y" in layout else ii
    bx = blocks.get(layout.index("x"), jj) if "x" in layout else jj
    if inverse:  # result[block] = tiles[pe]
        out = np.empty(tiles.shape, dtype=tiles.dtype)
        out[by, bx] = tiles
        return out
    return tiles[by, bx]
