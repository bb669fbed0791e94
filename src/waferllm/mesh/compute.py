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
from waferllm.hardware.plmr import DTYPE_BYTES
from waferllm.mesh.cost import compute_cycles, vector_cycles
from waferllm.mesh.tensor import AXES, NP_DTYPES, QUANT_BITS, DistTensor, QuantTensor, tile_shape_for


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
    mesh.ledger.charge_task_switch()


def store(mesh, name: str, elems_per_pe: int, dtype: str, writers: int) -> float:
    """``writers`` PEs each store ``elems_per_pe`` values they hold into a buffer (e.g. a new
    token's K and V into a cache slot): vector work at the dtype's SIMD width, written to
    SRAM. Part of the op that produced the values, so no task switch of its own."""
    return mesh.ledger.charge(name, "compute", vector_cycles(mesh.wafer, elems_per_pe, dtype),
                              sram_write_bytes=elems_per_pe * DTYPE_BYTES[dtype] * writers)


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
                 shapes=None, dequant: "QuantTensor | None" = None):
    """Per-PE ``acc + A_tile @ B_tile`` (or ``@ B_tile.T``) on raw tile arrays.

    ``shapes`` = (m, k, n) per PE; required in dry run (where the arrays are None).
    Returns the new accumulator array (fp32 in numeric mode) or None.

    ``dequant``: B is this block-quantised weight's tile (``b_tiles`` its dequantised values
    in a numeric run, see :meth:`QuantTensor.compute_view`). The PE has no integer datapath:
    before the products its SIMD unit turns every stored value of the k x n tile into a
    ``dtype`` operand, ``wafer.dequant_ops(format)`` ops per value at ``dtype``'s width, in
    the same op (no second launch); B is read at its stored size (integers and scales).
    """
    if shapes is None:
        m, k = a_tiles.shape[-2:]
        n = b_tiles.shape[-2] if transpose_b else b_tiles.shape[-1]
        batch = math.prod(a_tiles.shape[2:-2])
    else:
        m, k, n, *rest = shapes
        batch = rest[0] if rest else 1
    macs = batch * m * k * n
    item = DTYPE_BYTES[dtype]
    cycles = compute_cycles(mesh.wafer, macs, dtype)
    flops, b_bytes = 2 * macs, item * batch * k * n
    if dequant is not None:
        ops = dequant_ops_per_pe(mesh.wafer, dequant, batch * k * n)
        if macs > 0:
            cycles += math.ceil(ops / mesh.wafer.macs_per_cycle(dtype))
        flops += ops
        b_bytes = dequant.bytes_per_pe * batch
    _charge(mesh, name, cycles, flops, item * batch * (m * k + m * n) + b_bytes, 4 * batch * m * n, dtype=dtype)
    if a_tiles is None:
        return None
    return _batched_matmul(a_tiles, b_tiles, acc, transpose_b)


def dequant_ops_per_pe(wafer, weight, elems: int) -> float:
    """SIMD ops a PE executes to dequantise ``elems`` stored values of a quantised weight."""
    if weight.dtype not in QUANT_BITS:
        raise MeshError(f"{weight.name}: dequantising needs an int8 or int4 weight, got {weight.dtype!r}")
    return elems * wafer.dequant_ops(weight.dtype)


_POOL = None
_WORKERS: int | None = None  # set_workers(); None: one per core, at most 8


def workers() -> int:
    """How many threads split a large batched tile product (see :func:`set_workers`)."""
    return _WORKERS or max(1, min(8, os.cpu_count() or 1))


def set_workers(n: int | None) -> None:
    """Split large batched tile products over ``n`` threads (None: one per core, at most 8).
    Only host wall time changes: every PE's product is the same call either way."""
    global _POOL, _WORKERS
    if n is not None and n < 1:
        raise MeshError(f"workers must be at least 1, got {n}")
    if n != _WORKERS:
        _WORKERS = n
        if _POOL is not None:
            _POOL.shutdown(wait=True)
        _POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=workers())
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
    n_workers = workers()
    macs = math.prod(out_shape) * a.shape[-1]
    f32 = (lambda x: x if x.dtype == np.float32 else x.astype(np.float32))
    if rows < 2 or n_workers == 1 or macs < 1 << 24:  # small products: threads cost more than they save
        prod = np.matmul(f32(a), f32(b))
        if acc is None:
            return prod
        acc += prod
        return acc
    if acc is None:
        acc = np.zeros(out_shape, np.float32)

    def work(lo, hi):
        acc[lo:hi] += np.matmul(f32(a[lo:hi]), f32(b[lo:hi]))

    bounds = np.linspace(0, rows, min(rows, n_workers) + 1).astype(int)
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


