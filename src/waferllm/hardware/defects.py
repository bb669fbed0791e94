"""Defective PEs: where they are, and what a logical neighbour then costs.

A defect map is a set of dead PEs (router included) on the wafer's physical fabric: a
list (``defective_pes`` in a wafer file) or a rate with a seed (:func:`random_defects`,
deterministic). How the wafer copes is its ``defect_recovery``:

- ``avoid``: regions are placed only on squares without a defective PE (the PEs listed
  are in the usable rectangle). Nothing else changes.
- ``spare`` (the vendor's scheme): the fabric has ``spare_rows`` rows and ``spare_cols``
  PEs per row beyond the usable rectangle. In every physical row the hardware skips its
  defective PEs, so the row's logical PEs are its healthy ones in order; a row with more
  defects than spare PEs is retired and the logical rows are the kept physical rows in
  order. Programs see a perfect ``rows x cols`` rectangle; a logical neighbour across a
  remapped PE is farther away: along a row, one hop more for every skipped PE (the
  hardware bypasses it); along a column, one hop more for every retired row crossed, and
  the column's PEs no longer sit in one physical column: a path down it reaches the
  farthest of them, as many hops more as their physical columns spread.
- ``reroute`` (fault-aware placement in software, the hardware's remap off): the same
  fabric, spare columns included. Each region of the perfect wafer's tiling keeps its
  side and order but spans as many physical columns as its rows need to hold its side in
  healthy PEs (regions to its right move over, into the spare columns; one that no longer
  fits shrinks), and its logical PEs are each row's healthy PEs in order (so no logical
  PE is a defective one). A message along a row past a dead PE cannot cross its router:
  it detours through the neighbouring row, two hops more than the skipped PEs; each
  detour needs a route on the PEs it passes: where a primitive already uses every route a
  PE has but two, a detoured message is relayed in software there (one routing stage).
  Along a column, the region's PEs drift apart as with ``spare`` (no row is retired).

Every cost is read from per-axis maps of extra hops on the logical links of a region
(:class:`LinkMap`): the comm primitives ask for the worst extra a message of ``h`` hops
along an axis pays anywhere in the region (the slowest line sets the critical path), a
window maximum over the map computed once per region, axis and length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from waferllm.errors import HardwareError

#: routes a detour around a dead PE needs on the PEs it passes (one per direction)
DETOUR_ROUTES = 2
#: hops a detour adds beyond the dead PEs it skips (out of the row and back)
DETOUR_HOPS = 2
#: the highest defect rate a map is drawn for (beyond it no recovery scheme is meaningful)
MAX_DEFECT_RATE = 0.2


# ------------------------------------------------------------------ defect maps


def random_defects(rows: int, cols: int, rate: float, seed: int) -> frozenset:
    """Each PE of a ``rows x cols`` fabric defective with probability ``rate``, independently:
    the same map for the same (shape, rate, seed)."""
    rate = _check_rate(rate, "defect_rate")
    seed = _check_seed(seed)
    if rate == 0.0:
        return frozenset()
    dead = np.random.default_rng(seed).random((rows, cols)) < rate
    r, c = np.nonzero(dead)
    return frozenset(zip(r.tolist(), c.tolist()))


def _check_rate(rate, what: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)):
        raise HardwareError(f"{what} must be a number from 0 to {MAX_DEFECT_RATE}, got {rate!r}")
    rate = float(rate)
    if not (math.isfinite(rate) and 0.0 <= rate <= MAX_DEFECT_RATE):
        raise HardwareError(f"{what} must be a fraction of the PEs from 0 to {MAX_DEFECT_RATE} "
                            f"(0.001 = 0.1%), got {rate!r}")
    return rate


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2 ** 63:
        raise HardwareError(f"defect seed must be a whole number >= 0, got {seed!r}")
    return int(seed)


def with_defect_rate(wafer, rate: float, seed: int = 0, recovery: str | None = None, where: str = "defects"):
    """``wafer`` with defective PEs drawn at ``rate`` with ``seed`` on its physical fabric
    (see :attr:`WaferSpec.fabric_shape`) and the given ``recovery`` (default: the wafer's).
    The map replaces any the wafer had."""
    from waferllm.hardware.plmr import DEFECT_RECOVERY

    recovery = wafer.defect_recovery if recovery is None else recovery
    if recovery not in DEFECT_RECOVERY:
        raise HardwareError(f"{where}: recovery must be one of {', '.join(DEFECT_RECOVERY)}, got {recovery!r}")
    spec = wafer.replace(defect_recovery=recovery, defective_pes=[])
    fr, fc = spec.fabric_shape
    rate = _check_rate(rate, f"{where}: defect_rate")
    spec = spec.replace(defective_pes=sorted(random_defects(fr, fc, rate, seed)))
    if recovery == "spare":
        spare_remap(spec)  # refuse a map the spares cannot hide, now
    return spec


@lru_cache(maxsize=16)
def defect_mask(wafer) -> np.ndarray:
    """(fabric rows, fabric cols) bool: True on a defective PE."""
    fr, fc = wafer.fabric_shape
    mask = np.zeros((fr, fc), bool)
    if wafer.defective_pes:
        rc = np.array(sorted(wafer.defective_pes), np.int64).reshape(-1, 2)
        mask[rc[:, 0], rc[:, 1]] = True
    mask.setflags(write=False)
    return mask


def healthy_positions(mask: np.ndarray, width: int) -> np.ndarray:
    """(rows, width): the column of each row's first ``width`` healthy PEs, in order (every
    row of ``mask`` must have that many)."""
    order = np.argsort(mask, axis=1, kind="stable")  # healthy (False) first, in column order
    return order[:, :width]


# ------------------------------------------------------------------ link maps


def _window_sums(a: np.ndarray, h: int) -> np.ndarray:
    """(lines, n - h + 1): the sum of every window of ``h`` consecutive entries of each line."""
    cs = np.concatenate([np.zeros((a.shape[0], 1), np.int64), np.cumsum(a, axis=1, dtype=np.int64)], axis=1)
    return cs[:, h:] - cs[:, :-h]


def _window_ranges(a: np.ndarray, size: int) -> np.ndarray:
    """(lines, n - size + 1): max - min of every window of ``size`` consecutive entries of
    each line (doubling: O(n log size))."""
    n = a.shape[1]
    mx, mn, w = a, a, 1
    while 2 * w <= size:
        mx, mn = np.maximum(mx[:, :-w], mx[:, w:]), np.minimum(mn[:, :-w], mn[:, w:])
        w *= 2
    k, off = n - size + 1, size - w
    return np.maximum(mx[:, :k], mx[:, off: off + k]) - np.minimum(mn[:, :k], mn[:, off: off + k])


@dataclass(eq=False)
class LinkMap:
    """Extra hops on the logical links of a region.

    Along a row, ``x[r, c]`` is the extra of the link between logical PEs (r, c) and
    (r, c+1) (skipped PEs, plus a detour's hops), and a path's extra is the sum over the
    links it crosses. Along a column, ``y[r, c]`` counts the retired rows between (r, c)
    and (r+1, c); the logical PEs of a column also sit at different physical columns
    (``drift``, (rows, cols), None: aligned), and a message, or a multicast branching off a
    column trunk, reaches the farthest of them: a column path pays the retired rows it
    crosses plus the spread (max - min) of the drift of the PEs it covers. ``x_detours``
    marks the row links a message detours on (a software relay when routes run out)."""

    x: np.ndarray
    y: np.ndarray
    x_detours: np.ndarray
    drift: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def _window_max(self, axis: str, hops: int, what: str) -> int:
        key = (axis, int(hops), what)
        out = self._cache.get(key)
        if out is None:
            out = 0
            if axis == "x":
                a = self.x_detours if what == "detours" else self.x
                if a.shape[1] and hops > 0 and a.any():
                    out = int(_window_sums(a, min(int(hops), a.shape[1])).max())
            elif what == "extra" and hops > 0:
                rows = self.y.shape[0] + 1
                size = min(int(hops) + 1, rows)
                if size > 1 and (self.y.any() or self.drift is not None):
                    total = _window_sums(self.y.T, size - 1)
                    if self.drift is not None:
                        total = total + _window_ranges(self.drift.T, size)
                    out = int(total.max())
            self._cache[key] = out
        return out

    def extra(self, axis: str | None, hops: int) -> int:
        """The most extra hops a message of ``hops`` consecutive logical hops along ``axis``
        ("x": along a row, "y": along a column, None: either) pays anywhere in the region."""
        if axis is None:
            return max(self._window_max("x", hops, "extra"), self._window_max("y", hops, "extra"))
        return self._window_max(axis, hops, "extra")

    def detours(self, axis: str | None, hops: int) -> int:
        """The most detours such a message makes (only rows detour)."""
        return self._window_max("x", hops, "detours") if axis in (None, "x") else 0

    def mean(self, axis: str | None) -> float:
        """Mean extra hops per logical link along ``axis`` (for the fabric's energy)."""
        key = ("mean", axis)
        if key not in self._cache:
            x = float(self.x.mean()) if self.x.size else 0.0
            y = float(self.y.mean()) if self.y.size else 0.0
            if self.drift is not None and self.drift.shape[0] > 1:
                y += float(np.abs(np.diff(self.drift, axis=0)).mean())
            self._cache[key] = x if axis == "x" else y if axis == "y" else (x + y) / 2
        return self._cache[key]

    @property
    def perfect(self) -> bool:
        drift = self.drift is not None and bool((self.drift != self.drift[:1]).any())
        return not (self.x.any() or self.y.any() or drift)

    def sub(self, top: int, left: int, height: int, width: int) -> "LinkMap":
        """The map of a box of this one."""
        r, c = slice(top, top + height), slice(left, left + width)
        return LinkMap(self.x[r, left: left + max(width - 1, 0)], self.y[top: top + max(height - 1, 0), c],
                       self.x_detours[r, left: left + max(width - 1, 0)],
                       None if self.drift is None else self.drift[r, c])


@lru_cache(maxsize=8)
def spare_remap(wafer) -> tuple[np.ndarray, np.ndarray]:
    """Recovery ``spare``: the physical row of every logical row (rows,) and the physical
    column of every logical PE (rows, cols). Refuses a map the spares cannot hide."""
    mask = defect_mask(wafer)
    per_row = mask.sum(axis=1)
    kept = np.flatnonzero(per_row <= wafer.spare_cols)
    if kept.size < wafer.rows:
        worst = int(per_row.max())
        raise HardwareError(
            f"{wafer.name}: its {len(wafer.defective_pes):,} defective PEs leave {kept.size} of its "
            f"{mask.shape[0]} physical rows with at most {wafer.spare_cols} defective PEs (the spare PEs of a row; "
            f"the worst row has {worst}): fewer than the {wafer.rows} rows the hardware must present. Lower the "
            "defect rate, or give the wafer more spare_rows/spare_cols")
    rows = kept[: wafer.rows]
    return rows, healthy_positions(mask[rows], wafer.cols)


def _links_from_positions(row_of: np.ndarray, col_of: np.ndarray, detour: bool) -> LinkMap:
    """The link map of logical PEs at physical (row_of[r], col_of[r, c]).

    Along a row: the skipped PEs between two logical neighbours; with ``detour`` (software
    rerouting, no hardware bypass) every skip is a detour, ``DETOUR_HOPS`` more. Along a
    column: the retired rows between two logical neighbours, and each PE's physical column
    as the column's drift."""
    skipped = np.diff(col_of, axis=1) - 1
    passes = skipped > 0
    x = skipped + (DETOUR_HOPS * passes if detour else 0)
    y = np.broadcast_to((np.diff(row_of) - 1)[:, None], (len(row_of) - 1, col_of.shape[1]))
    return LinkMap(x.astype(np.int64), np.ascontiguousarray(y, np.int64),
                   passes if detour else np.zeros(passes.shape, bool), col_of.astype(np.int64))


@lru_cache(maxsize=8)
def wafer_links(wafer) -> LinkMap | None:
    """The link map of the whole usable rectangle (None: every logical link is one hop).

    ``spare``: from the hardware's remap. ``reroute``: on the physical mesh, a path along
    a row past a dead PE detours around it; between rows nothing is shifted. ``avoid``:
    None (regions hold no defective PE; paths between them are not detoured)."""
    if not wafer.defective_pes or wafer.defect_recovery == "avoid":
        return None
    if wafer.defect_recovery == "spare":
        rows, cols = spare_remap(wafer)
        return _links_from_positions(rows, cols, False)
    mask = defect_mask(wafer)
    # a link (r, c) -> (r, c+1) touching a dead PE is passed by a detour
    dead = mask[:, :-1] | mask[:, 1:]
    x = np.where(dead, DETOUR_HOPS, 0).astype(np.int64)
    return LinkMap(x, np.zeros((mask.shape[0] - 1, mask.shape[1]), np.int64), dead)


def region_links(region) -> LinkMap | None:
    """The link map of a region (None on a perfect one): the slice of the wafer's (``spare``)
    or the region's own software remap (``reroute``)."""
    w = region.wafer
    if not w.defective_pes or w.defect_recovery == "avoid":
        return None
    return _region_links(w, region.row0, region.col0, region.rows, region.cols, getattr(region, "span", 0) or region.cols)


@lru_cache(maxsize=256)
def _region_links(wafer, row0: int, col0: int, rows: int, cols: int, span: int) -> LinkMap | None:
    if wafer.defect_recovery == "spare":
        row_of, col_of = spare_remap(wafer)
        links = _links_from_positions(row_of[row0: row0 + rows], col_of[row0: row0 + rows, col0: col0 + cols], False)
    else:
        mask = defect_mask(wafer)[row0: row0 + rows, col0: col0 + span]
        if (span - mask.sum(axis=1) < cols).any():
            raise HardwareError(f"{wafer.name}: a {rows}x{cols} region spanning {span} columns at ({row0}, {col0}) "
                                "has a row with too few healthy PEs")
        links = _links_from_positions(np.arange(rows), healthy_positions(mask, cols), True)
    return None if links.perfect else links


def box_extra(wafer, top: int, left: int, height: int, width: int, hops: int) -> int:
    """The most extra hops a path of ``hops`` hops inside a box of the usable rectangle pays
    (a move between regions), from the wafer's link map."""
    links = wafer_links(wafer)
    if links is None or hops <= 0:
        return 0
    return _box_links(wafer, top, left, height, width).extra(None, hops)


@lru_cache(maxsize=64)
def _box_links(wafer, top, left, height, width) -> LinkMap:
    return wafer_links(wafer).sub(top, left, height, width)


# ------------------------------------------------------------------ fault-aware regions (reroute)


@lru_cache(maxsize=16)
def _healthy_tables(wafer) -> tuple[np.ndarray, np.ndarray]:
    """Of the usable rows over every physical column (the spare ones too), per row: healthy
    PEs before each column (rows, width + 1), and the column of its k-th healthy PE (rows,
    width + 1; past the last one: the row's length)."""
    mask = defect_mask(wafer)[: wafer.rows]
    before = np.zeros((mask.shape[0], mask.shape[1] + 1), np.int64)
    np.cumsum(~mask, axis=1, out=before[:, 1:])
    kth = np.full((mask.shape[0], mask.shape[1] + 1), mask.shape[1], np.int64)
    order = np.argsort(mask, axis=1, kind="stable")  # healthy first, in column order
    ok = np.arange(mask.shape[1])[None, :] < before[:, -1:]
    kth[:, :-1] = np.where(ok, order, mask.shape[1])
    before.setflags(write=False)
    kth.setflags(write=False)
    return before, kth


def reroute_span(wafer, row0: int, rows: int, col0: int, side: int) -> int | None:
    """Physical columns from ``col0`` a region of ``rows`` x ``side`` logical PEs needs so
    that each of its rows holds ``side`` healthy PEs (None: the wafer is too narrow)."""
    before, kth = _healthy_tables(wafer)
    width = before.shape[1] - 1
    if col0 >= width:
        return None
    lines = np.arange(row0, row0 + rows)
    last = kth[lines, np.minimum(before[lines, col0] + side - 1, width)]  # each row's side-th healthy PE
    end = int(last.max())
    return None if end >= width else end + 1 - col0


def reroute_holds(wafer, row0: int, rows: int, col0: int, cols: int, span: int) -> bool:
    """Whether every row of a region holds ``cols`` healthy PEs in its ``span`` columns from ``col0``."""
    before, _ = _healthy_tables(wafer)
    if col0 + span > before.shape[1] - 1:
        return False
    r = slice(row0, row0 + rows)
    return bool((before[r, col0 + span] - before[r, col0] >= cols).all())


def reroute_fit(wafer, squares, min_side: int) -> list[tuple[int, int, int, int]]:
    """Recovery ``reroute``: the perfect wafer's square regions ``squares`` ((row0, col0, side),
    in order) placed on the defective one, each spanning the columns its rows need to skip
    their defective PEs: (row0, col0, side, span). A square that would overlap one already
    placed moves right; one that no longer fits shrinks (never below ``min_side``, else it
    is dropped). No square grows, so the regions are never better than the perfect wafer's.
    (Remembered per defect map: the tuner and the prediction band plan the same tilings.)"""
    key = (wafer.rows, wafer.cols, wafer.defective_pes, tuple(squares), min_side)
    out = _FITS.get(key)
    if out is None:
        out = _FITS[key] = _reroute_fit(wafer, squares, min_side)
        if len(_FITS) > 256:
            _FITS.pop(next(iter(_FITS)))
    return list(out)


_FITS: dict = {}


def _reroute_fit(wafer, squares, min_side: int) -> tuple:
    width = wafer.fabric_shape[1]
    occupied = np.zeros((wafer.rows, width), bool)
    out = []
    for r0, c0, side in squares:
        s, col = side, c0
        while s >= min_side:
            span = reroute_span(wafer, r0, s, col, s)
            if span is None or col + span > width:
                s -= 1
                continue
            box = occupied[r0: r0 + s, col: col + span]
            if box.any():  # past the columns taken
                col += int(np.flatnonzero(box.any(axis=0)).max()) + 1
                continue
            occupied[r0: r0 + s, col: col + span] = True
            out.append((r0, col, s, span))
            break
    return tuple(out)
