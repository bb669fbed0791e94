"""Moves priced from block maps equal a brute-force routing of every element.

The brute force here finds where each element is by looking for its (unique) value in
the tiles, where it must land by looking in the destination's tiles, picks for every
receiver the nearest copy (every copy of a partial value's shares), and routes each
element's message along its XY path, one link at a time (a multicast's links are the
union of its paths).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waferllm.errors import MeshError
from waferllm.hardware import get_wafer
from waferllm.kernels.meshgemm import place_b, skew_a
from waferllm.mesh import DistTensor, Mesh, Region, comm
from waferllm.mesh.move import Placement, charge_move, move_traffic

WAFER = get_wafer("wse2")


def _mesh(rows, cols, row0=0, col0=0, mode="numeric", ledger=None):
    return Mesh(Region(WAFER, rows, cols, row0=row0, col0=col0, name=f"{rows}x{cols}@{row0},{col0}"), mode=mode,
                ledger=ledger)


# ---------------------------------------------------------------------- brute force


def _xy_links(s, d):
    """Directed links of the XY path s -> d: along s's row to d's column, then along that column."""
    (r, c), (r2, c2) = s, d
    links = set()
    step = 1 if c2 > c else -1
    for cc in range(c, c2, step):
        links.add(("east", r, cc) if step == 1 else ("west", r, cc - 1))
    step = 1 if r2 > r else -1
    for rr in range(r, r2, step):
        links.add(("south", rr, c2) if step == 1 else ("north", rr - 1, c2))
    return links


def brute_force(elements, holders, needers, nbytes, box, partial_axis=None):
    """Per-PE and per-link bytes, routed element by element. ``holders(e)``/``needers(e)``:
    wafer PEs holding / needing element e. ``box``: (top, left, H, W)."""
    top, left, H, W = box
    out = {"inject": np.zeros((H, W), np.int64), "eject": np.zeros((H, W), np.int64),
           "east": np.zeros((H, W - 1), np.int64), "west": np.zeros((H, W - 1), np.int64),
           "south": np.zeros((H - 1, W), np.int64), "north": np.zeros((H - 1, W), np.int64)}
    messages, moved, hops = set(), 0, 0
    for e in elements:
        hs = holders(e)
        if partial_axis is None:
            shares = [hs]
        else:
            ax = 0 if partial_axis == "y" else 1
            by_line = defaultdict(list)
            for h in hs:
                by_line[h[ax]].append(h)
            shares = list(by_line.values())
        receivers = defaultdict(set)
        for share in shares:
            for d in needers(e):
                s = min(share, key=lambda h: abs(h[0] - d[0]) + abs(h[1] - d[1]))
                receivers[s].add(d)
        for s, got in receivers.items():
            got = got - {s}
            if not got:
                continue
            messages.add((s, frozenset(got)))
            out["inject"][s[0] - top, s[1] - left] += nbytes
            links = set()
            for d in got:
                out["eject"][d[0] - top, d[1] - left] += nbytes
                links |= _xy_links(s, d)
                hops = max(hops, abs(s[0] - d[0]) + abs(s[1] - d[1]))
            for kind, r, c in links:
                out[kind][r - top, c - left] += nbytes
            moved += nbytes * len(got)
    return out, len(messages), moved, hops


def _where(t: DistTensor, value) -> list:
    """Wafer PEs whose tile holds ``value`` (tiles of unique values)."""
    i, j = np.nonzero((t.tiles == value).reshape(t.mesh.rows, t.mesh.cols, -1).any(axis=-1))
    r = t.mesh.region
    return [(int(a) + r.row0, int(b) + r.col0) for a, b in zip(i, j)]


def _box(*regions):
    top, left = min(r.row0 for r in regions), min(r.col0 for r in regions)
    return (top, left, max(r.row0 + r.rows for r in regions) - top, max(r.col0 + r.cols for r in regions) - left)


def _assert_traffic(tr, expect, messages, moved, hops, box):
    assert tr.origin == box[:2]
    for k, arr in expect.items():
        np.testing.assert_array_equal(getattr(tr, k), arr, err_msg=k)
    assert (tr.messages, tr.bytes_moved, tr.max_hops) == (messages, moved, hops)


def _cycles(loads, hops):
    """The move's time from brute-force loads and the wafer's constants."""
    busiest = max(a.max(initial=0) for a in loads.values())
    # the move's messages, its fixed cost as a collective, and the task switch to run it
    return (2 * WAFER.ramp_cycles + WAFER.alpha_cycles * hops + math.ceil(busiest / WAFER.link_bytes_per_cycle)
            + WAFER.collective_overhead_cycles + WAFER.task_switch_cycles)


def check_relayout(t: DistTensor, dst_mesh, layout, dtype="fp32"):
    """relayout t onto dst_mesh: its charge equals the brute force over t's unique values."""
    values = np.unique(t.to_global())
    assert values.size == math.prod(t.shape) and values.min() > 0  # unique and never the padding's 0
    out_ledger_mark = dst_mesh.ledger.mark()
    out = comm.relayout(t, dst_mesh, layout, dtype)
    nbytes = min(t.itemsize, out.itemsize)
    box = _box(t.mesh.region, dst_mesh.region)
    loads, messages, moved, hops = brute_force(values, lambda v: _where(t, v), lambda v: _where(out, v), nbytes, box)
    tr = move_traffic(Placement.of(t), Placement.of(out), nbytes)
    _assert_traffic(tr, loads, messages, moved, hops, box)
    # the same placement stated through a block table (any map, not one row and one column profile)
    r, c = t.mesh.shape
    ii, jj = np.meshgrid(np.arange(r), np.arange(c), indexing="ij")
    tabled = Placement.of(t)
    if tabled.pe_rows is None:
        tabled = dataclasses.replace(tabled, pe_rows=ii, pe_cols=jj)
    _assert_traffic(move_traffic(tabled, Placement.of(out), nbytes), loads, messages, moved, hops, box)
    d = dst_mesh.ledger.since(out_ledger_mark)
    if messages:
        assert d["cycles"] == pytest.approx(_cycles(loads, hops))
        assert d["bytes_moved"] == moved
        assert d["hop_bytes"] == sum(loads[k].sum() for k in ("east", "west", "south", "north"))
        assert d["sram_read_bytes"] == loads["inject"].sum() and d["sram_write_bytes"] == loads["eject"].sum()
    else:
        assert d["cycles"] == 0
    return out


