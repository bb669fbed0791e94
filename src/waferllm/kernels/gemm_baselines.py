"""GEMM baselines on the same runtime, each honest about its routes and hops.

- SUMMA (the vendor default): at step k, the PEs of column k broadcast their A tiles
  along their rows and the PEs of row k broadcast their B tiles along their columns;
  every PE accumulates. A root per step means one route per root through every PE
  (N in all): past the router's budget the broadcasts are relayed in software.
  Receive buffers double the operands' memory.
- Cannon on a mesh: MeshGEMM's schedule on the plain ring (N-1 hop wrap-around); see
  :func:`waferllm.kernels.meshgemm.meshgemm` with ``ring="plain"``.
- Allgather GEMM (GPU/TPU style): every PE gathers its whole row block of A and column
  block of B over N-1 ring steps, each a 2-hop transfer to its ring neighbour, then does
  one local product. The pattern needs N routes per PE: within the router's budget each
  transfer runs on hardware routes; past it every hop is a software relay (as for
  broadcast). Its O(1/N) memory per PE is what breaks first.
"""

from __future__ import annotations

import numpy as np

from waferllm.errors import MeshError
from waferllm.kernels.meshgemm import meshgemm
from waferllm.kernels.report import KernelResult, measured
from waferllm.mesh import comm
from waferllm.mesh.compute import matmul_tiles
from waferllm.mesh.interleave import ring_max_hops
from waferllm.mesh.tensor import NP_DTYPES, DistTensor


def summa(a: DistTensor, b: DistTensor, *, out_dtype: str | None = None, name: str = "C") -> KernelResult:
    mesh = a.mesh
    if mesh.rows != mesh.cols:
        raise MeshError("SUMMA here runs on a square region")
    n = mesh.rows
    out_dtype = out_dtype or a.dtype
    m_t, k_t = a.tile_shape
    n_t = b.tile_shape[1]
    with measured(mesh, "summa") as rep:
        acc = mesh.zeros((a.shape[0], b.shape[1]), ("y", "x"), "fp32", name=f"{name}_acc")
        acc_tiles = acc.tiles
        for k in range(n):
            with mesh.ledger.concurrent():  # row and column broadcasts use disjoint links
                a_k = comm.broadcast(a, "x", k, routes_per_pe=n, name="summa.bcast_A")
                b_k = comm.broadcast(b, "y", k, routes_per_pe=n, name="summa.bcast_B")
            # SUMMA's product needs the tiles just received: it cannot hide them
            acc_tiles = matmul_tiles(mesh, a_k.tiles, b_k.tiles, acc_tiles, dtype=a.dtype, name="summa.tile_matmul",
                                     shapes=(m_t, k_t, n_t))
            mesh.ledger.charge("summa.step", "overhead", mesh.wafer.step_overhead_cycles)
            del a_k, b_k
        out = DistTensor(mesh, (a.shape[0], b.shape[1]), ("y", "x"), out_dtype,
                         None if acc_tiles is None else acc_tiles.astype(NP_DTYPES[out_dtype]), name=name)
        del acc
    rep.extra.update(m=a.shape[0], k=a.shape[1], n=b.shape[1], grid=n)
    return KernelResult(out, rep)


def cannon(a: DistTensor, b: DistTensor, **kw) -> KernelResult:
    """Cannon on a mesh: B must be placed with ``place_b(..., ring="plain")``."""
    return meshgemm(a, b, ring="plain", algo="cannon", **kw)


def allgather_gemm(a: DistTensor, b: DistTensor, *, out_dtype: str | None = None, name: str = "C") -> KernelResult:
    mesh = a.mesh
    n = mesh.rows
    if mesh.rows != mesh.cols:
        raise MeshError("allgather GEMM here runs on a square region")
    out_dtype = out_dtype or a.dtype
    m_t, k_t = a.tile_shape
    n_t = b.tile_shape[1]
    with measured(mesh, "allgather") as rep:
        hardware = mesh.routes.request("allgather", n)
        # whole row block of A [m_t, K] and column block of B [K, n_t] on every PE
        a_row = DistTensor(mesh, (a.shape[0], n * k_t), ("y", None), a.dtype,
                           None if a.tiles is None else np.broadcast_to(
                               a.tiles.transpose(0, 2, 1, 3).reshape(n, 1, m_t, n * k_t), (n, n, m_t, n * k_t)),
                           name="A_rows")
        b_col = DistTensor(mesh, (n * k_t, b.shape[1]), (None, "x"), b.dtype,
                           None if b.tiles is None else np.broadcast_to(
                               b.tiles.transpose(1, 0, 2, 3).reshape(1, n, n * k_t, n_t), (n, n, n * k_t, n_t)),
                           name="B_cols")
        hops = ring_max_hops(n, "interleave")
        stages = 0 if hardware else hops
        if not hardware:
            mesh.ledger.note(f"allgather: {n} routes/PE exceed the router's {mesh.routes.budget}; relayed in software")
        if n > 1:
            # every step, A's tiles move along the rows and B's along the columns at once
            with mesh.ledger.concurrent():
                for t, label, axis in ((a, "allgather.gather_A", "x"), (b, "allgather.gather_B", "y")):
                    comm.charge_messages(mesh, label, t.bytes_per_pe, hops, stages=stages, rounds=n - 1,
                                         relayed=not hardware, axis=axis, routes=n)
        acc = matmul_tiles(mesh, a_row.tiles, b_col.tiles, dtype=a.dtype, name="allgather.tile_matmul",
                           shapes=(m_t, n * k_t, n_t))
        out = DistTensor(mesh, (a.shape[0], b.shape[1]), ("y", "x"), out_dtype,
                         None if acc is None else acc.astype(NP_DTYPES[out_dtype]), name=name)
        del a_row, b_col
    rep.extra.update(m=a.shape[0], k=a.shape[1], n=b.shape[1], grid=n)
    return KernelResult(out, rep)
