"""Compute primitives: work each PE does on its own tiles, all PEs at once.

Cost: multiply-accumulates (or vector ops) per PE at the wafer's SIMD width for the
dtype, plus a fixed launch overhead per op. Numerics: fp16 tiles are multiplied with
fp32 accumulation (mixed precision), then stored in the tensor's dtype.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from waferllm.errors import MeshError
from waferllm.mesh.cost import compute_cycles, vector_cycles
from waferllm.mesh.tensor import NP_DTYPES, DistTensor


def _charge(mesh, name, cycles, flops_per_pe, read_bytes, write_bytes, *, dtype="fp32"):
    """Charge one compute op on every PE of ``mesh``: its cycles, flops, SRAM traffic, and its
    multiply-accumulates counted by ``dtype`` (``macs_fp16`` / ``macs_fp32``, a MAC being 2 flops,
    so a one-flop vector op counts as half a MAC) for the energy of the datapath."""
    if dtype not in ("fp16", "fp32"):
        raise MeshError(f"{name}: unsupported dtype {dtype!r}; expected fp16 or fp32")
    pes = mesh.rows * mesh.cols
    flops = flops_per_pe * pes
    out = mesh.ledger.charge(name, "compute", cycles, flops=flops, **{f"macs_{dtype}": flops / 2},
                             sram_read_bytes=read_bytes * pes, sram_write_bytes=write_bytes * pes)
    charge_task_switch(mesh)
    return out


def charge_task_switch(mesh) -> None:
    """Every op (or collective) is a task the PE switches to: a fixed cost outside the op's
    own time. Inside a kernel's :func:`task` the switch was paid once on entering it."""
    cycles = mesh.wafer.task_switch_cycles
    if cycles and not mesh.ledger.task_depth:
        mesh.ledger.charge("task_switch", "overhead", cycles)


@contextmanager
def task(mesh):
    """Run a kernel as one task: its steps (a Cannon step's product and shifts, a GEMV's
    local product and allreduce) follow one another inside it, so the PE pays one task
    switch to enter the kernel, not one per step."""
    led = mesh.ledger
    charge_task_switch(mesh)
    led.task_depth += 1
    try:
        yield
    finally:
        led.task_depth -= 1


def matmul_tiles(mesh, a_tiles, b_tiles, acc=None, transpose_b=False, dtype="fp32", name="tile_matmul",
                 shapes=None):
    """Per-PE ``acc + A_tile @ B_tile`` (or ``@ B_tile.T``) on raw tile arrays.

    ``shapes`` = (m, k, n) per PE; required in dry run (where the arrays are None).
    Returns the new accumulator array (fp32 in numeric mode) or None.
    """
    if shapes is None:
        m, k = a_tiles.shape[-2:]
        n = b_tiles.shape[-2] if transpose_b else b_tiles.shape[-1]
        batch = math.prod(a_tiles.shape[2:-2])
    else:
        m, k, n, *rest = shapes
        batch = rest[0] if rest else 1
    macs = batch * m * k * n
    item = 2 if dtype == "fp16" else 4
    _charge(mesh, name, compute_cycles(mesh.wafer, macs, dtype), 2 * macs,
            item * batch * (m * k + k * n + m * n), 4 * batch * m * n, dtype=dtype)
    if a_tiles is None:
        return None
    return _batched_matmul(a_tiles, b_tiles, acc, transpose_b)


_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    return _POOL


def _batched_matmul(a, b, acc, transpose_b):
    """acc + a @ b over leading (mesh) dims in fp32, split over threads by mesh rows.

    numpy hands each small tile product to BLAS one at a time on one thread; splitting
    the PE rows over a thread pool (numpy releases the GIL) uses every core.
    """
    if transpose_b:
        b = np.swapaxes(b, -1, -2)
    a = np.broadcast_to(a, np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + a.shape[-2:])
    b = np.broadcast_to(b, a.shape[:-2] + b.shape[-2:])
    out_shape = a.shape[:-1] + b.shape[-1:]
    rows = a.shape[0]
    workers = _pool()._max_workers
    macs = math.prod(out_shape) * a.shape[-1]
    f32 = (lambda x: x if x.dtype == np.float32 else x.astype(np.float32))
    if rows < 2 or workers == 1 or macs < 1 << 24:  # small products: threads cost more than they save
        prod = np.matmul(f32(a), f32(b))
        if acc is None:
            return prod
        acc += prod
        return acc
    if acc is None:
        acc = np.zeros(out_shape, np.float32)

    def work(lo, hi):
        acc[lo:hi] += np.matmul(f32(a[lo:hi]), f32(b[lo:hi]))

    bounds = np.linspace(0, rows, min(rows, workers) + 1).astype(int)
    list(_pool().map(lambda lh: work(*lh), zip(bounds[:-1], bounds[1:])))
    return acc


