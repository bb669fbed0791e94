"""Moves of a tensor between two placements, priced from where every element leaves and lands.

A :class:`Placement` says which PE of a region holds (or must receive) each element of
a logical tensor. One logical dim may be spread over the region's rows and one over its
columns, each by an explicit coordinate map (index -> PE row or column; blocked tiles,
balanced counts or any other split). A dim that is not spread along an axis is
*replicated* along it: every PE of that axis holds a copy (source) or needs one
(destination). A skewed operand's blocks sit on PEs given by a table (block pair -> PE).

The move is executed as messages under dimension-order (XY) routing: along the row to the
destination column, then along that column. Elements are grouped into cells with one
source and one destination (per dim, the runs of indices whose coordinates agree:
O(rows + cols) runs), so the work is O(mesh), never O(elements). Per cell:
- a split source sends from its PE; a replicated source sends from the copy nearest to
  the destination along that axis (the destination's own line when it has a copy);
- a replicated destination is reached by one multicast per sender: the message covers
  the span of receivers and each link on the way carries it once (the union of the XY
  paths to every receiver);
- a partial source (every PE along an axis holds a share of the value) sends every share.
An element that stays on its PE costs nothing.

Cost: the busiest of (a PE's injected bytes, a PE's ejected bytes, a directed link's
bytes) streams at link rate behind the longest path's head (2 ramps + alpha per hop),
plus the fixed cost of a collective and a task switch. Link loads are built with 2D
difference arrays (rectangle updates, then prefix sums), vectorised over all cells.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np

from waferllm.errors import MeshError
from waferllm.hardware.defects import box_extra
from waferllm.mesh.cost import message_cycles
from waferllm.mesh.region import Region
from waferllm.mesh.tensor import DistTensor


@dataclass(frozen=True, eq=False)
class Placement:
    """Where each element of a logical tensor of ``shape`` lives on ``region``.

    ``y_dim``/``x_dim``: the logical dim spread over the region's rows / columns (None:
    replicated along that axis). ``y_of``/``x_of``: for every index of that dim, its PE
    row / column (region-local), or its block id when ``pe_rows``/``pe_cols`` are given:
    tables (rows x cols, indexed by [y block, x block], 0 for an axis with no dim) of the
    PE row and column holding each block pair (skewed operands). ``partial``: "y" or "x"
    when each PE along that axis holds a share of the value and every share must travel
    (a source only).
    """

    region: Region
    shape: tuple
    y_dim: int | None = None
    y_of: np.ndarray | None = None
    x_dim: int | None = None
    x_of: np.ndarray | None = None
    pe_rows: np.ndarray | None = None
    pe_cols: np.ndarray | None = None
    partial: str | None = None

    def on(self, region: Region) -> "Placement":
        """The same placement on another region of its size (its maps, already checked
        against that size, are shared: callers keep them read-only)."""
        if region is self.region:
            return self
        if region.shape != self.region.shape:
            raise MeshError(f"placement on a {self.region.shape} region cannot move to a {region.shape} one")
        out = object.__new__(Placement)
        out.__dict__.update(self.__dict__)
        object.__setattr__(out, "region", region)
        return out

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        if self.y_dim is not None and self.y_dim == self.x_dim:
            raise MeshError(f"placement: dim {self.y_dim} cannot be spread over rows and columns at once")
        for label, dim, of in (("y", self.y_dim, self.y_of), ("x", self.x_dim, self.x_of)):
            if dim is None:
                continue
            if not 0 <= dim < len(shape):
                raise MeshError(f"placement: {label} dim {dim} outside a {len(shape)}-d tensor")
            of = np.asarray(of, dtype=np.int64)
            if of.shape != (shape[dim],):
                raise MeshError(f"placement: {label} map needs one coordinate per index of dim {dim} "
                                f"({shape[dim]}), got shape {of.shape}")
            n = self.region.rows if label == "y" else self.region.cols
            seen = _CHECKED.get(id(of))
            if not (seen is not None and seen[0] is of and seen[1] <= n):
                if of.size and (of.min() < 0 or of.max() >= n):
                    raise MeshError(f"placement: {label} coordinates must lie in [0, {n}) on {self.region.describe()}")
                if not of.flags.writeable and of.flags.owndata:
                    if len(_CHECKED) > 4096:
                        _CHECKED.clear()
                    _CHECKED[id(of)] = (of, int(of.max(initial=0)) + 1)
            object.__setattr__(self, f"{label}_of", of)
        if (self.pe_rows is None) != (self.pe_cols is None):
            raise MeshError("placement: give both block tables (pe_rows and pe_cols) or neither")
        if self.partial not in (None, "y", "x"):
            raise MeshError(f"placement: partial must be 'y', 'x' or None, got {self.partial!r}")
        if self.partial is not None and (self.y_dim if self.partial == "y" else self.x_dim) is not None:
            raise MeshError(f"placement: a value partial along {self.partial} cannot also be split along it")

    @classmethod
    def blocked(cls, region: Region, shape, layout, tile_shape=None) -> "Placement":
        """The plain block layout of a :class:`DistTensor` (``layout`` entries 'y', 'x', None)."""
        shape = tuple(int(s) for s in shape)
        kw = {}
        for label, parts in (("y", region.rows), ("x", region.cols)):
            if label in layout:
                d = list(layout).index(label)
                t = tile_shape[d] if tile_shape is not None else math.ceil(shape[d] / parts)
                kw[f"{label}_dim"], kw[f"{label}_of"] = d, _block_map(shape[d], max(int(t), 1))
        return cls(region, shape, **kw)

    @classmethod
    def of(cls, t: DistTensor) -> "Placement":
        """Where ``t``'s elements are now: its layout, its tiles' padding and its block map."""
        p = cls.blocked(t.mesh.region, t.shape, t.layout, t.tile_shape)
        blocks = t.blocks
        partial = t.partial[0] if t.partial is not None else None
        if not blocks:
            return cls(p.region, p.shape, p.y_dim, p.y_of, p.x_dim, p.x_of, partial=partial)
        r, c = t.mesh.shape
        by, bx = (blocks.get(p.y_dim) if p.y_dim is not None else 0), (blocks.get(p.x_dim) if p.x_dim is not None else 0)
        key = (r, c, blocks_key(by), blocks_key(bx))
        tables = _TABLES.get(key) if None not in key else None
        if tables is None:
            tables = _tables(t.name, r, c, by, bx, p.x_dim is None, p.y_dim is None)
            if None not in key:
                if len(_TABLES) > 256:
                    _TABLES.clear()
                _TABLES[key] = tables + (by, bx)  # (the maps keyed by identity stay alive with it)
        return cls(p.region, p.shape, p.y_dim, p.y_of, p.x_dim, p.x_of, tables[0], tables[1], partial)


_TABLES: dict = {}  # block maps -> (pe_rows, pe_cols): every weight of a region is skewed alike


def blocks_key(b):
    """A block map, as a key, without reading every entry: None (its own coordinate), 0 (a
    dim that is not split), a read-only array by identity (a kernel's cached skew), a map
    broadcast along an axis by its one line; ``None`` in the key when it has none of these
    forms (the tables are then built and not remembered)."""
    if b is None or isinstance(b, int):
        return ("own",) if b is None else ("zero",)
    b = np.asarray(b)
    if b.ndim == 2 and 0 in b.strides:
        axis = 1 if b.strides[1] == 0 else 0
        line = b[:, 0] if axis == 1 else b[0, :]
        return ("line", axis, line.shape, np.ascontiguousarray(line).tobytes())
    if not b.flags.writeable and b.flags.owndata:
        return ("id", id(b))
    return None


def _tables(name, r, c, by, bx, copies_x: bool, copies_y: bool):
    """(pe_rows, pe_cols) of a tensor whose PE (i, j) holds block (by[i, j], bx[i, j]) (None:
    its own coordinate, 0: one block), read-only; refuses copies that hold different blocks."""
    ii, jj = np.arange(r)[:, None], np.arange(c)
    by = np.zeros((r, c), np.int64) if isinstance(by, int) else np.broadcast_to(ii if by is None else by, (r, c))
    bx = np.zeros((r, c), np.int64) if isinstance(bx, int) else np.broadcast_to(jj if bx is None else bx, (r, c))
    # an axis a tensor is not split along holds copies: they must hold the same blocks
    for held, axis, along, copies in ((by, 1, "x", copies_x), (bx, 0, "y", copies_y)):
        if copies and not (held == held.take([0], axis=axis)).all():
            raise MeshError(f"{name}: its copies along {along} hold different blocks; cannot price a move of it")
    pe_rows = np.full((r, c), -1, np.int64)
    pe_cols = np.full((r, c), -1, np.int64)
    at = (by * c + bx).ravel()  # each PE's block pair, flat: one scatter per table, of whole arrays
    pe_rows.ravel()[at], pe_cols.ravel()[at] = np.repeat(np.arange(r), c), np.tile(np.arange(c), r)
    pe_rows.setflags(write=False)
    pe_cols.setflags(write=False)
    return pe_rows, pe_cols


@lru_cache(maxsize=1024)
def _block_map(n: int, tile: int) -> np.ndarray:
    """Index -> block of ``n`` indices in blocks of ``tile`` (read-only: shared by every tensor alike)."""
    out = np.arange(n) // tile
    out.setflags(write=False)
    return out


_CHECKED: dict = {}  # id(read-only map) -> (the map, its bound): shared maps are checked once


def _reach(a: np.ndarray, b: np.ndarray) -> slice:
    """The span of indices where ``a`` or ``b`` is not zero."""
    nz = np.flatnonzero((a != 0) | (b != 0))
    return slice(int(nz[0]), int(nz[-1]) + 1) if nz.size else slice(0, 0)


@dataclass(frozen=True)
class _Outer:
    """``unit * (outer(u, v) - outer(u2, v2))`` of non-negative integer profiles, kept
    factored: its sum needs no array, and so does its max when nothing is subtracted."""

    u: np.ndarray
    v: np.ndarray
    unit: int = 1
    u2: np.ndarray | None = None
    v2: np.ndarray | None = None

    def array(self) -> np.ndarray:
        out = self.unit * np.outer(self.u, self.v)
        if self.u2 is not None:
            out -= self.unit * np.outer(self.u2, self.v2)
        return out

    def max(self) -> int:
        if self.u2 is not None:  # built on the rows and columns either profile reaches (zero elsewhere)
            rows, cols = _reach(self.u, self.u2), _reach(self.v, self.v2)
            part = np.outer(self.u[rows], self.v[cols]) - np.outer(self.u2[rows], self.v2[cols])
            return self.unit * int(part.max(initial=0))
        return self.unit * int(self.u.max(initial=0)) * int(self.v.max(initial=0)) if self.u.size * self.v.size else 0

    def sum(self) -> int:
        total = int(self.u.sum()) * int(self.v.sum())
        if self.u2 is not None:
            total -= int(self.u2.sum()) * int(self.v2.sum())
        return self.unit * total


@dataclass(frozen=True)
class _Window:
    """A load that is zero outside one rectangle of the box: its ``values`` there, from box
    row and column ``at``, in a box of ``shape``. Its max and sum are the rectangle's (loads
    are never negative)."""

    values: np.ndarray
    at: tuple
    shape: tuple

    def array(self) -> np.ndarray:
        out = np.zeros(self.shape, np.int64)
        (r, c), (h, w) = self.at, self.values.shape
        out[r: r + h, c: c + w] = self.values
        return out

    def max(self) -> int:
        return int(self.values.max(initial=0))

    def sum(self) -> int:
        return int(self.values.sum())


class _Lazy:
    """A load built only when it is read, or when it may be the busiest: its sum is known
    exactly without it and ``bound`` caps its max. ``build()`` makes it together with others
    (one call, kept: its result indexed by ``part``)."""

    def __init__(self, build, part: int, total: int, bound: int):
        self.build, self.part, self.total, self.bound = build, part, int(total), int(bound)

    def array(self) -> np.ndarray:
        v = self.build()[self.part]
        return v if isinstance(v, np.ndarray) else v.array()

    def max(self) -> int:
        v = self.build()[self.part]
        return int(v.max(initial=0)) if isinstance(v, np.ndarray) else v.max()

    def sum(self) -> int:
        return self.total


def _lazy_loads(build, totals, bounds) -> tuple[_Lazy, ...]:
    """Loads built together by one call of ``build`` (a tuple of them), kept once made."""
    held = []

    def once():
        if not held:
            held.append(build())
        return held[0]

    return tuple(_Lazy(once, k, t, b) for k, (t, b) in enumerate(zip(totals, bounds)))


LOADS = ("inject", "eject", "east", "west", "south", "north")


class MoveTraffic:
    """What a move loads, in bytes. Arrays cover the bounding box of both regions, whose
    top-left PE is ``origin`` on the wafer: ``inject``/``eject`` per PE; ``east[r, c]`` the
    link (r, c) -> (r, c+1), ``west[r, c]`` (r, c+1) -> (r, c), ``south[r, c]`` (r, c) ->
    (r+1, c), ``north[r, c]`` (r+1, c) -> (r, c). A load given as an :class:`_Outer`, a
    :class:`_Window` or a :class:`_Lazy` is built only when read: the cost needs its max and
    sum alone."""

    def __init__(self, origin, inject, eject, east, west, south, north, max_hops: int, bytes_moved: int,
                 messages: int):
        self.origin = origin
        self._loads = dict(zip(LOADS, (inject, eject, east, west, south, north)))
        self.max_hops = max_hops
        self.bytes_moved = bytes_moved  # bytes delivered (a multicast counts every receiver)
        self.messages = messages  # sends

    def load(self, name: str) -> np.ndarray:
        v = self._loads[name]
        if not isinstance(v, np.ndarray):
            v = self._loads[name] = v.array()
        return v

    inject = property(lambda self: self.load("inject"))
    eject = property(lambda self: self.load("eject"))
    east = property(lambda self: self.load("east"))
    west = property(lambda self: self.load("west"))
    south = property(lambda self: self.load("south"))
    north = property(lambda self: self.load("north"))

    def _max(self, name: str) -> int:
        v = self._loads[name]
        return int(v.max(initial=0)) if isinstance(v, np.ndarray) else v.max()

    def total(self, name: str) -> int:
        v = self._loads[name]
        return int(v.sum()) if isinstance(v, np.ndarray) else v.sum()

    @property
    def busiest_bytes(self) -> int:
        """The most bytes one ramp or one directed link carries (a :class:`_Lazy` load is
        built only if its cap is above the busiest of the others)."""
        lazy = [v for v in self._loads.values() if isinstance(v, _Lazy)]
        best = max((self._max(k) for k in LOADS if not isinstance(self._loads[k], _Lazy)), default=0)
        for v in sorted(lazy, key=lambda v: -v.bound):
            if v.bound > best:
                best = max(best, v.max())
        return best

    @property
    def hop_bytes(self) -> int:
        return sum(self.total(k) for k in ("east", "west", "south", "north"))


# ---------------------------------------------------------------------- cells


def _runs(maps: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the maximal runs of indices on which every map is constant."""
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not maps:
        return np.zeros(1, np.int64), np.array([n], np.int64)
    edge = maps[0][1:] != maps[0][:-1]
    for m in maps[1:]:
        edge |= m[1:] != m[:-1]
    change = np.flatnonzero(edge) + 1
    starts = np.concatenate(([0], change))
    return starts, np.diff(np.concatenate((starts, [n])))


