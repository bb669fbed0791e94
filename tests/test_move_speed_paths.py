"""The fast move pricings load every ramp and link as the general paths do.

A source pre-skewed along a ring (a MeshGEMM operand: each column's blocks a rotation of
one pattern) is priced by :func:`move._traffic_ring` from arc sums over the ring; the same
move through the column-table path and through the per-cell path (one flow per cell, by
rectangles) must give the same arrays, hops, bytes and messages, whatever the maps, the
grids, the offsets and the wafer.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waferllm.hardware import get_wafer
from waferllm.hardware.defects import with_defect_rate
from waferllm.kernels.meshgemm import skew_blocks
from waferllm.mesh import move
from waferllm.mesh.move import LOADS, MoveCost, Placement, move_cost, move_traffic
from waferllm.mesh.region import Region

WAFER = get_wafer("wse2")


def _same(a, b):
    """The same traffic: the cost read before any load is built (sums and caps of the loads
    left unbuilt), then every array."""
    assert MoveCost.of(a) == MoveCost.of(b)
    for k in LOADS:
        np.testing.assert_array_equal(a.load(k), b.load(k), err_msg=k)
    assert (a.messages, a.bytes_moved, a.max_hops, a.origin) == (b.messages, b.bytes_moved, b.max_hops, b.origin)
    assert MoveCost.of(a) == MoveCost.of(b)


def _map(rng, n, parts, kind):
    """n indices over ``parts`` lines: blocked (the last block partial), or any."""
    if kind == "blocked":
        tile = -(-n // parts)
        return np.arange(n) // tile
    return rng.integers(0, parts, n)


def _skewed(region, shape, ring, rng, kind_a, kind_b, tables=None):
    """A [A, B, 2] tensor pre-skewed on a square region as MeshGEMM's B operand (block
    tables read-only, as :meth:`Placement.of` makes them)."""
    n = region.rows
    if tables is None:
        blocks = skew_blocks(n, ring, "B")
        tables = move._tables("B", n, n, blocks[0], blocks[1], False, False)
    return Placement(region, shape, y_dim=0, y_of=_map(rng, shape[0], n, kind_a), x_dim=1,
                     x_of=_map(rng, shape[1], n, kind_b), pe_rows=tables[0], pe_cols=tables[1])


def _check(src, dst, itemsize=2):
    assert move._column_table(src, dst)
    ring = move._ring(src)
    assert ring is not None
    box = move._box(src, dst)
    cells = move._traffic_cells(src, dst, itemsize, box)
    _same(move._traffic_ring(src, dst, itemsize, box, ring), move._traffic_column_table(src, dst, itemsize, box))
    _same(move._traffic_ring(src, dst, itemsize, box, ring), cells)
    _same(move_traffic(src, dst, itemsize), cells)  # the one move_traffic picks


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["interleave", "plain"]), st.booleans(),
       st.sampled_from(["blocked", "any"]), st.sampled_from(["blocked", "any"]))
def test_ring_path_equals_the_general_paths(seed, ring, transposed, kind_a, kind_b):
    """Square sources of 2..9 PEs, destinations of any shape anywhere around them
    (overlapping or not), maps blocked with a partial last block or any: the same traffic."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 10))
    src_reg = Region(WAFER, n, n, int(rng.integers(0, 6)), int(rng.integers(0, 6)))
    h, w = (int(x) for x in rng.integers(1, 10, 2))
    dst_reg = Region(WAFER, h, w, int(rng.integers(0, 10)), int(rng.integers(0, 10)))
    A, B = (int(x) for x in rng.integers(1, 3 * n + 2, 2))
    src = _skewed(src_reg, (A, B, 2), ring, rng, kind_a, kind_b)
    dims = dict(y_dim=1, y_of=_map(rng, B, h, kind_b), x_dim=0, x_of=_map(rng, A, w, kind_a)) if transposed else \
        dict(y_dim=0, y_of=_map(rng, A, h, kind_a), x_dim=1, x_of=_map(rng, B, w, kind_b))
    _check(src, Placement(dst_reg, (A, B, 2), **dims))


