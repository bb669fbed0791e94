"""DistTensor: exact round trips over random shapes, layouts and mesh sizes; padding never leaks."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waferllm.errors import MeshError
from waferllm.hardware import get_wafer
from waferllm.mesh import Mesh, Region, compute
from waferllm.mesh.tensor import DistTensor, check_layout

WAFER = get_wafer("wse2")


@st.composite
def case(draw, max_side=9, ndim=(1, 3)):
    rows = draw(st.integers(1, 7))
    cols = draw(st.integers(1, max_side))
    nd = draw(st.integers(*ndim))
    shape = tuple(draw(st.integers(1, 12)) for _ in range(nd))
    slots = draw(st.permutations(["y", "x"] + [None] * nd))
    layout = tuple(slots[:nd])
    seed = draw(st.integers(0, 2**31 - 1))
    return rows, cols, shape, layout, seed


def _mesh(rows, cols, mode="numeric"):
    return Mesh(Region(WAFER, rows, cols, name=f"{rows}x{cols}"), mode=mode)


@settings(max_examples=400, deadline=None)
@given(case())
def test_round_trip_fp32_exact(c):
    rows, cols, shape, layout, seed = c
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    t = _mesh(rows, cols).place(a, layout, "fp32")
    assert t.tiles.shape[:2] == (rows, cols)
    out = t.to_global()
    assert out.shape == a.shape and out.dtype == np.float32
    assert np.array_equal(out, a)
    # every tile is exactly the block it should be, padded with zeros
    for d, ax in enumerate(layout):
        n_parts = rows if ax == "y" else cols if ax == "x" else 1
        assert t.tile_shape[d] == -(-shape[d] // n_parts)
    padded_total = np.prod([t.tile_shape[d] * (rows if ax == "y" else cols if ax == "x" else 1)
                            for d, ax in enumerate(layout)])
    assert padded_total >= a.size
    mask = t.pad_mask()
    if mask is not None:
        assert not np.any(np.broadcast_to(~mask, t.tiles.shape) & (t.tiles != 0))


@settings(max_examples=200, deadline=None)
@given(case())
def test_round_trip_fp16(c):
    rows, cols, shape, layout, seed = c
    a = (np.random.default_rng(seed).standard_normal(shape) * 100).astype(np.float32)
    t = _mesh(rows, cols).place(a, layout, "fp16")
    assert t.tiles.dtype == np.float16 and t.bytes_per_pe == 2 * t.tile_elems
    out = t.to_global()
    assert out.dtype == np.float16
    assert np.array_equal(out, a.astype(np.float16))
    assert np.array_equal(t.to_global(np.float32), a.astype(np.float16).astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(case(ndim=(1, 2)))
def test_dry_matches_numeric_shapes(c):
    rows, cols, shape, layout, _ = c
    num = _mesh(rows, cols).place(np.zeros(shape), layout, "fp16")
    dry = _mesh(rows, cols, "dry").place(np.zeros(shape), layout, "fp16")
    dry2 = _mesh(rows, cols, "dry").place(shape, layout, "fp16")
    assert dry.tiles is None and dry2.tiles is None
    assert num.tile_shape == dry.tile_shape == dry2.tile_shape
    assert num.bytes_per_pe == dry.bytes_per_pe
    with pytest.raises(MeshError, match="dry-run"):
        dry.to_global()


@settings(max_examples=60, deadline=None)
@given(case(ndim=(1, 2)))
def test_padding_never_leaks_through_elementwise_and_reduce(c):
    """fn(0) != 0 (exp, +1) must not pollute sums or maxima over a padded split dim."""
    rows, cols, shape, layout, seed = c
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) - 3.0
    m = _mesh(rows, cols)
    t = m.place(a, layout, "fp32")
    e = compute.elementwise(lambda x: np.exp(x) + 1.0, t)
    assert np.allclose(e.to_global(), np.exp(a) + 1.0, rtol=1e-6)
    mask = e.pad_mask()
    if mask is not None:
        assert not np.any(np.broadcast_to(~mask, e.tiles.shape) & (e.tiles != 0))
    from waferllm.mesh import comm

    for dim in range(len(shape)):
        for op, ref in (("sum", np.sum(np.exp(a) + 1.0, axis=dim, keepdims=True)),
                        ("max", np.max(a, axis=dim, keepdims=True))):
            src = e if op == "sum" else t
            r = compute.tile_reduce(src, dim, op)
            if r.partial is not None:
                r = comm.allreduce(r, r.partial[0], op)
            assert np.allclose(r.to_global(), ref, rtol=1e-5), (op, dim)


def test_blocks_round_trip():
    m = _mesh(3, 4)
    a = np.arange(9 * 8, dtype=np.float32).reshape(9, 8)
    rng = np.random.default_rng(0)
    perm = rng.permutation(12).reshape(3, 4)  # PE (i, j) holds block (perm // 4, perm % 4)
    by, bx = perm // 4, perm % 4
    t = m.place(a, ("y", "x"), blocks={0: by, 1: bx})
    assert np.array_equal(t.to_global(), a)
    assert np.array_equal(t.tiles[1, 2], a[by[1, 2] * 3:(by[1, 2] + 1) * 3, bx[1, 2] * 2:(bx[1, 2] + 1) * 2])


def test_layout_errors():
    m = _mesh(2, 2)
    with pytest.raises(MeshError, match="entries"):
        m.place(np.zeros((2, 2)), ("y",))
    with pytest.raises(MeshError, match="two dims"):
        m.place(np.zeros((2, 2)), ("y", "y"))
    with pytest.raises(MeshError, match="'y', 'x' or None"):
        check_layout((2,), ("z",))
    with pytest.raises(MeshError, match="fp16 or fp32"):
        m.place(np.zeros(2), ("x",), "bf16")
    with pytest.raises(MeshError, match="tiles of shape"):
        DistTensor(m, (4,), ("x",), "fp32", np.zeros((2, 2, 3), np.float32))
    with pytest.raises(MeshError, match="needs tile data"):
        DistTensor(m, (4,), ("x",), "fp32", None)
    with pytest.raises(MeshError, match="mode"):
        Mesh(Region(WAFER, 2, 2), mode="fast")


def test_tensor_memory_is_released_on_gc():
    m = _mesh(4, 4)
    t = m.place(np.zeros((64, 64), np.float32), ("y", "x"), name="big")
    assert m.sram.used_max() == 16 * 16 * 4
    del t
    gc.collect()
    assert m.sram.used_max() == 0


@settings(max_examples=150, deadline=None)
@given(case(), st.sampled_from(["fp16", "fp32"]))
def test_a_tensor_placed_from_exact_values_is_the_tensor_placed_from_them(c, dtype):
    """``from_global(exact=True)`` (values already exact in the dtype) keeps the array and
    cuts tiles only when read: reading it whole, by elements, or as tiles gives what the
    ordinary placement gives, and SRAM is charged the same."""
    from waferllm.mesh import comm

    rows, cols, shape, layout, seed = c
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(np.float16).astype(np.float32)  # exact in either dtype
    mesh = _mesh(rows, cols)
    plain = DistTensor.from_global(mesh, a.copy(), layout, dtype, name="plain")
    lazy = DistTensor.from_global(mesh, a, layout, dtype, name="lazy", exact=True)
    assert lazy.bytes_per_pe == plain.bytes_per_pe and repr(lazy).endswith("numeric)")
    np.testing.assert_array_equal(lazy.to_global(np.float32), a)
    assert lazy.to_global().dtype == plain.to_global().dtype
    index = tuple(rng.integers(0, n, 5) for n in shape)
    got, want = comm.elements(lazy, index), comm.elements(plain, index)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    a[...] = 0  # the caller's array stays the caller's: the tensor kept its own copy, read-only
    with pytest.raises(ValueError):
        lazy.source[...] = 1
    assert lazy.tiles.dtype == plain.tiles.dtype
    np.testing.assert_array_equal(lazy.tiles, plain.tiles)
    assert lazy.source is None  # cut once; the tiles are the tensor's from now on