# ------------------------------------------------------------------------ grouped products and argmax


def _narrower(*dtypes: str) -> str:
    """The dtype a mixed product runs at: the narrower operand sets the SIMD lanes."""
    return min(dtypes, key=lambda d: DTYPE_BYTES[d])


def groups_per_pe(groups) -> int:
    """Most distinct groups (ids >= 0) whose members share one tile, over every PE of a group map."""
    g = np.asarray(groups)
    ids = np.arange(max(int(g.max()) + 1, 1))
    present = (g[..., None] == ids).any(axis=-2)  # (..., groups)
    return max(1, int(present.sum(axis=-1).max()))


def _onehot(groups, n_groups: int) -> np.ndarray:
    """(..., K) group ids -> (..., K, G) float32 one-hot (padding, id -1, maps to no group)."""
    g = np.asarray(groups)
    return (g[..., None] == np.arange(n_groups)).astype(np.float32)


def grouped_contract(a: DistTensor, b: DistTensor, groups, n_groups: int, *, shape, layout, partial=None,
                     dtype: str = "fp32", name: str = "grouped_contract") -> DistTensor:
    """Per PE, ``out[g] = A[:, k in g] @ B[k in g, :]`` for every group g of the contracted dim.

    A's tile holds M x K values (row-major), B's tile is [K, N]; ``groups`` gives each of
    the K positions its group (-1: padding), broadcastable to (rows, cols, K) (e.g. the
    attention head of every feature a PE column holds). The result's tile is
    [n_groups, M, N]; a group absent from a PE is zero there. The caller states the
    result's logical ``shape``/``layout``/``partial``.

    Cost from the tile shapes: M*K*N multiply-accumulates (each k belongs to one group)
    at the narrower operand's SIMD width; both tiles are read; the groups a PE holds
    (:func:`groups_per_pe`) are written.
    """
    mesh = a.mesh
    k_len, n_len = b.tile_shape
    m_len = a.tile_elems // k_len
    if m_len * k_len != a.tile_elems:
        raise MeshError(f"{name}: A's tile ({a.tile_elems} values) is not M x {k_len}")
    macs = m_len * k_len * n_len
    dt = _narrower(a.dtype, b.dtype)
    _charge(mesh, name, compute_cycles(mesh.wafer, macs, dt), 2 * macs, a.bytes_per_pe + b.bytes_per_pe,
            groups_per_pe(groups) * m_len * n_len * DTYPE_BYTES[dtype], dtype=dt)
    tiles = None
    if mesh.numeric:
        at = a.tiles.astype(np.float32, copy=False).reshape(mesh.rows, mesh.cols, m_len, k_len)
        bt = b.tiles.astype(np.float32, copy=False)
        oh = np.broadcast_to(_onehot(groups, n_groups), (mesh.rows, mesh.cols, k_len, n_groups))
        tiles = np.einsum("ijmk,ijkg,ijkn->ijgmn", at, oh, bt, optimize=True).astype(NP_DTYPES[dtype])
    return DistTensor(mesh, shape, layout, dtype, tiles, name=name, partial=partial)


def grouped_expand(p: DistTensor, b: DistTensor, groups, *, shape, layout, partial=None, dtype: str = "fp32",
                   name: str = "grouped_expand") -> DistTensor:
    """Per PE, ``out[m, k] = sum_s P[group(k), m, s] * B[s, k]``: the weights of each position's
    group applied to its column of B (e.g. attention's p V, heads sharing a PE column).

    P's tile is [G, M, S], B's tile [S, K]; ``groups`` as in :func:`grouped_contract`. The
    result's tile holds M x K values (row-major). Cost: M*S*K multiply-accumulates at the
    narrower operand's width; the groups a PE holds of P and all of B are read; the
    result is written.
    """
    mesh = p.mesh
    n_groups, m_len, s_len = p.tile_shape
    s_b, k_len = b.tile_shape
    if s_b != s_len:
        raise MeshError(f"{name}: P's tile has {s_len} positions, B's {s_b}")
    macs = m_len * s_len * k_len
    dt = _narrower(p.dtype, b.dtype)
    out = DistTensor(mesh, shape, layout, dtype, None if not mesh.numeric else
                     np.zeros((mesh.rows, mesh.cols) + tile_shape_for(shape, layout, mesh.shape), NP_DTYPES[dtype]),
                     name=name, partial=partial)
    if out.tile_elems != m_len * k_len:
        raise MeshError(f"{name}: the result's tile ({out.tile_elems} values) is not {m_len} x {k_len}")
    _charge(mesh, name, compute_cycles(mesh.wafer, macs, dt), 2 * macs,
            groups_per_pe(groups) * m_len * s_len * p.itemsize + b.bytes_per_pe, out.bytes_per_pe, dtype=dt)
    if mesh.numeric:
        pt = p.tiles.astype(np.float32, copy=False)
        bt = b.tiles.astype(np.float32, copy=False)
        every = np.matmul(pt, bt[:, :, None])  # (rows, cols, G, M, K): every group x position
        g = np.broadcast_to(np.asarray(groups), (mesh.rows, mesh.cols, k_len))
        own = np.take_along_axis(every, np.where(g < 0, 0, g)[:, :, None, None, :], axis=2)[:, :, 0]
        own = own * (g >= 0)[:, :, None, :]
        out.tiles[...] = own.reshape(out.tiles.shape)
    return out