@pytest.mark.parametrize("ring", ["interleave", "plain"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("grids", [(24, 17, 15, 0, 5), (20, 24, 24, 7, 0), (31, 12, 40, 31, 2)])
def test_ring_path_on_larger_grids(ring, transposed, grids):
    """Grids of a few tens of PEs, permuted maps with several runs per PE and partial blocks,
    the destination beside, below or inside the source."""
    n, h, w, r0, c0 = grids
    rng = np.random.default_rng(n)
    A, B = 7 * n + 3, 5 * n - 1
    src = _skewed(Region(WAFER, n, n, 3, 4), (A, B, 1), ring, rng, "blocked", "blocked")
    src = Placement(src.region, src.shape, 0, src.y_of[rng.permutation(A)], 1, src.x_of[rng.permutation(B)],
                    src.pe_rows, src.pe_cols)
    dst_reg = Region(WAFER, h, w, r0, c0)
    dims = dict(y_dim=1, y_of=_map(rng, B, h, "blocked"), x_dim=0, x_of=_map(rng, A, w, "any")) if transposed else \
        dict(y_dim=0, y_of=_map(rng, A, h, "any"), x_dim=1, x_of=_map(rng, B, w, "blocked"))
    _check(src, Placement(dst_reg, (A, B, 1), **dims), itemsize=3)


def test_ring_path_on_a_defective_wafer():
    """Regions of a wafer with defective PEs (its moves are priced on the same grid: the
    defects show in the detour hops :func:`charge_move` adds)."""
    wafer = with_defect_rate(WAFER, 0.001, seed=3, recovery="spare")
    rng = np.random.default_rng(1)
    for transposed in (False, True):
        src = _skewed(Region(wafer, 9, 9, 2, 1), (30, 25, 2), "interleave", rng, "blocked", "any")
        dst_reg = Region(wafer, 6, 11, 4, 6)
        dims = dict(y_dim=1, y_of=_map(rng, 25, 6, "any"), x_dim=0, x_of=_map(rng, 30, 11, "blocked")) if transposed \
            else dict(y_dim=0, y_of=_map(rng, 30, 6, "any"), x_dim=1, x_of=_map(rng, 25, 11, "blocked"))
        _check(src, Placement(dst_reg, (30, 25, 2), **dims))


def test_ring_path_with_loads_past_32_bits():
    """Elements large enough that a link's bytes need 64 bits: the same as the general path."""
    rng = np.random.default_rng(5)
    for transposed in (False, True):
        src = _skewed(Region(WAFER, 6, 6, 0, 0), (20, 17, 1), "interleave", rng, "blocked", "blocked")
        dims = dict(y_dim=1, y_of=_map(rng, 17, 4, "any"), x_dim=0, x_of=_map(rng, 20, 5, "any")) if transposed \
            else dict(y_dim=0, y_of=_map(rng, 20, 4, "any"), x_dim=1, x_of=_map(rng, 17, 5, "any"))
        _check(src, Placement(Region(WAFER, 4, 5, 3, 7), (20, 17, 1), **dims), itemsize=1 << 26)


def test_only_ring_rotations_take_the_ring_path():
    """Both MeshGEMM skews (and a mirrored ring) are read as rings, exactly; a table whose
    columns are not one rotation, or whose prefixes of rows leave the ring's arcs, is not."""
    n = 8
    reg = Region(WAFER, n, n)
    for ring in ("interleave", "plain"):
        blocks = skew_blocks(n, ring, "B")
        rows, cols = move._tables("B", n, n, blocks[0], blocks[1], False, False)
        found = move._find_ring(rows, cols)
        assert found is not None
        assert np.array_equal(found.rows[found.held, np.arange(n)], np.broadcast_to(np.arange(n)[:, None], (n, n)))
    at = np.arange(n)
    cols = np.broadcast_to(at, (n, n))
    # a column permuted off its rotation
    rows = ((at[:, None] - at) % n).copy()
    rows[[1, 2], 3] = rows[[2, 1], 3]
    assert move._find_ring(rows, cols) is None
    # a rotation along the ring 0, 2, 1, 3, ...: rows 0..1 are no arc of it
    order = np.array([0, 2, 1, 3, 4, 5, 6, 7])
    pos = np.argsort(order)
    assert move._find_ring(order[(pos[:, None] - pos) % n], cols) is None
    # no table, or one on a region it does not fit: the general paths
    p = Placement(reg, (n, n), y_dim=0, y_of=at, x_dim=1, x_of=at)
    assert p.pe_rows is None
    wide = Placement(Region(WAFER, n, n + 1), (n, n), y_dim=0, y_of=at, x_dim=1, x_of=at,
                     pe_rows=np.zeros((n, n), np.int64), pe_cols=np.zeros((n, n), np.int64))
    assert move._ring(wide) is None


def test_a_stacked_skewed_move_prices_as_one_layer_scaled():
    """move_cost prices the ring path per element byte of one layer and scales it: equal to
    pricing every layer through the cell path."""
    rng = np.random.default_rng(2)
    one = _skewed(Region(WAFER, 5, 5, 1, 1), (13, 11), "interleave", rng, "blocked", "any")
    src = Placement(one.region, (3, 13, 11), y_dim=1, y_of=one.y_of, x_dim=2, x_of=one.x_of, pe_rows=one.pe_rows,
                    pe_cols=one.pe_cols)
    dst = Placement(Region(WAFER, 3, 4, 6, 0), (3, 13, 11), y_dim=2, y_of=_map(rng, 11, 3, "any"), x_dim=1,
                    x_of=_map(rng, 13, 4, "blocked"))
    box = move._box(src, dst)
    assert move_cost(src, dst, 2) == MoveCost.of(move._traffic_cells(src, dst, 2, box))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.booleans())
def test_factored_rectangles_equal_their_arrays(seed, same_cols):
    """Rectangles that all span the same columns (or rows) load as one profile times one
    span: built, the factored load is the rectangle sums'."""
    rng = np.random.default_rng(seed)
    H, W, k = (int(x) for x in rng.integers(1, 12, 3))
    lo, hi = np.sort(rng.integers(0, H if same_cols else W, (2, k)), axis=0)
    a, b = sorted(int(x) for x in rng.integers(0, W if same_cols else H, 2))
    fixed = (np.full(k, a), np.full(k, b))
    rows, cols = ((lo, hi), fixed) if same_cols else (fixed, (lo, hi))
    w = rng.integers(0, 5, k)
    got = move._rect((H, W), rows, cols, w, True)
    want = move._rect((H, W), rows, cols, w)
    np.testing.assert_array_equal(got if isinstance(got, np.ndarray) else got.array(), want)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["blocked", "any"]))
def test_transpose_priced_from_windows_equals_cells(seed, kind):
    """A plain transpose keeps its row links to the source's rows, its column links to the
    destination's columns and its ramps unbuilt until read: its cost (read first) and its
    arrays are the per-cell path's."""
    rng = np.random.default_rng(seed)
    r1, c1, r2, c2 = (int(x) for x in rng.integers(1, 8, 4))
    src_reg = Region(WAFER, r1, c1, int(rng.integers(0, 6)), int(rng.integers(0, 6)))
    dst_reg = Region(WAFER, r2, c2, int(rng.integers(0, 6)), int(rng.integers(0, 6)))
    A, B = (int(x) for x in rng.integers(1, 14, 2))
    src = Placement(src_reg, (A, B), y_dim=0, y_of=_map(rng, A, r1, kind), x_dim=1, x_of=_map(rng, B, c1, kind))
    dst = Placement(dst_reg, (A, B), y_dim=1, y_of=_map(rng, B, r2, kind), x_dim=0, x_of=_map(rng, A, c2, kind))
    assert move._transposed(src, dst)
    box = move._box(src, dst)
    _same(move._traffic_transposed(src, dst, 3, box), move._traffic_cells(src, dst, 3, box))