def _unique(shape, seed=0):
    return (np.random.default_rng(seed).permutation(math.prod(shape)) + 1).astype(np.float32).reshape(shape)


# ---------------------------------------------------------------------- layouts, transposes, replication, offsets

LAYOUTS = [("y", "x"), ("x", "y"), (None, "x"), ("y", None), ("x", None), (None, "y"), (None, None)]


@pytest.mark.parametrize("src_layout", [("y", "x"), ("x", "y"), (None, "x"), (None, None)])
@pytest.mark.parametrize("dst_layout", LAYOUTS)
def test_relayout_equals_brute_force(src_layout, dst_layout):
    src = _mesh(3, 4, row0=2, col0=1)
    dst = _mesh(2, 5, row0=4, col0=3, ledger=src.ledger)  # overlapping, offset both ways
    t = src.place(_unique((7, 9)), src_layout, "fp32", name="t")
    check_relayout(t, dst, dst_layout)


@pytest.mark.parametrize("dst_at", [(0, 0), (0, 9), (8, 0), (6, 7), (1, 2), (2, 4)])
def test_relayout_regions_at_different_offsets(dst_at):
    src = _mesh(3, 3, row0=1, col0=2)
    dst = _mesh(4, 2, *dst_at, ledger=src.ledger)
    t = src.place(_unique((10, 5), 1), ("y", "x"), "fp32")
    check_relayout(t, dst, ("x", "y"), "fp16")  # transposed, and the narrower dtype travels
    check_relayout(t, dst, (None, "x"))  # replicated along y: a multicast down every column
    # replicated along y on both sides: rows both regions share use their own copy
    r = src.place(_unique((6, 5), 2), (None, "x"), "fp32")
    check_relayout(r, dst, ("x", None))


def test_relayout_onto_itself_moves_nothing():
    m = _mesh(3, 4)
    t = m.place(_unique((7, 9)), ("y", "x"), "fp32")
    before = m.ledger.cycles
    check_relayout(t, m, ("y", "x"))
    assert m.ledger.cycles == before


def test_relayout_of_nothing_charges_nothing():
    src = _mesh(3, 3)
    dst = _mesh(2, 2, row0=4, ledger=src.ledger)
    for shape, layout in (((0, 5), ("y", "x")), ((4, 0), ("x", "y")), ((0,), (None,))):
        comm.relayout(src.place(np.zeros(shape, np.float32), layout), dst, layout)
    assert src.ledger.cycles == 0 and src.ledger.totals["bytes_moved"] == 0


def test_relayout_of_skewed_and_rotated_operands():
    """Block maps: B pre-skewed at placement, A skewed on the mesh then rotated; both moved off."""
    n = 4
    m = _mesh(n, n, row0=3, col0=0)
    dst = _mesh(3, 5, row0=0, col0=6, ledger=m.ledger)
    b = place_b(m, _unique((9, 11), 2), "fp32")
    assert b.blocks is not None
    check_relayout(b, dst, ("y", "x"))
    a = skew_a(m.place(_unique((10, 7), 3), ("y", "x"), "fp32"))
    a = comm.ring_shift(comm.ring_shift(a, "x", -1), "y", 2)
    check_relayout(a, dst, ("x", None))