PAIR_BYTES = 2 * DTYPE_BYTES["fp32"]  # a (value, index) pair: two fp32 words


def tile_argmax(t: DistTensor, name: str = "argmax") -> DistTensor:
    """Every PE's (value, index) of the largest entry of its tile of a 1-d tensor, lowest
    index on ties; the index is into the logical tensor. Finish with :func:`allreduce_maxloc`.

    A partial input (a sum reduced to a root line, as a GEMV leaves it without its
    broadcast) is read as its logical values: the line that holds them picks the pair.
    Cost: one compare per element at the tensor's width; the pair (two fp32) is written.
    """
    if len(t.shape) != 1:
        raise MeshError(f"{name}: needs a 1-d tensor, got shape {t.shape}")
    if t.shape[0] >= 1 << 24:
        raise MeshError(f"{name}: indices beyond 2^24 are not exact in fp32")
    mesh = t.mesh
    _charge(mesh, name, vector_cycles(mesh.wafer, t.tile_elems, t.dtype), t.tile_elems, t.bytes_per_pe, PAIR_BYTES,
            dtype=t.dtype)
    tiles = None
    if mesh.numeric:
        x = t.tiles.astype(np.float32, copy=False)
        if t.partial is not None:
            axis, op = t.partial
            red = np.sum if op == "sum" else np.max
            x = np.broadcast_to(red(x, axis=AXES[axis], keepdims=True), x.shape)
        size = t.tile_shape[0]
        split = t.layout[0]
        ii, jj = np.meshgrid(np.arange(mesh.rows), np.arange(mesh.cols), indexing="ij")
        block = (t.blocks or {}).get(0, ii if split == "y" else jj) if split else np.zeros_like(ii)
        index = np.asarray(block)[..., None] * size + np.arange(size)  # (rows, cols, size) logical index
        x = np.where(index < t.shape[0], x, -np.inf)  # padding never wins
        local = np.argmax(x, axis=-1)  # first of equal values: the lowest index within a tile
        value = np.take_along_axis(x, local[..., None], axis=-1)[..., 0]
        tiles = np.stack([value, np.take_along_axis(index, local[..., None], axis=-1)[..., 0]], axis=-1)
    return DistTensor(mesh, (2,), (None,), "fp32", None if tiles is None else tiles.astype(np.float32), name=name)


def allreduce_maxloc(pair: DistTensor, axis: str, k: int = 2, name: str = "allreduce_maxloc") -> DistTensor:
    """Allreduce (value, index) pairs along ``axis`` (MPI's MAXLOC): every PE of a line gets
    the largest value and, among equal values, the lowest index.

    One collective that carries the pair: it is scheduled and costs what a max-allreduce
    of the pair's bytes does (the combine compares values, then indices).
    """
    from waferllm.mesh import comm  # comm builds on this module

    if pair.shape != (2,) or pair.layout != (None,):
        raise MeshError(f"{name}: needs (value, index) pairs of shape (2,), got {pair.shape} {pair.layout}")
    out = comm.allreduce(pair, axis, "max", k=k, name=name)
    if pair.tiles is not None:
        ax = AXES[axis]
        v = pair.tiles[..., 0]
        best = v.max(axis=ax, keepdims=True)
        index = np.where(v == best, pair.tiles[..., 1], np.inf).min(axis=ax, keepdims=True)
        combined = np.stack(np.broadcast_arrays(best, index), axis=-1)
        # the collective's own result: the combine, not an elementwise max, decides the index
        out.tiles = np.broadcast_to(combined, pair.tiles.shape).astype(np.float32)
    return out
