"""Communication primitives equal their numpy expectation, and dry runs charge the same cost."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waferllm.errors import MeshError, SRAMOverflowError
from waferllm.hardware import get_wafer
from waferllm.mesh import Mesh, Region, comm, compute
from waferllm.mesh.interleave import ring_order
from waferllm.mesh.tensor import AXES, DistTensor

WAFER = get_wafer("wse2")
ALGOS = [("chain", 2), ("pipeline", 2), ("ring", 2), ("ktree", 1), ("ktree", 2), ("ktree", 3)]
DTYPES = {"fp32": np.float32, "fp16": np.float16}


def _mesh(rows, cols, mode="numeric", **kw):
    return Mesh(Region(WAFER, rows, cols, name=f"{rows}x{cols}"), mode=mode, **kw)


def _rand_tiles(rng, rows, cols, tile, dtype):
    return (rng.standard_normal((rows, cols, *tile)) * 4).astype(DTYPES[dtype])


mesh_sides = st.tuples(st.integers(1, 7), st.integers(1, 9))


# ------------------------------------------------------------------ shift


@settings(max_examples=150, deadline=None)
@given(mesh_sides, st.sampled_from(["y", "x"]), st.sampled_from([1, -1]), st.sampled_from(["fp32", "fp16"]),
       st.integers(0, 1000))
def test_shift(sides, axis, direction, dtype, seed):
    rows, cols = sides
    m = _mesh(rows, cols)
    rng = np.random.default_rng(seed)
    tiles = _rand_tiles(rng, rows, cols, (2, 3), dtype)
    t = DistTensor(m, (rows * 2, cols * 3), ("y", "x"), dtype, tiles)
    s = comm.shift(t, axis, direction, fill=7.0)
    ax = AXES[axis]
    expect = np.full_like(tiles, 7.0)
    n = tiles.shape[ax]
    src = np.moveaxis(tiles, ax, 0)
    dst = np.moveaxis(expect, ax, 0)
    if direction == 1:
        dst[1:] = src[:n - 1]
    else:
        dst[:n - 1] = src[1:]
    assert np.array_equal(s.tiles, expect)


# ------------------------------------------------------------------ ring shift


def _expected_ring(tiles, axis, steps, ring):
    """Independent expectation: walk the ring order by hand."""
    ax = AXES[axis]
    n = tiles.shape[ax]
    order = list(ring_order(n, ring))
    lines = tiles.shape[1 - ax]
    steps = np.broadcast_to(np.asarray(steps), (lines,))
    out = np.empty_like(tiles)
    for line in range(lines):
        for rank, p in enumerate(order):
            q = order[(rank - int(steps[line])) % n]  # tile at q moves to p
            if axis == "x":
                out[line, p] = tiles[line, q]
            else:
                out[p, line] = tiles[q, line]
    return out


@settings(max_examples=200, deadline=None)
@given(mesh_sides, st.sampled_from(["y", "x"]), st.sampled_from(["interleave", "plain"]),
       st.one_of(st.integers(-20, 20), st.just("per-line")), st.sampled_from(["fp32", "fp16"]), st.integers(0, 1000))
def test_ring_shift(sides, axis, ring, steps, dtype, seed):
    rows, cols = sides
    m = _mesh(rows, cols)
    rng = np.random.default_rng(seed)
    lines = cols if axis == "y" else rows
    if steps == "per-line":
        steps = rng.integers(-10, 10, size=lines)
    a = (rng.standard_normal((rows * 2 - 1, cols * 3)) * 3).astype(np.float32)
    t = m.place(a, ("y", "x"), dtype)
    s = comm.ring_shift(t, axis, steps, ring=ring)
    assert np.array_equal(s.tiles, _expected_ring(t.tiles, axis, steps, ring))
    # the logical tensor is unchanged: blocks track where each tile went
    assert np.array_equal(s.to_global(), a.astype(DTYPES[dtype]))
    # and shifting back restores the original placement
    back = comm.ring_shift(s, axis, -np.asarray(steps), ring=ring)
    assert np.array_equal(back.tiles, t.tiles)
    assert np.array_equal(back.to_global(), a.astype(DTYPES[dtype]))


def test_ring_shift_with_partial_block_map():
    """A tensor whose blocks dict covers only one dim (a pre-skewed operand) keeps its value."""
    m = _mesh(3, 3)
    a = np.arange(20.0).reshape(4, 5)
    t = m.place(a, ("y", "x"), blocks={0: np.array([[1, 1, 1], [2, 2, 2], [0, 0, 0]])})
    for axis in ("x", "y"):
        assert np.array_equal(comm.ring_shift(t, axis, 1).to_global(), a)


def test_ring_shift_replicated_tensor():
    m = _mesh(3, 5)
    a = np.arange(6.0)
    t = m.place(a, (None,))
    s = comm.ring_shift(t, "x", 2)
    assert np.array_equal(s.to_global(), a)
    assert np.array_equal(s.tiles, t.tiles)


# ------------------------------------------------------------------ broadcast


@settings(max_examples=150, deadline=None)
@given(mesh_sides, st.sampled_from(["y", "x"]), st.data(), st.sampled_from(["fp32", "fp16"]))
def test_broadcast(sides, axis, data, dtype):
    rows, cols = sides
    m = _mesh(rows, cols)
    n = rows if axis == "y" else cols
    root = data.draw(st.integers(0, n - 1))
    rng = np.random.default_rng(root)
    a = rng.standard_normal((rows * 2, cols * 3)).astype(np.float32)
    t = m.place(a, ("y", "x"), dtype)
    b = comm.broadcast(t, axis, root)
    ax = AXES[axis]
    root_tiles = np.take(t.tiles, [root], axis=ax)
    assert np.array_equal(b.tiles, np.broadcast_to(root_tiles, t.tiles.shape))
    # the dim split along the axis becomes whole: it is the root's block
    glob = b.to_global()
    if axis == "y":
        assert b.layout == (None, "x") and np.array_equal(glob, a[root * 2:root * 2 + 2].astype(DTYPES[dtype]))
    else:
        assert b.layout == ("y", None) and np.array_equal(glob, a[:, root * 3:root * 3 + 3].astype(DTYPES[dtype]))
    with pytest.raises(MeshError, match="root"):
        comm.broadcast(t, axis, n)


def test_broadcast_keeps_partial_along_other_axis():
    m = _mesh(3, 4)
    rng = np.random.default_rng(1)
    tiles = rng.standard_normal((3, 4, 5)).astype(np.float32)
    t = DistTensor(m, (5,), (None,), "fp32", tiles, partial=("y", "sum"))
    b = comm.broadcast(t, "x", 2)
    assert b.partial == ("y", "sum")
    assert np.allclose(b.to_global(), tiles[:, 2].sum(0), rtol=1e-6)


# ------------------------------------------------------------------ reduce / allreduce


@settings(max_examples=200, deadline=None)
@given(mesh_sides, st.sampled_from(["y", "x"]), st.sampled_from(ALGOS), st.sampled_from(["sum", "max"]),
       st.sampled_from(["fp32", "fp16"]), st.booleans(), st.integers(0, 1000))
def test_reduce(sides, axis, algo_k, op, dtype, allreduce, seed):
    rows, cols = sides
    algo, k = algo_k
    m = _mesh(rows, cols)
    rng = np.random.default_rng(seed)
    other = "x" if axis == "y" else "y"
    nother = cols if axis == "y" else rows
    tiles = _rand_tiles(rng, rows, cols, (3, 2), dtype)
    t = DistTensor(m, (3 * nother, 2), (other, None), dtype, tiles, partial=(axis, op))
    ax = AXES[axis]
    red = np.sum if op == "sum" else np.max
    expect_tile = red(tiles.astype(np.float32), axis=ax, keepdims=True).astype(DTYPES[dtype])
    r = comm.reduce(t, axis, op, algo=algo, k=k, allreduce=allreduce)
    assert r.dtype == dtype
    if allreduce:
        assert r.partial is None
        assert np.array_equal(r.tiles, np.broadcast_to(expect_tile, tiles.shape))
    else:
        assert r.partial == (axis, op)
        root = ((rows if axis == "y" else cols) - 1) // 2
        assert np.array_equal(np.take(r.tiles, [root], axis=ax), expect_tile)
    # logical value: the reduction of the partials, exact in fp32 and within fp16 rounding
    ref = np.moveaxis(red(tiles.astype(np.float32), axis=ax), 0, 0).reshape(3 * nother, 2)
    got = r.to_global(np.float32)
    if dtype == "fp32":
        assert np.array_equal(got, ref) if op == "max" or allreduce else np.allclose(got, ref, rtol=1e-6, atol=1e-6)
    else:
        assert np.allclose(got, ref, rtol=2e-3, atol=2e-2)


def test_reduce_to_per_line_roots_then_broadcast():
    m = _mesh(4, 5)
    rng = np.random.default_rng(3)
    tiles = rng.standard_normal((4, 5, 2)).astype(np.float32)
    t = DistTensor(m, (8,), ("y",), "fp32", tiles, partial=("x", "sum"))
    roots = np.array([0, 4, 2, 1])
    r = comm.reduce(t, "x", "sum", algo="ktree", root=roots, allreduce=False)
    expect = tiles.sum(1)
    for i, c in enumerate(roots):
        assert np.allclose(r.tiles[i, c], expect[i], rtol=1e-6)
    assert np.allclose(r.to_global(), expect.reshape(-1), rtol=1e-6)
    r2 = comm.reduce(t, "x", "sum", algo="chain", root=3, allreduce=False)
    assert np.allclose(comm.broadcast(r2, "x", 3).to_global(), expect.reshape(-1), rtol=1e-6)
    with pytest.raises(MeshError, match="root"):
        comm.reduce(t, "x", "sum", root=5, allreduce=False)


def test_reduce_errors():
    m = _mesh(3, 3)
    t = m.place(np.ones((3, 3)), ("y", "x"))
    with pytest.raises(MeshError, match="split"):
        comm.allreduce(t, "x")
    v = m.place(np.ones(3), ("y",))
    with pytest.raises(MeshError, match="sum or max"):
        comm.allreduce(v, "x", op="prod")
    with pytest.raises(MeshError, match="unknown reduction"):
        comm.allreduce(v, "x", algo="tree")
    with pytest.raises(MeshError, match="mesh axis"):
        comm.allreduce(v, "z")
    p = DistTensor(m, (3,), (None,), "fp32", np.ones((3, 3, 3), np.float32), partial=("y", "max"))
    with pytest.raises(MeshError, match="partial"):
        comm.allreduce(p, "y", "sum")  # op mismatch would silently be wrong
    q = DistTensor(m, (3,), (None,), "fp32", np.ones((3, 3, 3), np.float32), partial=("y", "sum"))
    r = comm.allreduce(q, "x", "sum")  # a sum along x of partial sums along y stays partial along y
    assert r.partial == ("y", "sum") and np.allclose(r.to_global(), 9.0)


def test_allreduce_of_replicas_sums_them():
    m = _mesh(2, 3)
    v = m.place(np.arange(4.0), (None,))
    r = comm.allreduce(v, "x", algo="pipeline")
    assert np.array_equal(r.to_global(), 3 * np.arange(4.0))


# ------------------------------------------------------------------ gather / relayout


def test_gather():
    m = _mesh(3, 4)
    a = np.random.default_rng(0).standard_normal((7, 9)).astype(np.float32)
    t = m.place(a, ("y", "x"))
    before = m.ledger.cycles
    assert np.array_equal(comm.gather(t, (1, 2)), a)
    assert m.ledger.cycles > before
    with pytest.raises(MeshError, match="outside"):
        comm.gather(t, (3, 0))
    big = _mesh(8, 8).place(np.zeros((8 * 100, 8 * 10), np.float32), ("y", "x"), name="big")
    with pytest.raises(SRAMOverflowError, match="gathering big"):
        comm.gather(big)


@pytest.mark.parametrize("dst_layout,copies", [(("y", "x"), 1), (("x", "y"), 1), ((None, "x"), 5), (("y", None), 2),
                                               ((None, None), 10)])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_relayout(dst_layout, copies, dtype):
    """A 7x9 tensor leaves a 3x4 region for a disjoint 5x2 one: every element is read once,
    travels in the narrower dtype, and lands on every PE that needs a copy of it."""
    src = _mesh(3, 4)
    dst = Mesh(Region(WAFER, 5, 2, row0=10, col0=20, name="decode"), ledger=src.ledger)
    a = np.random.default_rng(1).standard_normal((7, 9)).astype(np.float32)
    t = src.place(a, ("y", "x"), "fp32")
    s = comm.ring_shift(t, "x", 1)  # blocks moved: relayout must still see the logical value
    mark = src.ledger.mark()
    r = comm.relayout(s, dst, dst_layout, dtype)
    assert r.mesh is dst and r.layout == dst_layout and r.dtype == dtype
    assert np.array_equal(r.to_global(), a.astype(DTYPES[dtype]))
    d = src.ledger.since(mark)
    item = 2 if dtype == "fp16" else 4
    assert d["sram_read_bytes"] == 63 * item
    assert d["bytes_moved"] == d["sram_write_bytes"] == 63 * item * copies
    if dst_layout == (None, None):
        # every PE needs the whole tensor: a dst PE ejects, and the first link down a
        # dst column carries, all 63 elements; the farthest pair is (0, 0) -> (14, 21)
        longest = 14 + 21
        assert d["cycles"] == pytest.approx(2 * WAFER.ramp_cycles + WAFER.alpha_cycles * longest
                                            + math.ceil(63 * item / WAFER.link_bytes_per_cycle)
                                            + WAFER.collective_overhead_cycles + WAFER.task_switch_cycles)
    other = Mesh(Region(get_wafer("wse3"), 2, 2))
    with pytest.raises(MeshError, match="different wafers"):
        comm.relayout(t, other, ("y", "x"))


def test_relayout_partial_tensor():
    src, dst = _mesh(3, 3), _mesh(2, 2)
    tiles = np.random.default_rng(2).standard_normal((3, 3, 4)).astype(np.float32)
    t = DistTensor(src, (4,), (None,), "fp32", tiles, partial=("y", "sum"))
    r = comm.relayout(t, dst, ("x",))
    assert r.partial is None
    assert np.allclose(r.to_global(), tiles[:, 0].sum(0), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_relayout_keeps_values_exact_and_tiles_as_placed(dtype):
    """An fp16 tensor re-placed in fp16 or fp32 keeps its values without rounding again
    (its tiles are cut only when read: the same tiles a placement cuts); a partial fp16
    tensor is summed, then rounded to fp16 as it is sent."""
    src = _mesh(3, 4)
    dst = Mesh(Region(WAFER, 2, 5, row0=10, col0=20), ledger=src.ledger)
    a = np.random.default_rng(4).standard_normal((7, 9)).astype(np.float32)
    t = src.place(a, ("y", "x"), "fp16")
    r = comm.relayout(t, dst, ("x", "y"), dtype)
    want = a.astype(np.float16).astype(DTYPES[dtype])
    assert r.to_global().dtype == DTYPES[dtype] and np.array_equal(r.to_global(), want)
    placed = dst.place(want, ("x", "y"), dtype)
    assert r.tiles.dtype == placed.tiles.dtype and np.array_equal(r.tiles, placed.tiles)
    tiles = np.random.default_rng(5).standard_normal((3, 4, 4)).astype(np.float16)
    part = DistTensor(src, (4,), (None,), "fp16", tiles, partial=("y", "sum"))
    summed = comm.relayout(part, dst, ("x",), dtype).to_global().astype(np.float32)
    exact = tiles[:, 0].astype(np.float32).sum(0)
    assert np.array_equal(summed, exact.astype(np.float16).astype(np.float32))


# ------------------------------------------------------------------ dry run = numeric run, in cost


def _program(m, seed=0):
    rng = np.random.default_rng(seed)
    r, c = m.shape
    a = rng.standard_normal((r * 4 - 1, c * 4 - 2)).astype(np.float32)
    v = rng.standard_normal(c * 8 - 3).astype(np.float32)
    t = m.place(a, ("y", "x"), "fp16", name="A")
    x = m.place(v, ("x",), "fp32", name="v")
    t = comm.shift(t, "y", 1)
    t = comm.shift(t, "x", -1)
    t = comm.ring_shift(t, "x", 3)
    t = comm.ring_shift(t, "y", -2, ring="plain")
    t = comm.ring_shift(t, "x", np.arange(r) - 1)
    t = comm.ring_shift(t, "y", np.arange(c) % 3)
    b = comm.broadcast(t, "x", root=c // 2)
    b = comm.broadcast(b, "y", root=0, routes_per_pe=40)
    for algo, k in ALGOS:
        for op in ("sum", "max"):
            comm.allreduce(x, "y", op, algo=algo, k=k)
            comm.reduce(x, "y", op, algo=algo, k=k, allreduce=False)
    comm.reduce(x, "y", "sum", algo="chain", root=0, allreduce=False)
    comm.gather(x, (r - 1, 0))
    with m.ledger.span("compute"):
        w = m.place(rng.standard_normal((c * 4 - 2, 8)).astype(np.float32), ("x", None), "fp16")
        p = compute.local_matmul(t, w, shape=(r * 4 - 1, 8), layout=("y", None), partial=("x", "sum"))
        s = comm.allreduce(p, "x", algo="ktree")
        e = compute.elementwise(np.tanh, s, ops_per_elem=4)
        compute.tile_reduce(e, 1, "sumsq")
        compute.tile_reduce(t, 0, "max")
    dst = Mesh(Region(m.wafer, 2, 3, row0=r + 1, col0=0, name="dst"), mode=m.mode, ledger=m.ledger)
    comm.relayout(t, dst, (None, "y"), "fp32")
    with m.ledger.overlap():
        compute.elementwise(lambda q: q * 2, t)
        comm.ring_shift(t, "x", 1)


@pytest.mark.parametrize("sides", [(1, 1), (1, 5), (2, 2), (3, 5), (7, 9), (6, 4)])
def test_dry_run_charges_like_numeric(sides):
    num, dry = _mesh(*sides), _mesh(*sides, mode="dry")
    _program(num)
    _program(dry)
    a, b = num.ledger.summary(), dry.ledger.summary()
    assert a == b
    assert num.ledger.cycles == dry.ledger.cycles
    assert [(e.name, e.cycles, e.start) for e in num.ledger.events] == \
           [(e.name, e.cycles, e.start) for e in dry.ledger.events]
    assert num.sram.peak_bytes == dry.sram.peak_bytes
    assert num.routes.relayed == dry.routes.relayed
    if sides[0] > 1:
        assert any("relayed in software" in n for n in a["notes"])