def local_matmul(a: DistTensor, b: DistTensor, *, shape, layout, transpose_b=False, partial=None, dtype=None,
                 name="local_matmul") -> DistTensor:
    """Each PE multiplies its A tile by its B tile; the caller states the result's meaning."""
    tiles = matmul_tiles(a.mesh, a.tiles, b.tiles, transpose_b=transpose_b, dtype=a.dtype, name=name,
                         shapes=None if a.tiles is not None else (
                             a.tile_shape[-2], a.tile_shape[-1],
                             b.tile_shape[-2] if transpose_b else b.tile_shape[-1],
                             math.prod(a.tile_shape[:-2])))
    dtype = dtype or a.dtype
    return DistTensor(a.mesh, shape, layout, dtype, None if tiles is None else tiles.astype(NP_DTYPES[dtype]),
                      name=name, partial=partial)


def elementwise(fn, *tensors: DistTensor, ops_per_elem: float = 1.0, name: str = "elementwise", dtype=None,
                out_like: DistTensor | None = None) -> DistTensor:
    """Apply ``fn`` to the tiles (numpy broadcasting between tiles), charging vector ops.

    ``fn`` works on whole tile arrays (mesh dims leading); it must not mix PEs.
    """
    ref = out_like or tensors[0]
    mesh = ref.mesh
    for t in tensors:
        if t.partial is not None:
            raise MeshError(f"{name}: {t.name} is partial along {t.partial[0]} ({t.partial[1]}); "
                            "finish it with comm.allreduce/reduce before an elementwise op")
    elems = ref.tile_elems
    dt = dtype or ref.dtype
    _charge(mesh, name, vector_cycles(mesh.wafer, elems, dt, ops_per_elem), ops_per_elem * elems,
            sum(t.bytes_per_pe for t in tensors), ref.bytes_per_pe, dtype=dt)
    tiles = None
    if mesh.numeric:
        # padding (reset to zero below) may divide 0 by 0; real elements never do
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            tiles = np.asarray(fn(*[t.tiles.astype(np.float32, copy=False) for t in tensors]), dtype=np.float32)
        tiles = np.broadcast_to(tiles, (mesh.rows, mesh.cols, *ref.tile_shape)).astype(NP_DTYPES[dt])
        mask = ref.pad_mask()
        if mask is not None:  # keep the padding zero (fn(0) need not be 0, e.g. exp)
            tiles = np.where(mask, tiles, np.zeros((), tiles.dtype))
    return ref.with_tiles(tiles, dtype=dt, name=name, partial=None)


def tile_reduce(t: DistTensor, dim: int, op: str = "sum", name: str = "tile_reduce", keepdims: bool = True) -> DistTensor:
    """Reduce a logical dim inside every tile. If that dim is split along a mesh axis the
    result is partial along that axis (finish it with :func:`comm.allreduce`)."""
    if op not in ("sum", "max", "sumsq"):
        raise MeshError(f"tile_reduce op must be sum, max or sumsq, got {op!r}")
    mesh = t.mesh
    dim = dim % len(t.shape)
    axis = t.layout[dim]
    _charge(mesh, name, vector_cycles(mesh.wafer, t.tile_elems, t.dtype, 2 if op == "sumsq" else 1),
            t.tile_elems * (2 if op == "sumsq" else 1), t.bytes_per_pe, t.bytes_per_pe // max(t.tile_shape[dim], 1),
            dtype=t.dtype)
    shape = list(t.shape)
    layout = list(t.layout)
    shape[dim] = 1
    layout[dim] = None
    if not keepdims:
        del shape[dim], layout[dim]
    tiles = None
    if t.tiles is not None:
        x = t.tiles.astype(np.float32, copy=False)
        mask = t.pad_mask(dims=(dim,))
        if mask is not None:  # padding of the reduced dim must not take part
            x = np.where(mask, x, np.float32(-np.inf if op == "max" else 0.0))
        if op == "sumsq":
            tiles = np.sum(x * x, axis=2 + dim, keepdims=keepdims)
        elif op == "sum":
            tiles = np.sum(x, axis=2 + dim, keepdims=keepdims)
        else:
            tiles = np.max(x, axis=2 + dim, keepdims=keepdims)
    red = "max" if op == "max" else "sum"
    partial = (axis, red) if axis is not None else None
    if t.partial is not None:
        # a partial sum stays a partial sum under a sum (and max under max); nothing else is exact
        if partial is not None or t.partial[1] != red or op == "sumsq":
            raise MeshError(f"{name}: {t.name} is partial along {t.partial[0]} ({t.partial[1]}); "
                            f"finish it with comm.allreduce before a tile {op}")
        partial = t.partial
    blocks = None
    if t.blocks:
        blocks = {(d if d < dim or keepdims else d - 1): b for d, b in t.blocks.items() if d != dim} or None
    return DistTensor(mesh, shape, layout, "fp32", tiles, name=name, partial=partial, blocks=blocks)