def test_relayout_prices_the_same_dry_and_numeric():
    costs = []
    for mode in ("numeric", "dry"):
        m = _mesh(4, 4, mode=mode)
        dst = _mesh(2, 3, row0=5, col0=2, mode=mode, ledger=m.ledger)
        b = place_b(m, _unique((9, 11)) if mode == "numeric" else (9, 11), "fp32")
        b = comm.ring_shift(comm.ring_shift(b, "y", -1), "x", np.arange(4))
        comm.relayout(b, dst, ("y", "x"))
        costs.append(m.ledger.summary())
    assert costs[0] == costs[1]


def test_relayout_of_partial_value_sends_every_share():
    src = _mesh(3, 2)
    dst = _mesh(2, 2, row0=4, col0=1, ledger=src.ledger)
    tiles = np.random.default_rng(4).standard_normal((3, 2, 5)).astype(np.float32)
    t = DistTensor(src, (5,), (None,), "fp32", tiles, partial=("y", "sum"))
    mark = src.ledger.mark()
    out = comm.relayout(t, dst, ("x",))
    np.testing.assert_allclose(out.to_global(), tiles[:, 0].sum(0), rtol=1e-6)
    # every PE holds every element's share of its row; destination column j needs elements of block j
    box = _box(src.region, dst.region)
    tile = out.tile_shape[0]
    loads, messages, moved, hops = brute_force(
        range(5), lambda e: [(i, j) for i in range(3) for j in range(2)],
        lambda e: [(4 + i, 1 + e // tile) for i in range(2)], 4, box, partial_axis="y")
    _assert_traffic(move_traffic(Placement.of(t), Placement.of(out), 4), loads, messages, moved, hops, box)
    assert src.ledger.since(mark)["cycles"] == pytest.approx(_cycles(loads, hops))


@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(0, 4), st.integers(0, 4)),
       st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(0, 4), st.integers(0, 4)),
       st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS), st.integers(1, 9), st.integers(1, 9), st.integers(0, 99))
def test_relayout_random(sa, sb, la, lb, d0, d1, seed):
    src = _mesh(*sa)
    dst = _mesh(*sb, ledger=src.ledger)
    t = src.place(_unique((d0, d1), seed), la, "fp32")
    t = comm.ring_shift(t, "x", seed % 3) if "x" in la else t
    check_relayout(t, dst, lb)


# ---------------------------------------------------------------------- explicit maps (prefill -> decode K/V)


def test_kv_transition_placement_equals_brute_force():
    """K [tokens, features] from prefill's (y, x) blocks to a decode cache: tokens over rows in
    balanced counts, features over columns in blocks of tf (how the cache stores a PE's
    share locally, e.g. transposed, does not change where it lands)."""
    length, feats, tf = 23, 12, 3
    pre = Region(WAFER, 4, 4, row0=0, col0=0)
    dec = Region(WAFER, 5, 4, row0=2, col0=5)
    counts = np.full(dec.rows, length // dec.rows) + (np.arange(dec.rows) < length % dec.rows)
    token_row = np.repeat(np.arange(dec.rows), counts)
    src = Placement.blocked(pre, (length, feats), ("y", "x"))
    dst = Placement(dec, (length, feats), y_dim=0, y_of=token_row, x_dim=1, x_of=np.arange(feats) // tf)
    tq = -(-length // pre.rows)
    tx = -(-feats // pre.cols)
    box = _box(pre, dec)
    elems = [(t, f) for t in range(length) for f in range(feats)]
    loads, messages, moved, hops = brute_force(
        elems, lambda e: [(e[0] // tq, e[1] // tx)], lambda e: [(dec.row0 + token_row[e[0]], dec.col0 + e[1] // tf)],
        2, box)
    _assert_traffic(move_traffic(src, dst, 2), loads, messages, moved, hops, box)
    m = _mesh(1, 1)
    # the return value is the move itself; its task switch is charged beside it
    assert charge_move(m.ledger, src, dst, 2, name="kv") == pytest.approx(_cycles(loads, hops) - WAFER.task_switch_cycles)
    assert m.ledger.totals["bytes_moved"] == moved == 2 * length * feats


def test_placement_rejects_bad_maps():
    r = Region(WAFER, 2, 3)
    with pytest.raises(MeshError, match="one coordinate per index"):
        Placement(r, (4, 5), y_dim=0, y_of=np.zeros(3))
    with pytest.raises(MeshError, match=r"must lie in \[0, 2\)"):
        Placement(r, (4, 5), y_dim=0, y_of=np.full(4, 2))
    with pytest.raises(MeshError, match="rows and columns at once"):
        Placement(r, (4, 5), y_dim=0, y_of=np.zeros(4), x_dim=0, x_of=np.zeros(4))
    with pytest.raises(MeshError, match="cannot also be split"):
        Placement(r, (4, 5), y_dim=0, y_of=np.zeros(4), partial="y")
    with pytest.raises(MeshError, match="differs from destination shape"):
        move_traffic(Placement(r, (4, 5)), Placement(r, (5, 4)), 2)
    with pytest.raises(MeshError, match="different wafers"):
        move_traffic(Placement(r, (4, 5)), Placement(Region(get_wafer("wse3"), 2, 2), (4, 5)), 2)