_MERGED: dict = {}  # ids of read-only maps -> (weak references, their merged runs): a pair recurs per region


def _merged_runs(maps: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs of :func:`_runs` merged by their map values (indices with the same values are
    held by the same PE and bound for the same PE, wherever they lie): (an index of each
    distinct value, the values (len(maps), k), elements per value). Maps that are read-only
    and own their values (a stage's placements, shared by every region of its size) are
    merged once while they live; the runs returned then are read-only too."""
    if not (maps and all(not m.flags.writeable and m.flags.owndata for m in maps)):
        return _merge(maps, n)
    key = (n,) + tuple(id(m) for m in maps)
    held = _MERGED.get(key)
    if held is not None and all(r() is m for r, m in zip(held[0], maps)):
        return held[1]
    out = _merge(maps, n)
    for a in out:
        a.setflags(write=False)
    if len(_MERGED) > 1024:
        _MERGED.clear()
    _MERGED[key] = ([weakref.ref(m) for m in maps], out)
    return out


def _merge(maps: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    starts, lengths = _runs(maps, n)
    if not maps:
        return starts, np.zeros((0, starts.size), np.int64), lengths
    at = [m[starts] for m in maps]
    key = at[0]
    for m in at[1:]:  # one integer per value tuple (coordinates are small): a 1-d unique
        key = key * (int(m.max(initial=0)) + 1) + m
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    return starts[first], np.stack(at)[:, first], np.bincount(inv.ravel(), lengths, first.size).astype(np.int64)


def _cells(src: Placement, dst: Placement):
    """Cells of elements with one source and one destination: (index of every cell's first
    element along each spread dim, elements per cell)."""
    dims = sorted({d for d in (src.y_dim, src.x_dim, dst.y_dim, dst.x_dim) if d is not None})
    first, grids = {}, []
    for d in dims:
        maps = [p_of for p in (src, dst) for dim, p_of in ((p.y_dim, p.y_of), (p.x_dim, p.x_of)) if dim == d]
        starts, _, lengths = _merged_runs(maps, src.shape[d])
        grids.append((starts, lengths))
    mesh = np.meshgrid(*[np.arange(len(s)) for s, _ in grids], indexing="ij") if grids else []
    count = np.ones(1 if not grids else mesh[0].size, np.int64)
    for d, (starts, lengths), g in zip(dims, grids, mesh):
        first[d] = starts[g.ravel()]
        count = count * lengths[g.ravel()]
    rest = math.prod(s for d, s in enumerate(src.shape) if d not in dims)
    return first, count * rest


def _coords(p: Placement, first: dict):
    """Wafer row and column of every cell on placement ``p`` (None along a replicated axis)."""
    by = p.y_of[first[p.y_dim]] if p.y_dim is not None else None
    bx = p.x_of[first[p.x_dim]] if p.x_dim is not None else None
    if p.pe_rows is not None:
        ky = by if by is not None else 0
        kx = bx if bx is not None else 0
        rows, cols = p.pe_rows[ky, kx], p.pe_cols[ky, kx]
        if (by is not None and np.any(rows < 0)) or (bx is not None and np.any(cols < 0)):
            raise MeshError("placement: a block of the tensor is held by no PE of its table")
        by = rows if by is not None else None
        bx = cols if bx is not None else None
    return (None if by is None else by + p.region.row0), (None if bx is None else bx + p.region.col0)


def _axis_options(s, d, s_span, d_span, partial: bool, ncells: int):
    """Who sends along one axis, and to which span: arrays (cells, K) of sender lo/hi,
    receiver lo/hi, parallel (each line of [lo, hi] sends to itself) and valid."""
    s0, s1 = s_span
    d0, d1 = d_span

    def full(v):  # the same options for every cell
        return np.broadcast_to(np.asarray(v, np.int64), (ncells, np.size(v)))

    if partial:  # every share travels: one sender per source line
        lines = np.arange(s0, s1 + 1)
        snd = full(lines)
        lo = np.broadcast_to((d if d is not None else np.full(ncells, d0))[:, None], snd.shape)
        hi = np.broadcast_to((d if d is not None else np.full(ncells, d1))[:, None], snd.shape)
        return snd, snd, lo, hi, np.zeros(snd.shape, bool), np.ones(snd.shape, bool)
    if s is None and s0 == s1:  # a single line of copies: it is the sender
        s = np.full(ncells, s0)
    if s is not None:  # one sender: to its destination, or multicast over the replicated span
        lo = d if d is not None else np.full(ncells, d0)
        hi = d if d is not None else np.full(ncells, d1)
        return s[:, None], s[:, None], lo[:, None], hi[:, None], np.zeros((ncells, 1), bool), np.ones((ncells, 1), bool)
    if d is not None:  # replicated source: the copy nearest to the destination
        c = np.clip(d, s0, s1)[:, None]
        return c, c, d[:, None], d[:, None], np.zeros((ncells, 1), bool), np.ones((ncells, 1), bool)
    # replicated on both sides: lines the source covers keep their own copy; the others get
    # a multicast from the nearer edge line of the source (which also serves itself)
    down, up = d0 < s0, d1 > s1
    below, above = (d0, min(d1, s0)), (max(d0, s1), d1)
    inside = (max(d0, s0 + down), min(d1, s1 - up))
    snd_lo = full([s0, inside[0], s1])
    snd_hi = full([s0, inside[1], s1])
    lo = full([below[0], inside[0], above[0]])
    hi = full([below[1], inside[1], above[1]])
    par = full([0, 1, 0]).astype(bool)
    return snd_lo, snd_hi, lo, hi, par, full([down, inside[0] <= inside[1], up]).astype(bool)


# ---------------------------------------------------------------------- loads


@dataclass
class _Axis:
    """One axis of a set of flows (arrays of any one shape), in box coordinates: senders
    [s_lo, s_hi] (one line, or a range of lines each serving itself), receivers [r_lo, r_hi],
    and the links crossed away from the sender ``fwd`` (toward higher coordinates) and
    ``back``. ``stay``: nothing moves along this axis; ``own``: the sender's own line is
    among the receivers."""

    s_lo: np.ndarray
    s_hi: np.ndarray
    r_lo: np.ndarray
    r_hi: np.ndarray
    fwd: tuple
    back: tuple
    stay: np.ndarray
    own: np.ndarray
    ok: np.ndarray
    n_send: np.ndarray
    n_recv: np.ndarray
    hops: np.ndarray


def _axis(options, origin: int) -> _Axis:
    s_lo, s_hi, lo, hi, par, ok = options
    s_lo, s_hi, lo, hi = s_lo - origin, s_hi - origin, lo - origin, hi - origin
    r_lo, r_hi = np.where(par, s_lo, lo), np.where(par, s_hi, hi)
    none = (np.zeros_like(lo), np.full_like(lo, -1))  # an empty range of links
    fwd = (np.where(par, none[0], s_lo), np.where(par, none[1], hi - 1))
    back = (np.where(par, none[0], lo), np.where(par, none[1], s_lo - 1))
    own = par | ((lo <= s_lo) & (s_lo <= hi))
    return _Axis(s_lo, s_hi, r_lo, r_hi, fwd, back, stay=par | ((lo == s_lo) & (hi == s_lo)), own=own, ok=ok,
                 n_send=s_hi - s_lo + 1, n_recv=r_hi - r_lo + 1,
                 hops=np.where(par, 0, np.maximum(np.maximum(s_lo - lo, hi - s_lo), 0)))


def _span(n: int, lo, hi, w) -> np.ndarray:
    """Length-n array: the sum of w over every range lo..hi (inclusive) covering each position."""
    lo, hi, w = (np.ravel(a) for a in (lo, hi, w))
    keep = (lo <= hi) & (w != 0)
    d = np.bincount(lo[keep], w[keep], n + 1) - np.bincount(hi[keep] + 1, w[keep], n + 1)
    return np.cumsum(np.rint(d).astype(np.int64))[:n]


def _rect(shape, rows, cols, w, factored: bool = False):
    """Array of ``shape``: the sum of w over every rectangle rows[0]..rows[1] x cols[0]..cols[1]
    (integer weights: the float sums are exact). ``factored``: when every rectangle spans the
    same columns (or the same rows), as a multicast to a replicated destination does, the
    load is one row profile times one column span: an :class:`_Outer`, built only if read."""
    (r0, r1), (c0, c1) = rows, cols
    keep = (r0 <= r1) & (c0 <= c1) & (w != 0)
    r0, r1, c0, c1, w = (np.asarray(a)[keep] for a in (r0, r1, c0, c1, w))
    H, W = shape
    if not w.size:
        return np.zeros(shape, np.int64)
    if factored and (c0 == c0[0]).all() and (c1 == c1[0]).all():
        return _Outer(_span(H, r0, r1, w), _span(W, c0[:1], c1[:1], np.ones(1, np.int64)))
    if factored and (r0 == r0[0]).all() and (r1 == r1[0]).all():
        return _Outer(_span(H, r0[:1], r1[:1], np.ones(1, np.int64)), _span(W, c0, c1, w))
    if factored:  # built on the rectangles' bounding box alone
        top, left = int(r0.min()), int(c0.min())
        size = (int(r1.max()) + 1 - top, int(c1.max()) + 1 - left)
        local = _rect(size, (r0 - top, r1 - top), (c0 - left, c1 - left), w)
        return _Window(local, (top, left), shape)
    if (r0 == r1).all() and (c0 == c1).all():  # single PEs
        return np.bincount(r0 * W + c0, w, H * W).reshape(H, W).astype(np.int64)
    if (r0 == r1).all():  # spans of single rows: differences along the rows only
        row = r0 * (W + 1)
        d = np.bincount(np.concatenate((row + c0, row + c1 + 1)), np.concatenate((w, -w)), H * (W + 1))
        return np.cumsum(d.astype(np.int64).reshape(H, W + 1), axis=1)[:, :W]
    if (c0 == c1).all():  # spans of single columns
        d = np.bincount(np.concatenate((r0 * W + c0, (r1 + 1) * W + c0)), np.concatenate((w, -w)), (H + 1) * W)
        return np.cumsum(d.astype(np.int64).reshape(H + 1, W), axis=0)[:H]
    r0, r1 = r0 * (W + 1), (r1 + 1) * (W + 1)
    corners = np.concatenate((r0 + c0, r0 + c1 + 1, r1 + c0, r1 + c1 + 1))
    d = np.bincount(corners, np.concatenate((w, -w, -w, w)), (H + 1) * (W + 1)).astype(np.int64).reshape(H + 1, W + 1)
    return np.cumsum(np.cumsum(d, axis=0), axis=1)[:H, :W]


def _box(src: Placement, dst: Placement):
    ra, rb = src.region, dst.region
    top, left = min(ra.row0, rb.row0), min(ra.col0, rb.col0)
    return top, left, max(ra.row0 + ra.rows, rb.row0 + rb.rows) - top, max(ra.col0 + ra.cols, rb.col0 + rb.cols) - left


def _spans(p: Placement, axis: str) -> tuple[int, int]:
    r = p.region
    return (r.row0, r.row0 + r.rows - 1) if axis == "y" else (r.col0, r.col0 + r.cols - 1)


def _separable(src: Placement, dst: Placement) -> bool:
    """Whether a cell's rows depend on one dim and its columns on another: no block table,
    and each axis spreads the same dim (or none) at both ends."""
    ys, xs = {src.y_dim, dst.y_dim} - {None}, {src.x_dim, dst.x_dim} - {None}
    return src.pe_rows is None and dst.pe_rows is None and len(ys) <= 1 and len(xs) <= 1 and not ys & xs


def _separable_axis(src: Placement, dst: Placement, axis: str, origin: int):
    """Flows along one axis over the runs of the dim it spreads: (_Axis (runs, K), weights)."""
    dim = next((d for d in (getattr(src, f"{axis}_dim"), getattr(dst, f"{axis}_dim")) if d is not None), None)
    maps = [getattr(p, f"{axis}_of") for p in (src, dst) if getattr(p, f"{axis}_dim") == dim and dim is not None]
    starts, _, lengths = _merged_runs(maps, src.shape[dim] if dim is not None else 1)
    off = {"y": "row0", "x": "col0"}[axis]
    ends = [None if getattr(p, f"{axis}_dim") is None else getattr(p, f"{axis}_of")[starts] + getattr(p.region, off)
            for p in (src, dst)]
    opts = _axis_options(ends[0], ends[1], _spans(src, axis), _spans(dst, axis), src.partial == axis, starts.size)
    ax = _axis(opts, origin)
    return ax, np.where(ax.ok, lengths[:, None], 0)


def _traffic_separable(src, dst, itemsize, box) -> MoveTraffic:
    """Every load is an outer product of one row profile and one column profile."""
    top, left, H, W = box
    Y, wy = _separable_axis(src, dst, "y", top)
    X, wx = _separable_axis(src, dst, "x", left)
    unit = itemsize * math.prod(s for d, s in enumerate(src.shape) if d not in
                                {src.y_dim, src.x_dim, dst.y_dim, dst.x_dim})
    send_y, send_x = _span(H, Y.s_lo, Y.s_hi, wy), _span(W, X.s_lo, X.s_hi, wx)
    recv_x = _span(W, X.r_lo, X.r_hi, wx)
    stay_y, stay_x = wy * Y.stay, wx * X.stay
    own_y, own_x = wy * Y.own, wx * X.own
    live_msgs = (Y.n_send * Y.ok).sum() * (X.n_send * X.ok).sum()
    stay_msgs = (Y.n_send * Y.ok * Y.stay).sum() * (X.n_send * X.ok * X.stay).sum()

    def less(u, v, u2, v2):  # u x v less what stays (nothing to subtract: kept factored)
        if not (u2[2].any() and v2[2].any()):
            return _Outer(u, v, unit)
        return _Outer(u, v, unit, _span(len(u), *u2), _span(len(v), *v2))

    return MoveTraffic(
        origin=(top, left),
        inject=less(send_y, send_x, (Y.s_lo, Y.s_hi, stay_y), (X.s_lo, X.s_hi, stay_x)),
        eject=less(_span(H, Y.r_lo, Y.r_hi, wy), recv_x, (Y.s_lo, Y.s_hi, own_y), (X.s_lo, X.s_hi, own_x)),
        east=_Outer(send_y, _span(W - 1, *X.fwd, wx), unit), west=_Outer(send_y, _span(W - 1, *X.back, wx), unit),
        south=_Outer(_span(H - 1, *Y.fwd, wy), recv_x, unit), north=_Outer(_span(H - 1, *Y.back, wy), recv_x, unit),
        max_hops=int(Y.hops[Y.ok].max(initial=0) + X.hops[X.ok].max(initial=0)),
        bytes_moved=int(unit * ((wy * Y.n_recv).sum() * (wx * X.n_recv).sum()
                                - (own_y * Y.n_send).sum() * (own_x * X.n_send).sum())),
        messages=int(live_msgs - stay_msgs),
    )


def _less(a, b, shape):
    """``a - b`` of two loads of ``shape`` (arrays, :class:`_Outer` or :class:`_Window`):
    factored if both are outer products, else built on the rectangle that holds both."""
    if isinstance(a, _Outer) and isinstance(b, _Outer) and a.u2 is None and b.u2 is None and a.unit == b.unit:
        return _Outer(a.u, a.v, a.unit, b.u, b.v)
    boxes = [_support(v, shape) for v in (a, b)]
    r0, c0 = min(x[0] for x in boxes), min(x[1] for x in boxes)
    r1, c1 = max(x[2] for x in boxes), max(x[3] for x in boxes)
    return _Window(_part(a, r0, c0, r1, c1) - _part(b, r0, c0, r1, c1), (r0, c0), shape)


def _support(v, shape) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1), ends exclusive: a rectangle outside which load ``v`` is zero."""
    if isinstance(v, _Window):
        (r, c), (h, w) = v.at, v.values.shape
        return r, c, r + h, c + w
    if isinstance(v, _Outer) and v.u2 is None:
        rows, cols = _reach(v.u, v.u), _reach(v.v, v.v)
        return rows.start, cols.start, rows.stop, cols.stop
    return 0, 0, shape[0], shape[1]


def _part(v, r0, c0, r1, c1) -> np.ndarray:
    """Load ``v`` on rows r0..r1 and columns c0..c1 (ends exclusive) of its box."""
    if isinstance(v, _Window):
        out = np.zeros((r1 - r0, c1 - c0), np.int64)
        (r, c), (h, w) = v.at, v.values.shape
        out[r - r0: r - r0 + h, c - c0: c - c0 + w] = v.values
        return out
    if isinstance(v, _Outer) and v.u2 is None:
        return v.unit * np.outer(v.u[r0: r1], v.v[c0: c1])
    return (v if isinstance(v, np.ndarray) else v.array())[r0: r1, c0: c1]


def _traffic_cells(src, dst, itemsize, box) -> MoveTraffic:
    """Any pair of placements: one flow per cell and per sender, loads by rectangle updates."""
    top, left, H, W = box
    first, elems = _cells(src, dst)
    n = elems.size
    (sy, sx), (dy, dx) = _coords(src, first), _coords(dst, first)
    oy = _axis_options(sy, dy, _spans(src, "y"), _spans(dst, "y"), src.partial == "y", n)
    ox = _axis_options(sx, dx, _spans(src, "x"), _spans(dst, "x"), src.partial == "x", n)
    ky, kx = oy[0].shape[1], ox[0].shape[1]
    # flows: every cell x every y option x every x option
    Y = _axis([np.broadcast_to(a[:, :, None], (n, ky, kx)).ravel() for a in oy], top)
    X = _axis([np.broadcast_to(a[:, None, :], (n, ky, kx)).ravel() for a in ox], left)
    live = Y.ok & X.ok & ~(Y.stay & X.stay)
    b = np.where(live, np.repeat(elems * itemsize, ky * kx), 0)
    own = Y.own & X.own
    hops = np.where(live, Y.hops + X.hops, 0)
    return MoveTraffic(
        origin=(top, left),
        inject=_rect((H, W), (Y.s_lo, Y.s_hi), (X.s_lo, X.s_hi), b, True),
        eject=_less(_rect((H, W), (Y.r_lo, Y.r_hi), (X.r_lo, X.r_hi), b, True),
                    _rect((H, W), (Y.s_lo, Y.s_hi), (X.s_lo, X.s_hi), b * own, True), (H, W)),
        east=_rect((H, W - 1), (Y.s_lo, Y.s_hi), X.fwd, b, True),
        west=_rect((H, W - 1), (Y.s_lo, Y.s_hi), X.back, b, True),
        south=_rect((H - 1, W), Y.fwd, (X.r_lo, X.r_hi), b, True),
        north=_rect((H - 1, W), Y.back, (X.r_lo, X.r_hi), b, True),
        max_hops=int(hops.max(initial=0)),
        bytes_moved=int((b * (Y.n_recv * X.n_recv - own * Y.n_send * X.n_send)).sum()),
        messages=int((live * Y.n_send * X.n_send).sum()),
    )


def _transposed(src: Placement, dst: Placement) -> bool:
    """Whether a plain placement's two spread dims swap axes (no tables, nothing replicated
    or partial): what :func:`_traffic_transposed` prices."""
    return (src.pe_rows is None and dst.pe_rows is None and src.partial is None and None not in (src.y_dim, src.x_dim)
            and (dst.y_dim, dst.x_dim) == (src.x_dim, src.y_dim))


def _traffic_transposed(src, dst, itemsize, box) -> MoveTraffic:
    """A transpose between plain placements, every load from a few (H, W) sums.

    Key a (merged runs of the dim on the source rows) leaves row ``sy`` for column ``dx``;
    key b (the dim on the source columns) leaves column ``sx`` for row ``dy``. Element
    (a, b) goes along row sy[a] from sx[b] to dx[a], then along column dx[a] to dy[b]. A
    row link (r, c) -> (r, c+1) carries every a of row r bound past c times every b sent
    from c or before: ``Qa`` (a's bytes by (sy, dx), on the source's rows and the
    destination's columns) summed right of c, times the b's bytes by source column summed up
    to c; the other links alike, the row links on the source's rows and the column links on
    the destination's columns alone. What stays is Qa x Qb, on the few cells where both are
    held (found by their codes, never as whole arrays); the ramps are built only if read."""
    top, left, H, W = box
    A, B = src.y_dim, src.x_dim
    unit = itemsize * math.prod(s for d, s in enumerate(src.shape) if d not in (A, B))
    _, (sy, dx), la = _merged_runs([src.y_of, dst.x_of], src.shape[A])
    _, (sx, dy), lb = _merged_runs([src.x_of, dst.y_of], src.shape[B])
    rs, c0 = src.region.row0 - top, dst.region.col0 - left
    sy, dx, sx, dy = sy + rs, dx + c0, sx + src.region.col0 - left, dy + dst.region.row0 - top
    la = la * unit
    total = int(la.sum()) * int(lb.sum())
    dt = np.int32 if 2 * total < 2 ** 31 else np.int64  # every load (and the partial sums) fits
    hs, wd = src.region.rows, dst.region.cols
    qa = np.bincount((sy - rs) * wd + dx - c0, la, hs * wd).astype(dt).reshape(hs, wd)
    # the cells where a's (by row and destination column) meet b's (by destination row and
    # column): their elements stay, one message per pair of keys
    cell_a, ia = np.unique(sy * W + dx, return_inverse=True)
    cell_b, ib = np.unique(dy * W + sx, return_inverse=True)
    at, ka, kb = np.intersect1d(cell_a, cell_b, assume_unique=True, return_indices=True)
    stay = (np.bincount(ia, la)[ka] * np.bincount(ib, lb)[kb]).astype(np.int64)
    ix, ey = np.bincount(sx, lb, W).astype(dt), np.bincount(dy, lb, H).astype(dt)
    ix_up, ey_up = np.cumsum(ix), np.cumsum(ey)  # b's bytes from source columns <= c / bound for rows <= r
    # a's bytes of row r bound for columns <= c, across the whole box
    right = np.zeros((hs, W), dt)
    np.cumsum(qa, axis=1, out=right[:, c0: c0 + wd])
    right[:, c0 + wd:] = right[:, c0 + wd - 1: c0 + wd]
    down = np.cumsum(qa, axis=0)  # a's bytes of column c from rows <= r (on the source's rows)
    below = np.zeros((H, wd), dt)
    below[rs: rs + hs] = down
    below[rs + hs:] = down[-1]
    on_rows, on_cols = (H, W - 1), (H - 1, W)
    links = dict(east=_Window((right[:, -1:] - right[:, :-1]) * ix_up[:-1], (rs, 0), on_rows),
                 west=_Window(right[:, :-1] * (ix_up[-1] - ix_up[:-1]), (rs, 0), on_rows),
                 south=_Window(below[:-1] * (ey_up[-1] - ey_up[:-1])[:, None], (0, c0), on_cols),
                 north=_Window((below[-1:] - below[:-1]) * ey_up[:-1, None], (0, c0), on_cols))
    inject, eject = _transposed_ramps(np.bincount(sy, la, H), ix, ey, np.bincount(dx, la, W), at, stay, total)
    messages = la.size * lb.size - int((np.bincount(ia)[ka] * np.bincount(ib)[kb]).sum())
    # the longest path: |sx - dx| + |sy - dy| is the largest of its four signed sums
    hops = max(int((s1 * sx - s2 * dy).max()) + int((s2 * sy - s1 * dx).max()) for s1 in (1, -1) for s2 in (1, -1))
    return MoveTraffic(origin=(top, left), inject=inject, eject=eject, **links, max_hops=hops if messages else 0,
                       bytes_moved=total - int(stay.sum()), messages=messages)


def _transposed_ramps(from_rows, from_cols, into_rows, into_cols, at, stay, total) -> tuple[_Lazy, ...]:
    """A transpose's injection and ejection (each an outer product of bytes by row and by
    column, less what stays on the flat box cells ``at``), built only if read: each sums to
    every byte but those that stay, and is at most its two largest factors' product."""
    from_rows, from_cols, into_rows, into_cols = (np.asarray(v).astype(np.int64) for v in
                                                  (from_rows, from_cols, into_rows, into_cols))

    def build():
        inject, eject = np.outer(from_rows, from_cols), np.outer(into_rows, into_cols)
        inject.ravel()[at] -= stay
        eject.ravel()[at] -= stay
        return inject, eject

    left = total - int(stay.sum())
    bounds = [int(u.max(initial=0)) * int(v.max(initial=0))
              for u, v in ((from_rows, from_cols), (into_rows, into_cols))]
    return _lazy_loads(build, (left, left), bounds)


def _column_table(src: Placement, dst: Placement) -> bool:
    """Whether ``src`` holds its blocks by a table whose PE column depends on the column
    block alone (a MeshGEMM B operand: its skew permutes the row blocks within each
    column), ``dst`` is a plain placement of the same two dims (either way round), and
    nothing is replicated or partial: what :func:`_traffic_column_table` prices."""
    if src.pe_rows is None or dst.pe_rows is not None or src.partial is not None:
        return False
    dims = (src.y_dim, src.x_dim)
    if None in dims or (dst.y_dim, dst.x_dim) not in (dims, dims[::-1]):
        return False
    rows, cols = src.pe_rows, src.pe_cols
    if _table_ring(rows, cols) is not None:  # (one column per column block, every block held)
        return True
    if not ((cols == cols[:1]).all() and (rows >= 0).all()):  # a full table is the usual case
        used = np.ix_(np.unique(src.y_of), np.unique(src.x_of))
        rows, cols = rows[used], cols[used]
    return bool((cols == cols[:1]).all() and (rows >= 0).all())


def _line_loads(lines: int, n: int, line, frm, to, w, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Link loads of messages along lines of ``n`` PEs (integer arrays broadcast together):
    on line ``line``, from coordinate ``frm`` to ``to``, ``w`` bytes. Returns the
    (lines, n - 1) loads of the forward links (i -> i+1) and the backward ones (i+1 -> i),
    of integer type ``dtype``."""
    shape = np.broadcast_shapes(np.shape(line), np.shape(frm), np.shape(to), np.shape(w))
    # each message adds w from its lower end and takes it back at its upper end, in its
    # direction's plane (one that stays adds and takes back in one place); both ends are
    # built whole first, so that the passes after them run on contiguous arrays
    at = np.asarray(line, np.int64) * (n + 1)
    f, t = np.broadcast_to(at + frm, shape).ravel(), np.broadcast_to(at + to, shape).ravel()
    lo, hi = np.minimum(f, t), np.maximum(f, t)
    off = (t < f) * np.int64(lines * (n + 1))
    lo += off
    hi += off
    w = np.broadcast_to(np.asarray(w), shape).ravel().astype(dtype)  # integer weights
    loads = np.zeros((2, lines, n + 1), dtype)
    d = loads.ravel()
    np.add.at(d, lo, w)
    np.subtract.at(d, hi, w)
    np.cumsum(loads, axis=2, out=loads)
    return loads[0, :, : n - 1], loads[1, :, : n - 1]


def _by_column(profiles: np.ndarray, key: np.ndarray, w: np.ndarray, col: np.ndarray, W: int) -> np.ndarray:
    """(W, len of a profile): row c holds the sum of ``w[i] * profiles[key[i]]`` over
    every i with ``col[i] == c``. Added in rounds (the first i of every column, then the
    second, ...): a column gets a few, so no round writes a column twice."""
    out = np.zeros((W, profiles.shape[1]), profiles.dtype)
    order = np.argsort(col, kind="stable")
    c = col[order]
    at = np.arange(c.size)
    rank = at - np.maximum.accumulate(np.where(np.r_[True, c[1:] != c[:-1]], at, 0))  # place in its column
    for k in range(int(rank.max(initial=-1)) + 1):
        i = order[rank == k]
        out[col[i]] += profiles[key[i]] * w[i, None]
    return out


def _expand(groups: np.ndarray, of: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i, k) with ``of[k] == groups[i]`` (``of`` takes values in [0, n)): their
    indices i and k."""
    order = np.argsort(of, kind="stable")
    first = np.searchsorted(of[order], np.arange(n))
    reps = np.bincount(of, minlength=n)[groups]
    i = np.repeat(np.arange(groups.size), reps)
    k = order[np.repeat(first[groups] - (np.cumsum(reps) - reps), reps) + np.arange(reps.sum())]
    return i, k


def _extremes(key: np.ndarray, v: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The least and the most of ``v`` over the items of each key in [0, n)."""
    lo, hi = np.full(n, np.iinfo(np.int64).max), np.full(n, np.iinfo(np.int64).min)
    np.minimum.at(lo, key, v)
    np.maximum.at(hi, key, v)
    return lo, hi


def _line_c_max(H: int, frm: np.ndarray, to: np.ndarray, to_w: np.ndarray) -> np.ndarray:
    """(lines, H): on line l, the bytes of the items k whose rows ``frm[l, k]`` and ``to[k]``
    are both <= each row (one pass over every (line, item))."""
    n = frm.shape[0]
    c_max = np.bincount(((np.arange(n) * H)[:, None] + np.maximum(frm, to)).ravel(),
                        np.tile(np.asarray(to_w, np.float64), n), n * H).astype(np.int64).reshape(n, H)
    np.cumsum(c_max, axis=1, out=c_max)  # integer weights: the float sums are exact
    return c_max


def _column_links(H: int, W: int, c_max: np.ndarray, t0: int, r0: int, nrows: int, exc: tuple, key: np.ndarray,
                  key_w: np.ndarray, key_col: np.ndarray, to: np.ndarray, to_w: np.ndarray):
    """(south, north), each (H - 1, W): the column links of a skewed source's move, whose
    messages run on lines (column blocks, or row blocks), each line's profile then summed on
    the destination columns of its keys (``key``: a key's line, ``key_w`` its bytes,
    ``key_col`` its column).

    On every line, items go from a source row (``frm``) to a destination row (``to``, the
    same on every line, with ``to_w`` bytes). With C_x(i) the bytes of the items whose x <= i,
    the link below row i carries C_frm - C_max(frm, to) and the one above it
    C_to - C_max(frm, to): ``c_max`` (lines, H) is given, C_to is one line shared by all, and
    C_frm what each line holds on each row summed down: ``t0`` on each of the ``nrows``
    source rows from box row ``r0``, but for a few exceptions ``exc`` (box rows, columns and
    bytes of each difference from t0, already summed on the columns of the lines' keys)."""
    both = _by_column(c_max[:, : H - 1], key, key_w, key_col, W)
    per_col = np.bincount(key_col, key_w, W).astype(np.int64)
    rows, cols, w = exc
    # (W, H): the prefix sums down each column run along contiguous memory
    held_c = np.bincount(cols * H + rows, w, W * H).astype(np.int64).reshape(W, H)
    held_c[:, r0: r0 + nrows] += t0 * per_col[:, None]
    np.cumsum(held_c, axis=1, out=held_c)
    c_to = np.cumsum(np.bincount(to, to_w, H).astype(np.int64))
    return (held_c[:, : H - 1] - both).T, (np.outer(per_col, c_to[: H - 1]) - both).T


def _traffic_column_table(src, dst, itemsize, box) -> MoveTraffic:
    """A source placed by a column-preserving block table (see :func:`_column_table`).

    Elements are grouped by merged runs: keys ``a`` along the source's row dim, ``b`` along
    its column dim. Source column j (a column block) holds every key b of that block, each
    row block y on the PE row ``rows[j, y]``. The flows are the cell path's (one per pair of
    keys, XY-routed), but each load is summed over only what it depends on, never over every
    pair: the injection per PE (j, y); the row links as one profile shared by every source
    row plus each PE's difference from it (same dims) or per (j, a) (transposed); the column
    links as one row profile per column block j (same dims) or per row block y (transposed),
    summed on the destination columns (:func:`_column_links`). Messages are the distinct
    (source PE, destination PE) pairs."""
    top, left, H, W = box
    A, B = src.y_dim, src.x_dim
    trans = dst.y_dim == B
    unit = itemsize * math.prod(s for d, s in enumerate(src.shape) if d not in (A, B))
    _, (sa, oa), la = _merged_runs([src.y_of, dst.x_of if trans else dst.y_of], src.shape[A])
    _, (sb, ob), lb = _merged_runs([src.x_of, dst.y_of if trans else dst.x_of], src.shape[B])
    la = la * unit  # bytes of each key a's elements, for one element of b (and every load in bytes)
    ub, jb = np.unique(sb, return_inverse=True)
    uy, ya = np.unique(sa, return_inverse=True)
    J, Y = ub.size, uy.size
    col = src.pe_cols[uy[0], ub] + src.region.col0 - left  # (J,) the PE column of column block j
    rs = src.region.row0 - top
    rows_yj = src.pe_rows[np.ix_(uy, ub)] + rs  # (Y, J) PE row of row block y in column block j
    rows = rows_yj.T  # (J, Y)
    P = rows[:, ya]  # (J, A) source row of key a in column block j
    ly, lb_j = np.bincount(ya, la), np.bincount(jb, lb, J)
    inject = np.bincount((rows_yj * W + col).ravel(), (ly[:, None] * lb_j).ravel(), H * W)
    r0, c0 = dst.region.row0 - top, dst.region.col0 - left
    if not trans:  # a keeps its dims' roles: destination row from a, column from b
        dr, dc = oa + r0, ob + c0
        eject = np.outer(np.bincount(dr, la, H), np.bincount(dc, lb, W))
        # what stays: column block j on its destination column and key a on its destination row
        on_col = col[jb] == dc
        js = np.flatnonzero(np.bincount(jb, on_col, J))
        on_row = P[js] == dr
        stay_w = np.bincount(jb, lb * on_col, J)[js, None] * la * on_row
        stay = np.bincount((dr * W + col[js, None]).ravel(), stay_w.ravel(), H * W)
        stay_msgs = int((on_row.sum(axis=1) * np.bincount(jb, on_col, J)[js]).sum())
        # row links: a source row carries, for every column block j, its row block's share
        # of j's keys b. Most row blocks are alike (t0 elements): one profile for every
        # source row, plus each PE's difference from it (other sizes, no block)
        held = np.zeros((J, src.region.rows), np.int64)
        held[np.arange(J)[:, None], rows - rs] = ly
        sizes, count = np.unique(ly, return_counts=True)
        t0 = int(sizes[count.argmax()])  # the usual row block's bytes
        ej, er = np.nonzero(held != t0)
        e, b = _expand(ej, jb, J)
        east, west = _line_loads(H, W, er[e] + rs, col[jb[b]], dc[b], (held[ej, er] - t0)[e] * lb[b])
        common = _line_loads(1, W, 0, col[jb], dc, lb)
        east[rs: rs + src.region.rows] += t0 * common[0]
        west[rs: rs + src.region.rows] += t0 * common[1]
        # column links: each column block's line (its keys a from their rows to dr), summed
        # on the columns its keys b go to
        exc = (er[e] + rs, dc[b], (held[ej, er] - t0)[e] * lb[b])
        south, north = _column_links(H, W, _line_c_max(H, P, dr, la), t0, rs, src.region.rows, exc, jb, lb, dc, dr, la)
        hmax = np.zeros(J, np.int64)
        np.maximum.at(hmax, jb, np.abs(col[jb] - dc))
        # the farthest key a of row block y from its row: one of the extremes of its dr
        d_lo, d_hi = _extremes(ya, dr, Y)
        max_hops = int((np.maximum(rows - d_lo, d_hi - rows).max(axis=1) + hmax).max())
    else:  # transposed: destination row from b, column from a
        dc, dr = oa + c0, ob + r0
        eject = np.outer(np.bincount(dr, lb, H), np.bincount(dc, la, W))
        per_jr = np.bincount(jb * H + dr, lb, J * H)  # elements of column block j bound for row r
        n_jr = np.bincount(jb * H + dr, None, J * H)  # keys b of them
        group = np.full(W, -1)
        group[col] = np.arange(J)
        ka = np.flatnonzero(group[dc] >= 0)  # keys a whose destination column is a source column
        ja = group[dc[ka]]
        rr = P[ja, ka]
        stay_w = la[ka] * per_jr[ja * H + rr]
        stay = np.bincount(rr * W + dc[ka], stay_w, H * W)
        stay_msgs = int(n_jr[ja * H + rr].sum())
        east, west = _line_loads(H, W, P, col[:, None], dc, lb_j[:, None] * la)
        # column links: row block y's line, from row rows[j, y] of every column block j to the
        # destination rows of j's keys b, summed on the columns of y's keys a. What a line
        # holds on a row: the column blocks that put y there (each t0, the usual, but a few)
        nz = np.flatnonzero(per_jr)
        zj, zr = np.divmod(nz, H)
        held = np.bincount((np.arange(Y)[:, None] * src.region.rows + rows_yj - rs).ravel(),
                           np.tile(lb_j, Y), Y * src.region.rows).astype(np.int64).reshape(Y, -1)
        sizes, count = np.unique(lb_j, return_counts=True)
        t0 = int(sizes[count.argmax()])
        ey, er = np.nonzero(held != t0)
        e, a = _expand(ey, ya, Y)
        exc = (er[e] + rs, dc[a], (held[ey, er] - t0)[e] * la[a])
        c_max = _line_c_max(H, rows_yj[:, zj], zr, per_jr[nz])
        south, north = _column_links(H, W, c_max, t0, rs, src.region.rows, exc, ya, la, dc, zr, per_jr[nz])
        far, near = _extremes(zj, zr, J)
        far, near = np.maximum(far, 0), np.minimum(near, H)
        # the farthest key a of row block y from column col[j]: one of the extremes of its dc
        c_lo, c_hi = _extremes(ya, dc, Y)
        reach = np.maximum(np.abs(rows - far[:, None]), np.abs(rows - near[:, None]))
        max_hops = int((reach + np.maximum(col[:, None] - c_lo, c_hi - col[:, None])).max())
    stay = stay.astype(np.int64)  # integer weights: the float sums are exact
    inject = inject.astype(np.int64) - stay
    eject = eject.astype(np.int64).ravel() - stay
    live = la.size * lb.size - stay_msgs
    return MoveTraffic(
        origin=(top, left), inject=inject.reshape(H, W), eject=eject.reshape(H, W), east=east, west=west,
        south=south, north=north, max_hops=max_hops if live else 0,
        bytes_moved=int(la.sum()) * int(lb.sum()) - int(stay.sum()), messages=live,
    )


# ---------------------------------------------------------------------- ring-skewed sources


@dataclass(eq=False)
class _Ring:
    """A block table that rotates the blocks along a ring of ``n`` PEs (a MeshGEMM operand
    pre-skewed on an ``n`` x ``n`` region, along the interleaved or the plain ring).

    ``order`` lists the rows in ring order and ``pos`` is its inverse (a block, a row and a
    column each have a ring position: the id's own). PE (i, j) holds block
    ``held[i, j] = order[(pos[i] + pos[j]) % n]`` (every column a rotation of one pattern),
    so block y of column j is on row ``rows[y, j] = order[(pos[y] - pos[j]) % n]``, and on PE
    column j. Rows 0..k sit on the arc of ring positions ``lo[k] .. lo[k] + k`` (mod n), and
    so do columns 0..k: the blocks a column holds on rows <= k, the blocks a row holds on
    columns <= k and the columns that hold a block on rows <= k are arcs of the ring. A sum
    over any of them is two lookups in a prefix sum along the ring (:meth:`arc_sums`),
    whatever the keys: O(n) per line of the mesh instead of one term per (column, key)."""

    n: int
    order: np.ndarray
    pos: np.ndarray
    lo: np.ndarray
    rows: np.ndarray
    held: np.ndarray
    arcs: dict = dataclasses.field(default_factory=dict)  # sign -> each owner's arc starts, built once

    def arc_sums(self, x: np.ndarray, sign: int) -> np.ndarray:
        """(n, n - 1): for owner o and line k (0 .. n - 2), the sum of ``x[k, p]`` over the
        k + 1 ring positions p from ``pos[o] + lo[k]`` (``sign`` +1: the blocks of row o on
        columns <= k, or of column o on rows <= k, ``x`` by block position) or from
        ``pos[o] - lo[k] - k`` (-1: the columns that hold block o on rows <= k, ``x`` by
        column position). Every arc of line k has k + 1 positions: their sums from every
        start are one difference of a prefix sum of the ring taken twice round, and each
        owner reads its own."""
        n = self.n
        c2 = np.empty((n - 1, 2 * n), x.dtype)
        c2[:, 0] = 0
        np.cumsum(x, axis=1, out=c2[:, 1: n + 1])
        c2[:, n + 1:] = c2[:, n: n + 1] + c2[:, 1: n]
        # sums[k, s] = c2[k, s + k + 1] - c2[k, s]: the first term a view whose rows start one further each
        item = c2.itemsize
        ahead = np.lib.stride_tricks.as_strided(c2.ravel()[1:], (n - 1, n), ((2 * n + 1) * item, item))
        sums = ahead - c2[:, :n]
        if sign not in self.arcs:
            k = np.arange(n - 1)
            first = self.lo[: n - 1] if sign > 0 else -self.lo[: n - 1] - k
            start = np.add.outer(self.pos, first)
            start %= n
            start += k * n  # flat into sums, owner by owner
            self.arcs[sign] = start
        return sums.ravel().take(self.arcs[sign])

    def lines(self, x: np.ndarray, off: int, sign: int) -> np.ndarray:
        """(n, L): :meth:`arc_sums` on every line l of a box, ``x`` (L, n) by ring position,
        whose region starts at line ``off``: nothing before it (no row or column <= l - off),
        everything from its last line on, an arc of l - off + 1 in between."""
        n = self.n
        out = np.empty((n, x.shape[0]), x.dtype)
        out[:, :off] = 0
        out[:, off: off + n - 1] = self.arc_sums(x[off: off + n - 1], sign)
        out[:, off + n - 1:] = x[off + n - 1:].sum(axis=1)
        return out


_RINGS: dict = {}  # id(pe_rows) -> (weak references to both tables, their _Ring or None)


def _table_ring(rows: np.ndarray, cols: np.ndarray) -> _Ring | None:
    """The ring a block table rotates its blocks along (:class:`_Ring`), or None. A read-only
    table (every table of :meth:`Placement.of`) is examined once while it lives."""
    fixed = not (rows.flags.writeable or cols.flags.writeable)
    held = _RINGS.get(id(rows)) if fixed else None
    if held is not None and held[0]() is rows and held[1]() is cols:
        return held[2]
    ring = _find_ring(rows, cols)
    if fixed:
        if len(_RINGS) > 256:
            _RINGS.clear()
        _RINGS[id(rows)] = (weakref.ref(rows), weakref.ref(cols), ring)
    return ring


def _ring(p: Placement) -> _Ring | None:
    """The ring ``p``'s block table rotates its blocks along, if the table covers its region."""
    ring = _table_ring(p.pe_rows, p.pe_cols)
    return ring if ring is not None and p.region.shape == (ring.n, ring.n) else None


def _orbit(succ: np.ndarray) -> np.ndarray:
    """``out[u]``: where u steps of the permutation ``succ`` lead from 0 (by doubling: one
    pass per bit of n)."""
    n = succ.size
    u, out, step = np.arange(n), np.zeros(n, np.int64), succ
    for bit in range(max(n - 1, 1).bit_length()):
        out = np.where((u >> bit) & 1, step[out], out)
        step = step[step]
    return out


def _find_ring(rows: np.ndarray, cols: np.ndarray) -> _Ring | None:
    """Read the ring off the table and check the table against it, exactly.

    With column 0 holding every block on its own row (ring position 0 is row 0), a ring
    rotation puts block y of column ``rows[0, 1]`` (ring position -pos[1]) on the row after
    y's on the ring, if row 1 is next to row 0 (else rows 0..1 would be no arc: turning the
    ring round, it is at position 1): ``order`` is that step's orbit from row 0."""
    n = rows.shape[0]
    at = np.arange(n)
    if n < 2 or rows.shape != (n, n) or cols.shape != (n, n) or not (cols == at).all() or not (rows[:, 0] == at).all():
        return None
    order = _orbit(np.asarray(rows[:, rows[0, 1]], np.int64))
    pos = np.full(n, -1, np.int64)
    pos[order] = at
    if (pos < 0).any():
        return None
    # rows 0..k on one arc: cut the ring after the last row's position, each prefix is an interval
    signed = np.where(pos <= pos[n - 1], pos, pos - n)
    lo = np.minimum.accumulate(signed)
    if not (np.maximum.accumulate(signed) - lo == at).all():
        return None
    twice = np.concatenate((order, order))  # ring position -> row, for positions in [0, 2n)
    if not np.array_equal(rows, twice[np.add.outer(pos, n - pos)]):
        return None
    return _Ring(n, order, pos, lo % n, rows, twice[np.add.outer(pos, pos)])


@dataclass(frozen=True, eq=False)
class _RingMove:
    """A move off a ring-skewed source, in box coordinates (``trans``: the destination swaps
    the dims). Keys a (merged runs of the source's row dim): block ``sa``, ``la`` bytes,
    landing on row (same dims) or column (transposed) ``da``; keys b (its column dim):
    column block ``sb``, ``lb`` elements, landing on ``db``. The source region from box row
    and column (rs, cs), the destination's from (r0, c0), ``hd`` x ``wd`` PEs; ``dt`` an
    integer type that holds every load."""

    ring: _Ring
    trans: bool
    sa: np.ndarray
    la: np.ndarray
    da: np.ndarray
    sb: np.ndarray
    lb: np.ndarray
    db: np.ndarray
    rs: int
    cs: int
    r0: int
    c0: int
    hd: int
    wd: int
    H: int
    W: int
    dt: type


_FAR = 1 << 24  # farther than any path on a wafer (and three of it fit 32 bits): "none" in an unused block's extremes


def _cumulative(pos: np.ndarray, line: np.ndarray, w: np.ndarray, n: int, L: int, dt) -> np.ndarray:
    """(L, n): by ring position, the ``w`` of the keys at ``pos`` whose ``line`` is <= each
    line (summed along rows of an (n, L) array, contiguous, then turned round)."""
    out = np.zeros((n, L), dt)
    np.add.at(out.ravel(), pos * L + line, w.astype(dt))
    np.cumsum(out, axis=1, out=out)
    return np.ascontiguousarray(out.T)


def _farthest(bound: np.ndarray, exact) -> int:
    """The largest of per-column maxima, from an upper bound of each and ``exact(columns)``
    (their maxima, for an array of columns): the columns are read best bound first, in
    batches that double, until no bound left is above the best found."""
    order = np.argsort(-bound, kind="stable")
    best, at, step = int(exact(order[:1])[0]), 1, 8
    while at < order.size and bound[order[at]] > best:
        best = max(best, int(exact(order[at: at + step]).max()))
        at, step = at + step, 2 * step
    return best


def _usual(v: np.ndarray) -> int:
    """The most frequent value of ``v`` (a block's bytes: the others are the exceptions)."""
    values, count = np.unique(v, return_counts=True)
    return int(values[count.argmax()])


def _traffic_ring(src, dst, itemsize, box, ring: _Ring) -> MoveTraffic:
    """A source skewed along a ring (:class:`_Ring`): the flows and loads of
    :func:`_traffic_column_table`, each sum over the blocks of a line taken as an arc, and
    each load kept to the rectangle it can touch (:class:`_Window`).

    PE (i, j) sends the keys b of column block j, each with the keys a of the block it
    holds. Same dims (:func:`_ring_same`): the row links carry, per row, the usual block's
    bytes times one profile of every column's keys b, plus the rows whose block differs; a
    column block's line below row r carries what it holds on rows <= r (an arc) and is bound
    below r. Transposed (:func:`_ring_transposed`): a row's link at column c carries the
    blocks of its columns <= c (an arc) bound past c, and a block's line the column blocks
    that hold it on rows <= r (an arc) with what they send below r."""
    top, left, H, W = box
    trans = dst.y_dim == src.x_dim
    unit = itemsize * math.prod(s for d, s in enumerate(src.shape) if d not in (src.y_dim, src.x_dim))
    _, (sa, oa), la = _merged_runs([src.y_of, dst.x_of if trans else dst.y_of], src.shape[src.y_dim])
    _, (sb, ob), lb = _merged_runs([src.x_of, dst.y_of if trans else dst.x_of], src.shape[src.x_dim])
    la = la * unit
    total = int(la.sum()) * int(lb.sum())
    r0, c0 = dst.region.row0 - top, dst.region.col0 - left
    m = _RingMove(ring, trans, sa, la, oa + (c0 if trans else r0), sb, lb, ob + (r0 if trans else c0),
                  src.region.row0 - top, src.region.col0 - left, r0, c0, dst.region.rows, dst.region.cols, H, W,
                  np.int32 if 4 * total < 2 ** 31 else np.int64)  # (a load and a few partial sums of it fit)
    ly, lbj = np.bincount(sa, la, ring.n).astype(m.dt), np.bincount(sb, lb, ring.n).astype(m.dt)
    if trans:
        stay, stay_msgs, links, max_hops = _ring_transposed(m, ly, lbj)
    else:
        stay, stay_msgs, links, max_hops = _ring_same(m, ly)
    live = la.size * lb.size - stay_msgs
    return MoveTraffic(origin=(top, left), **_ring_ramps(m, ly, lbj, stay, total), **links,
                       max_hops=max_hops if live else 0, bytes_moved=total - int(stay[2].sum()), messages=live)


def _ring_ramps(m: _RingMove, ly: np.ndarray, lbj: np.ndarray, stay: tuple, total: int) -> dict:
    """Injection and ejection, built only if read (or if a ramp might be the busiest, which
    it rarely is): PE (i, j) sends its block's bytes times its column block's elements, a
    destination PE receives its row's bytes times its column's, less what stays (``stay``:
    rows, columns, bytes); each sums to every byte but those that stay."""
    H, W, dt = m.H, m.W, m.dt
    r_in, c_in = (m.db, m.da) if m.trans else (m.da, m.db)  # the destination row and column of each key
    w_r, w_c = (m.lb, m.la) if m.trans else (m.la, m.lb)
    into_rows, into_cols = np.bincount(r_in - m.r0, w_r, m.hd), np.bincount(c_in - m.c0, w_c, m.wd)
    rows, cols, w = stay  # on PEs of both regions

    def build():
        inject = ly[m.ring.held] * lbj
        eject = np.outer(into_rows, into_cols).astype(dt)
        np.subtract.at(inject, (rows - m.rs, cols - m.cs), w)
        np.subtract.at(eject, (rows - m.r0, cols - m.c0), w)
        return _Window(inject, (m.rs, m.cs), (H, W)), _Window(eject, (m.r0, m.c0), (H, W))

    left = total - int(w.sum())
    bounds = int(ly.max()) * int(lbj.max()), int(into_rows.max(initial=0)) * int(into_cols.max(initial=0))
    inject, eject = _lazy_loads(build, (left, left), bounds)
    return dict(inject=inject, eject=eject)


def _ring_same(m: _RingMove, ly: np.ndarray):
    """The same dims at both ends: key a lands on row ``da``, key b on column ``db``.
    Returns (what stays: rows, columns, bytes; its messages; the link loads; the longest path)."""
    ring, rows, sa, sb, lb, dc = m.ring, m.ring.rows, m.sa, m.sb, m.lb, m.db
    # the blocks whose bytes differ from the usual t0, on their row of each key b's column:
    # all the row links and the column lines see of them besides t0 on every PE
    t0 = _usual(ly)
    ye = np.flatnonzero(ly != t0)
    ey, eb = np.repeat(ye, sb.size), np.tile(np.arange(sb.size), ye.size)
    exc = (rows[ey, sb[eb]], sb[eb] + m.cs, dc[eb], (ly[ey] - t0) * lb[eb])  # row, from and to columns, bytes
    east, west = _same_row_links(m, ly, t0, exc)
    # a column block's line below row r: its blocks on rows <= r (an arc of the ring), with
    # their keys a bound for rows <= r
    below = _cumulative(ring.pos[sa], m.da, m.la, ring.n, m.H, m.dt)
    south, north = _ring_column_links(m, ring.lines(below, m.rs, +1), t0, (exc[0] + m.rs, exc[2], exc[3]), sb, lb, dc,
                                      m.da, m.la)
    links = dict(east=east, west=west, south=south, north=north)
    return (*_same_stay(m), links, _same_longest(m))


def _same_stay(m: _RingMove):
    """(rows, columns and bytes of what stays, its messages): a key b on its own column
    with a key a on its own row."""
    sa, la, dr, sb, lb, dc, n = m.sa, m.la, m.da, m.sb, m.lb, m.db, m.ring.n
    on_col = sb + m.cs == dc
    js = np.flatnonzero(np.bincount(sb, on_col, n))
    jj, aa = np.nonzero(m.ring.rows[sa[None, :], js[:, None]] + m.rs == dr)
    stay = (dr[aa], js[jj] + m.cs, (np.bincount(sb, lb * on_col, n)[js[jj]] * la[aa]).astype(np.int64))
    return stay, int(np.bincount(sb, on_col, n)[js[jj]].sum())


def _same_row_links(m: _RingMove, ly: np.ndarray, t0: int, exc: tuple) -> tuple[_Lazy, ...]:
    """East and west (built only if needed): a row carries, for every column block, its
    block's bytes times the profile of the column's keys b, so t0 times one profile of them
    all plus the blocks that differ (``exc``). Every column holds every block once: each
    key b's hops carry all the a's, and no row carries more than the largest block times
    the profile of all."""
    n, rs, W, H, dt = m.ring.n, m.rs, m.W, m.H, m.dt
    common = _line_loads(1, W, 0, m.sb + m.cs, m.db, m.lb, dt)

    def build():
        east, west = _line_loads(n, W, *exc, dt)
        east += t0 * common[0]
        west += t0 * common[1]
        return _Window(east, (rs, 0), (H, W - 1)), _Window(west, (rs, 0), (H, W - 1))

    hops, bytes_a = (m.db - m.sb - m.cs) * m.lb, int(m.la.sum())
    totals = bytes_a * int(hops[hops > 0].sum()), -bytes_a * int(hops[hops < 0].sum())
    return _lazy_loads(build, totals, (int(ly.max()) * int(c.max(initial=0)) for c in common))


def _same_longest(m: _RingMove) -> int:
    """The longest path: a block's farthest key a from the row holding it, plus the column
    block's farthest key b (bounded per column by the farthest any block is from any row)."""
    ring, n, rs = m.ring, m.ring.n, m.rs
    d_lo, d_hi = (np.clip(e, -_FAR, _FAR).astype(np.int32) for e in _extremes(m.sa, m.da, n))
    h_max = np.full(n, -_FAR, np.int32)
    np.maximum.at(h_max, m.sb, np.abs(m.sb + m.cs - m.db).astype(np.int32))
    i = np.arange(rs, rs + n, dtype=np.int32)[:, None]
    far = max(int((rs + n - 1 - d_lo).max()), int((d_hi - rs).max()))

    def reach(js):  # every row of columns js
        held = ring.held[:, js]
        return (np.maximum(i - d_lo[held], d_hi[held] - i) + h_max[js]).max(axis=0)

    return _farthest(far + h_max, reach)


def _ring_transposed(m: _RingMove, ly: np.ndarray, lbj: np.ndarray):
    """The dims swap: key a lands on column ``da``, key b on row ``db``. Returns (what
    stays: rows, columns, bytes; its messages; the link loads; the longest path)."""
    ring, sa, la, dc = m.ring, m.sa, m.la, m.da
    # the column blocks whose elements differ from the usual t0, each holding every key a's
    # block on one row: all the row links and the block lines see of them besides t0
    t0 = _usual(lbj)
    je = np.flatnonzero(lbj != t0)
    ej, ea = np.repeat(je, sa.size), np.tile(np.arange(sa.size), je.size)
    exc = (ring.rows[sa[ea], ej], ej + m.cs, dc[ea], (lbj[ej] - t0) * la[ea])  # row, from and to columns, bytes
    east, west = _transposed_row_links(m, ly, lbj, t0, exc)
    # a block's line below row r: the column blocks holding it on rows <= r (an arc), with
    # their keys b bound for rows <= r
    below = _cumulative(ring.pos[m.sb], m.db, m.lb, ring.n, m.H, m.dt)
    south, north = _ring_column_links(m, ring.lines(below, m.rs, -1), t0, (exc[0] + m.rs, exc[2], exc[3]), sa, la, dc,
                                      m.db, m.lb)
    links = dict(east=east, west=west, south=south, north=north)
    return (*_transposed_stay(m), links, _transposed_longest(m, lbj))


def _transposed_stay(m: _RingMove):
    """(rows, columns and bytes of what stays, its messages): a key a bound for a source
    column, from the PE of that column holding its block, with the keys b of that column
    bound for that PE's row."""
    sa, la, dc, sb, lb, dr, n, H = m.sa, m.la, m.da, m.sb, m.lb, m.db, m.ring.n, m.H
    ka = np.flatnonzero((dc >= m.cs) & (dc < m.cs + n))
    ja = dc[ka] - m.cs
    rr = m.ring.rows[sa[ka], ja] + m.rs
    pairs, where = np.unique(sb * H + dr, return_inverse=True)  # (column block, row) of the keys b
    at = np.minimum(np.searchsorted(pairs, ja * H + rr), pairs.size - 1)
    hit = pairs[at] == ja * H + rr
    at, ka = at[hit], ka[hit]
    stay = (rr[hit], dc[ka], (la[ka] * np.bincount(where, lb)[at]).astype(np.int64))
    return stay, int(np.bincount(where)[at].sum())


def _transposed_row_links(m: _RingMove, ly, lbj, t0: int, exc: tuple) -> tuple[_Lazy, ...]:
    """East and west (built only if needed): row i's link at column c carries t0 times the
    bytes bound past c of the blocks on its columns <= c (an arc of the ring), westward
    those bound for c or before of its columns past c, plus the column blocks that differ
    (``exc``)."""
    ring, n, cs, W, H, dt = m.ring, m.ring.n, m.cs, m.W, m.H, m.dt

    def build():
        east, west = _line_loads(n, W, *exc, dt)
        on_pe = ly[ring.held]  # (n, n): the bytes of a's on each PE, for one element of b
        upto = _cumulative(ring.pos[m.sa], m.da, m.la, n, W, dt)  # by block position: bytes bound for columns <= c
        arc = ring.lines(ly[ring.order] - upto[: W - 1], cs, +1)  # (n, W - 1): of row i's columns <= c
        arc *= t0
        east += arc
        west += arc
        west += t0 * upto[: W - 1].sum(axis=1)  # of every column
        west[:, cs: cs + n - 1] -= t0 * np.cumsum(on_pe, axis=1)[:, : n - 1]  # less those of columns <= c
        west[:, cs + n - 1:] -= t0 * on_pe.sum(axis=1, keepdims=True)
        return _Window(east, (m.rs, 0), (H, W - 1)), _Window(west, (m.rs, 0), (H, W - 1))

    return _lazy_loads(build, *_transposed_row_figures(m, ly, lbj))


def _transposed_longest(m: _RingMove, lbj: np.ndarray) -> int:
    """The longest path: a column block's farthest key b from the PE's row, plus the block's
    farthest key a from the PE's column (bounded per column by the region's end rows and
    the farthest any key a lands)."""
    ring, n, rs, cs = m.ring, m.ring.n, m.rs, m.cs
    used = lbj > 0
    r_lo, r_hi = (np.where(used, e, f).astype(np.int32) for e, f in zip(_extremes(m.sb, m.db, n), (_FAR, -_FAR)))
    c_lo, c_hi = (np.clip(e, -_FAR, _FAR).astype(np.int32) for e in _extremes(m.sa, m.da, n))
    i, j = np.arange(rs, rs + n, dtype=np.int32)[:, None], np.arange(cs, cs + n, dtype=np.int32)
    bound = np.maximum(rs + n - 1 - r_lo, r_hi - rs) + np.maximum(j - c_lo.min(), c_hi.max() - j)

    def reach(js):  # every row of columns js
        held = ring.held[:, js]
        return (np.maximum(i - r_lo[js], r_hi[js] - i) + np.maximum(j[js] - c_lo[held], c_hi[held] - j[js])).max(axis=0)

    return _farthest(bound, reach)


def _transposed_row_figures(m: _RingMove, ly: np.ndarray, lbj: np.ndarray):
    """The transposed move's row links without them: (their exact sums east and west, a cap
    on each one's busiest link). Column block j (on column j + cs) sends every key a to its
    column: the hops east from x are sum(bytes * (column - x)) over the keys past x (and
    west alike), from the keys' bytes per column; a link at column c carries, east, at
    most the column blocks <= c each with one block's bytes at most, and at most the
    busiest column block with every key bound past c (west alike)."""
    la, dc, cs, W, n = m.la, m.da, m.cs, m.W, m.ring.n
    per = np.bincount(dc, la, W).astype(np.int64)  # a's bytes by column
    moment = np.bincount(dc, la * dc, W).astype(np.int64)
    x = np.arange(cs, cs + n)  # each column block's column
    before, moment_before = np.cumsum(per) - per, np.cumsum(moment) - moment  # of the columns < x
    past, moment_past = per.sum() - before[x] - per[x], moment.sum() - moment_before[x] - moment[x]
    totals = int((lbj * (moment_past - x * past)).sum()), int((lbj * (x * before[x] - moment_before[x])).sum())
    sent = np.zeros(W - 1, np.int64)  # elements of the column blocks on columns <= c
    k = np.clip(np.arange(W - 1) - cs, -1, n - 1)
    sent[k >= 0] = np.cumsum(lbj)[k[k >= 0]]
    beyond = per.sum() - np.cumsum(per)[: W - 1]  # a's bytes bound past column c
    cap_east = np.minimum(sent * int(ly.max()), int(lbj.max()) * beyond)
    cap_west = np.minimum((lbj.sum() - sent) * int(ly.max()), int(lbj.max()) * (per.sum() - beyond))
    return totals, (int(cap_east.max(initial=0)), int(cap_west.max(initial=0)))


def _ring_column_links(m: _RingMove, c_max: np.ndarray, t0: int, exc: tuple, key: np.ndarray, key_w: np.ndarray,
                       key_col: np.ndarray, to: np.ndarray, to_w: np.ndarray):
    """(south, north) of :func:`_column_links`, on the destination's columns alone (no
    column link elsewhere carries anything), as windows."""
    H, c0, wd, dt = m.H, m.c0, m.wd, m.dt
    col = key_col - c0
    both = _by_column(c_max[:, : H - 1], key, key_w.astype(dt), col, wd)
    per_col = np.bincount(col, key_w, wd).astype(dt)
    rows, cols, w = exc
    # (wd, H): the prefix sums down each column run along contiguous memory
    held_c = np.bincount((cols - c0) * H + rows, w, wd * H).astype(dt).reshape(wd, H)
    held_c[:, m.rs: m.rs + m.ring.n] += t0 * per_col[:, None]
    np.cumsum(held_c, axis=1, out=held_c)
    c_to = np.cumsum(np.bincount(to, to_w, H)).astype(dt)
    shape = (H - 1, m.W)
    return (_Window((held_c[:, : H - 1] - both).T, (0, c0), shape),
            _Window((np.outer(per_col, c_to[: H - 1]) - both).T, (0, c0), shape))


def move_traffic(src: Placement, dst: Placement, itemsize: int) -> MoveTraffic:
    """Every PE's and link's bytes when the tensor on ``src`` is re-placed as ``dst``."""
    if src.shape != dst.shape:
        raise MeshError(f"move: source shape {src.shape} differs from destination shape {dst.shape}")
    if src.region.wafer is not dst.region.wafer and src.region.wafer != dst.region.wafer:
        raise MeshError("move: cannot move a tensor between different wafers")
    if dst.partial is not None:
        raise MeshError("move: a destination cannot be partial")
    box = _box(src, dst)
    if math.prod(src.shape) == 0:  # nothing to send
        top, left, H, W = box
        z = np.zeros
        return MoveTraffic((top, left), z((H, W), np.int64), z((H, W), np.int64), z((H, W - 1), np.int64),
                           z((H, W - 1), np.int64), z((H - 1, W), np.int64), z((H - 1, W), np.int64), 0, 0, 0)
    if _separable(src, dst):
        return _traffic_separable(src, dst, itemsize, box)
    if _transposed(src, dst):
        return _traffic_transposed(src, dst, itemsize, box)
    if _column_table(src, dst):
        ring = _ring(src)
        if ring is not None:
            return _traffic_ring(src, dst, itemsize, box, ring)
        return _traffic_column_table(src, dst, itemsize, box)
    return _traffic_cells(src, dst, itemsize, box)


@dataclass(frozen=True)
class MoveCost:
    """What a move charges, from its :class:`MoveTraffic`."""

    busiest_bytes: int
    max_hops: int
    bytes_moved: int
    hop_bytes: int
    messages: int
    read_bytes: int
    write_bytes: int

    @classmethod
    def of(cls, tr: MoveTraffic) -> "MoveCost":
        return cls(tr.busiest_bytes, tr.max_hops, tr.bytes_moved, tr.hop_bytes, tr.messages,
                   tr.total("inject"), tr.total("eject"))


    def scaled(self, k: int) -> "MoveCost":
        """The cost of the same move with every element ``k`` times as large: the loads are
        sums of element bytes, so each byte figure (and the busiest load) scales by k."""
        return MoveCost(self.busiest_bytes * k, self.max_hops, self.bytes_moved * k, self.hop_bytes * k,
                        self.messages, self.read_bytes * k, self.write_bytes * k)


#: the same moves recur (every layer, every decode step, the band's runs, every wafer of a
#: cluster): their costs per element byte, by the placements' geometry
_COSTS: OrderedDict = OrderedDict()
_COSTS_KEPT = 2048


_DIGESTS: dict = {}  # id(array) -> (weak reference, digest): a block table is shared by many moves


def _digest(a: np.ndarray):
    """The array's shape and a 128-bit digest of its values (block tables are hashed once
    while they live: every placement of a stage's weights shares its table)."""
    held = _DIGESTS.get(id(a))
    if held is not None and held[0]() is a:
        return held[1]
    d = (a.shape, hashlib.blake2b(np.ascontiguousarray(a).data, digest_size=16).digest())
    if a.size > 4096:
        if len(_DIGESTS) > 4096:
            _DIGESTS.clear()
        _DIGESTS[id(a)] = (weakref.ref(a), d)
    return d


_RUNS: dict = {}  # id(read-only map) -> (weak reference, its runs): a stage's maps recur in many moves


def _runs_key(a: np.ndarray) -> tuple:
    """A coordinate map, exactly, by its runs (where its value changes, and the values):
    a blocked or permuted map has a few runs per PE line, however long it is. A read-only
    map that owns its values is read once while it lives."""
    fixed = not a.flags.writeable and a.flags.owndata
    if fixed:
        held = _RUNS.get(id(a))
        if held is not None and held[0]() is a:
            return held[1]
    edge = np.flatnonzero(a[1:] != a[:-1]) + 1
    first = a[:1].astype(np.int32).tobytes()
    key = a.size, edge.astype(np.int32).tobytes(), first + a[edge].astype(np.int32).tobytes()
    if fixed:
        if len(_RUNS) > 4096:
            _RUNS.clear()
        _RUNS[id(a)] = (weakref.ref(a), key)
    return key


def _key(p: Placement, spread: set) -> tuple:
    """What a move's cost per element byte depends on: the region's place and size, the
    sizes of the spread dims, their maps (by runs) and tables (by digest, or by the ring
    order that makes them)."""
    r = p.region
    ring = None if p.pe_rows is None else _table_ring(p.pe_rows, p.pe_cols)
    tables = (None, None) if p.pe_rows is None else (("ring", ring.order.tobytes()), None) if ring is not None else (
        _digest(p.pe_rows), _digest(p.pe_cols))  # a ring's table is its ring order, exactly
    arrays = tuple(None if a is None else _runs_key(a) for a in (p.y_of, p.x_of)) + tables
    shape = tuple(s if d in spread else 1 for d, s in enumerate(p.shape))
    return (r.row0, r.col0, r.rows, r.cols, shape, p.y_dim, p.x_dim, p.partial, arrays)


def _unit(p: Placement, spread: set) -> Placement:
    """``p`` with every dim that no axis spreads cut to one element (its cost per byte)."""
    shape = tuple(s if d in spread else 1 for d, s in enumerate(p.shape))
    return p if shape == p.shape else dataclasses.replace(p, shape=shape)


def move_cost(src: Placement, dst: Placement, itemsize: int) -> MoveCost:
    """:class:`MoveCost` of :func:`move_traffic`. A dim spread over no axis at either end
    (e.g. the layers of a stacked move) only multiplies every element's bytes, so the cost
    is priced per element byte of the other dims and scaled: moves that differ only there
    (or in itemsize) share one pricing."""
    if src.region.wafer is not dst.region.wafer and src.region.wafer != dst.region.wafer:
        raise MeshError("move: cannot move a tensor between different wafers")
    spread = {d for d in (src.y_dim, src.x_dim, dst.y_dim, dst.x_dim) if d is not None}
    scale = math.prod(s for d, s in enumerate(src.shape) if d not in spread) * itemsize
    if src.shape != dst.shape or scale <= 0 or scale != int(scale):  # refused, nothing sent, or not whole bytes
        return MoveCost.of(move_traffic(src, dst, itemsize))
    key = (_key(src, spread), _key(dst, spread))
    cost = _COSTS.get(key)
    if cost is None:
        cost = _COSTS[key] = MoveCost.of(move_traffic(_unit(src, spread), _unit(dst, spread), 1))
        if len(_COSTS) > _COSTS_KEPT:
            _COSTS.popitem(last=False)
    else:
        _COSTS.move_to_end(key)
    return cost.scaled(int(scale))


def move_cycles(wafer, cost: MoveCost, extra_hops: int = 0) -> float:
    """The move's time: its busiest ramp or link streams behind the longest path's head
    (``extra_hops`` more on a wafer with defective PEs), after the collective's fixed set-up."""
    if cost.messages == 0:
        return 0.0
    return message_cycles(wafer, cost.busiest_bytes, cost.max_hops + extra_hops) + wafer.collective_overhead_cycles


def charge_move(ledger, src: Placement, dst: Placement, itemsize: float, name: str = "move") -> float:
    """Charge re-placing a tensor from ``src`` to ``dst`` (elements of ``itemsize`` bytes) on
    ``ledger``: the cycles of :func:`move_cycles`, a task switch, and the bytes moved,
    hop-bytes, messages and SRAM bytes read (injected) and written (ejected). A move in
    which no element leaves its PE charges nothing. Returns the cycles.

    ``itemsize`` may be a fraction (a block-quantised weight: 17/16 bytes per int8 value
    with its share of the block scale): the loads, linear in it, are priced for the
    numerator and divided by the denominator. On a wafer with defective PEs the longest
    path pays the extra hops a path of its length pays in the box of both regions."""
    return _charge(ledger, _move_charge(ledger.wafer, src, dst, itemsize), name)


def _move_charge(w, src: Placement, dst: Placement, itemsize: float) -> tuple[float, dict] | None:
    """(cycles, counters) :func:`charge_move` charges on a ledger of wafer ``w`` (None: nothing)."""
    # whole bytes (the usual case) need no fraction
    frac = (itemsize, 1) if type(itemsize) is int else Fraction(itemsize).limit_denominator(1 << 12).as_integer_ratio()
    cost = move_cost(src, dst, frac[0])
    if cost.messages == 0:
        return None
    if frac[1] != 1:
        d = frac[1]
        cost = MoveCost(cost.busiest_bytes / d, cost.max_hops, cost.bytes_moved / d, cost.hop_bytes / d, cost.messages,
                        cost.read_bytes / d, cost.write_bytes / d)
    top, left, height, width = _box(src, dst)
    extra = box_extra(src.region.wafer, top, left, height, width, cost.max_hops)
    return move_cycles(w, cost, extra), dict(bytes_moved=cost.bytes_moved, hop_bytes=cost.hop_bytes,
                                             messages=cost.messages, sram_read_bytes=cost.read_bytes,
                                             sram_write_bytes=cost.write_bytes)


def price_move(wafer, src: Placement, dst: Placement, itemsize: float) -> tuple[float, dict] | None:
    """What :func:`charge_move` charges for this move on a ledger of ``wafer``: (cycles,
    counters), or None when no element leaves its PE. A caller meeting the same moves again
    (a request of a length already seen) keeps the prices and charges them with
    :func:`charge_priced`: the same events, in the same order, with the same values."""
    return _move_charge(wafer, src, dst, itemsize)


def charge_priced(ledger, priced: tuple[float, dict] | None, name: str = "move") -> float:
    """Charge a move priced by :func:`price_move`, as :func:`charge_move` would. Returns the cycles."""
    return _charge(ledger, priced, name)


def _charge(ledger, charge: tuple[float, dict] | None, name: str) -> float:
    if charge is None:
        return 0.0
    ledger.charge_task_switch()
    return ledger.charge(name, "comm", charge[0], **charge[1])


def plain_key(t) -> tuple | None:
    """Everything :meth:`Placement.of` reads of a tensor without a block map, on a perfect
    wafer: its region's place and size, shape, layout, tiles and partial axis (None: a
    block map, or defective PEs, whose links are the region's own)."""
    r = t.mesh.region
    if r.wafer.defective_pes or t.blocks is not None:
        return None
    return (r.row0, r.col0, r.rows, r.cols, t.shape, t.layout, t.tile_shape, t.partial and t.partial[0])


#: (ledger's wafer, both ends' plain keys, itemsize) -> (that wafer, the charge): a stage's
#: hidden states cross the same regions every step, and every option of a cluster search
_TENSOR_MOVES: dict = {}


def charge_tensor_move(ledger, t, out, itemsize: float, name: str = "move") -> float:
    """:func:`charge_move` from where tensor ``t`` is to where ``out`` is, the charge priced
    once per geometry (the same cycles and counters, charged the same way)."""
    a, b = plain_key(t), plain_key(out)
    if a is None or b is None:
        return charge_move(ledger, Placement.of(t), Placement.of(out), itemsize, name)
    w = ledger.wafer
    key = (id(w), a, b, itemsize)
    held = _TENSOR_MOVES.get(key)
    if held is None or held[0] is not w:
        if len(_TENSOR_MOVES) > 4096:
            _TENSOR_MOVES.clear()
        held = _TENSOR_MOVES[key] = (w, _move_charge(w, Placement.of(t), Placement.of(out), itemsize))
    return _charge(ledger, held[1], name)
