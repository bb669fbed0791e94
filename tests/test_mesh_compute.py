"""Compute primitives: tile matmuls, elementwise ops and tile reductions, numerics and cost."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waferllm.errors import MeshError
from waferllm.hardware import get_wafer
from waferllm.mesh import Mesh, Region, comm, compute
from waferllm.mesh.tensor import DistTensor

WAFER = get_wafer("wse2")


def _mesh(rows, cols, mode="numeric"):
    return Mesh(Region(WAFER, rows, cols), mode=mode)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul_tiles(dtype, transpose_b):
    m = _mesh(2, 3)
    rng = np.random.default_rng(0)
    npd = np.float32 if dtype == "fp32" else np.float16
    a = rng.standard_normal((2, 3, 4, 5)).astype(npd)
    b = rng.standard_normal((2, 3, 6, 5) if transpose_b else (2, 3, 5, 6)).astype(npd)
    acc = np.ones((2, 3, 4, 6), np.float32)
    out = compute.matmul_tiles(m, a, b, acc=acc, transpose_b=transpose_b, dtype=dtype)
    bb = np.swapaxes(b, -1, -2) if transpose_b else b
    ref = 1 + np.einsum("rcik,rckj->rcij", a.astype(np.float64), bb.astype(np.float64))
    assert out is acc and out.dtype == np.float32
    assert np.allclose(out, ref, rtol=1e-5, atol=1e-5)
    macs = 4 * 5 * 6
    # the op's SIMD work and launch, plus the task switch to run it
    expect = math.ceil(macs / WAFER.macs_per_cycle(dtype)) + WAFER.op_overhead_cycles + WAFER.task_switch_cycles
    assert m.ledger.cycles == pytest.approx(expect)
    assert m.ledger.totals["flops"] == 2 * macs * 6
    other = "fp32" if dtype == "fp16" else "fp16"
    assert m.ledger.totals[f"macs_{dtype}"] == macs * 6 and m.ledger.totals.get(f"macs_{other}", 0) == 0
    item = 2 if dtype == "fp16" else 4
    assert m.ledger.totals["sram_read_bytes"] == 6 * item * (4 * 5 + 5 * 6 + 4 * 6)
    assert m.ledger.totals["sram_write_bytes"] == 6 * 4 * 4 * 6  # the fp32 accumulator
    # dry run: same charge from shapes alone
    d = _mesh(2, 3, "dry")
    assert compute.matmul_tiles(d, None, None, dtype=dtype, shapes=(4, 5, 6)) is None
    assert d.ledger.cycles == pytest.approx(expect)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9),
       st.sampled_from(["fp32", "fp16"]), st.integers(0, 1000))
def test_local_matmul_gemv_pattern(r, c, m_, k_, n_, dtype, seed):
    """C = A @ B with A (y, x), B (x, None): local products are partial along x; allreduce finishes."""
    mesh = _mesh(r, c)
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((m_ * r, k_ * c - (1 if k_ > 1 else 0))).astype(np.float32)
    B = rng.standard_normal((A.shape[1], n_)).astype(np.float32)
    a = mesh.place(A, ("y", "x"), dtype)
    b = mesh.place(B, ("x", None), dtype)
    p = compute.local_matmul(a, b, shape=(A.shape[0], n_), layout=("y", None), partial=("x", "sum"), dtype="fp32")
    ref = A.astype(np.float16 if dtype == "fp16" else np.float32).astype(np.float64) @ \
        B.astype(np.float16 if dtype == "fp16" else np.float32).astype(np.float64)
    assert np.allclose(p.to_global(), ref, rtol=1e-4, atol=1e-4)
    y = comm.allreduce(p, "x")
    assert np.allclose(y.to_global(), ref, rtol=1e-4, atol=1e-4)


def test_local_matmul_batched_and_dry():
    for mode in ("numeric", "dry"):
        mesh = _mesh(2, 2, mode)
        a = mesh.place(np.ones((3, 4, 6), np.float32), (None, "y", "x"))
        b = mesh.place(np.ones((3, 6, 2), np.float32), (None, "x", None))
        out = compute.local_matmul(a, b, shape=(3, 4, 2), layout=(None, "y", None), partial=("x", "sum"))
        if mode == "numeric":
            assert np.allclose(out.to_global(), 6.0)
            cyc = mesh.ledger.cycles
        else:
            assert out.tiles is None and mesh.ledger.cycles == cyc


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_elementwise(dtype):
    m = _mesh(3, 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    y = rng.standard_normal((5, 7)).astype(np.float32)
    tx, ty = m.place(x, ("y", "x"), dtype), m.place(y, ("y", "x"), dtype)
    npd = np.float32 if dtype == "fp32" else np.float16
    out = compute.elementwise(lambda a, b: a * b + np.exp(a), tx, ty, ops_per_elem=3)
    xr, yr = x.astype(npd).astype(np.float32), y.astype(npd).astype(np.float32)
    assert out.dtype == dtype
    assert np.allclose(out.to_global(np.float32), (xr * yr + np.exp(xr)).astype(npd), rtol=1e-3 if dtype == "fp16" else 1e-6)
    elems = tx.tile_elems
    assert m.ledger.cycles == pytest.approx(math.ceil(elems * 3 / WAFER.macs_per_cycle(dtype)) + WAFER.op_overhead_cycles
                                            + WAFER.task_switch_cycles)
    assert m.ledger.totals["flops"] == 3 * elems * 6
    assert m.ledger.totals[f"macs_{dtype}"] == 3 * elems * 6 / 2  # a one-flop vector op is half a MAC
    before = dict(m.ledger.totals)
    up = compute.elementwise(lambda a: a, tx, dtype="fp32")
    assert up.dtype == "fp32" and up.tiles.dtype == np.float32
    # the op runs in its output dtype
    assert m.ledger.totals["macs_fp32"] - before.get("macs_fp32", 0) == elems * 6 / 2
    # a row vector broadcast against a matrix tile (same layout on the split axis)
    v = m.place(rng.standard_normal(7).astype(np.float32), ("x",), "fp32")
    s = compute.elementwise(lambda a, b: a + b[:, :, None, :], tx, v, out_like=tx)
    assert np.allclose(s.to_global(np.float32), tx.to_global(np.float32) + v.to_global(), rtol=1e-3)


def test_elementwise_refuses_partial_input():
    m = _mesh(2, 2)
    p = DistTensor(m, (3,), (None,), "fp32", np.ones((2, 2, 3), np.float32), partial=("y", "sum"))
    with pytest.raises(MeshError, match="partial"):
        compute.elementwise(np.exp, p)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 11), st.integers(1, 11),
       st.sampled_from([("y", "x"), ("x", "y"), ("y", None), (None, "x"), (None, None)]),
       st.sampled_from(["sum", "max", "sumsq"]), st.booleans(), st.integers(0, 1000))
def test_tile_reduce(r, c, d0, d1, layout, op, keepdims, seed):
    m = _mesh(r, c)
    x = (np.random.default_rng(seed).standard_normal((d0, d1)) - 2).astype(np.float32)
    t = m.place(x, layout, "fp32")
    ref_fn = {"sum": np.sum, "max": np.max, "sumsq": lambda a, axis, keepdims: np.sum(a * a, axis=axis, keepdims=keepdims)}[op]
    for dim in (0, 1):
        out = compute.tile_reduce(t, dim, op, keepdims=keepdims)
        split = layout[dim]
        assert out.partial == ((split, "max" if op == "max" else "sum") if split else None)
        if out.partial:
            out = comm.allreduce(out, split, out.partial[1])
        assert out.dtype == "fp32"
        assert np.allclose(out.to_global(), ref_fn(x, axis=dim, keepdims=keepdims), rtol=1e-5, atol=1e-5)


def test_tile_reduce_errors_and_partial_input():
    m = _mesh(2, 2)
    t = m.place(np.ones((4, 4)), ("y", "x"))
    with pytest.raises(MeshError, match="sum, max or sumsq"):
        compute.tile_reduce(t, 0, "mean")
    p = DistTensor(m, (3, 4), (None, None), "fp32", np.ones((2, 2, 3, 4), np.float32), partial=("y", "sum"))
    s = compute.tile_reduce(p, 1, "sum")  # a sum of partial sums is still a partial sum
    assert s.partial == ("y", "sum") and np.allclose(s.to_global(), 8.0)
    with pytest.raises(MeshError, match="partial"):
        compute.tile_reduce(p, 1, "max")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("op, flops_per_elem", [("sum", 1), ("max", 1), ("sumsq", 2)])
def test_tile_reduce_counts(dtype, op, flops_per_elem):
    m = _mesh(2, 3, "dry")
    t = m.place((4, 3 * 5), ("y", "x"), dtype)  # 2 x 5 elements per PE
    compute.tile_reduce(t, 1, op)
    item = 2 if dtype == "fp16" else 4
    tot = m.ledger.totals
    assert tot["flops"] == 6 * 10 * flops_per_elem
    assert tot[f"macs_{dtype}"] == 6 * 10 * flops_per_elem / 2
    assert tot["sram_read_bytes"] == 6 * 10 * item and tot["sram_write_bytes"] == 6 * 2 * item
    assert m.ledger.cycles == math.ceil(10 * flops_per_elem / WAFER.macs_per_cycle(dtype)) + WAFER.op_overhead_cycles \
        + WAFER.task_switch_cycles


def test_charge_counts_macs_by_dtype():
    m = _mesh(2, 2, "dry")
    compute._charge(m, "op", 10, 8, 0, 0)  # no dtype given: fp32
    compute._charge(m, "op", 10, 6, 0, 0, dtype="fp16")
    assert m.ledger.totals["macs_fp32"] == 4 * 4 and m.ledger.totals["macs_fp16"] == 4 * 3
    assert m.ledger.totals["flops"] == 4 * 14
    with pytest.raises(MeshError, match="unsupported dtype 'bf16'"):
        compute._charge(m, "op", 10, 6, 0, 0, dtype="bf16")
