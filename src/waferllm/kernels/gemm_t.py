"""dist-GEMM-T: S = Q @ K^T on the mesh without transposing K.

Q [Lq, d] and K [Lk, d] both have layout (y, x): rows of PEs hold blocks of
queries/keys, columns hold blocks of features. Q stays put. At step s, row i holds
key block b(i, s) = order[rho(i) + s] (K travels one position along the column ring
per step, at most 2 hops, no skew). Every PE forms its partial scores
Q(i, j) @ K(b, j)^T over its feature block, and the partials are reduce-added along
the row to the root PE (i, b), which rotates each step so that consecutive reductions
do not queue at one PE: they are pipelined, each step paying the time a reduction keeps
its busiest PE occupied, and the stream its latency once. After N steps PE (i, r) holds
S(i, r): the (y, x) layout that the next GEMM (S @ V) takes as its A operand.
"""

from __future__ import annotations

import math

import numpy as np

from waferllm.errors import MeshError
from waferllm.kernels.report import KernelResult, measured
from waferllm.mesh import comm
from waferllm.mesh.compute import matmul_tiles
from waferllm.mesh.interleave import ring_order, ring_rank
from waferllm.mesh.tensor import NP_DTYPES, DistTensor


def dist_gemm_t(q: DistTensor, k: DistTensor, *, ring: str = "interleave", reduce_algo: str = "ktree",
                out_dtype: str = "fp32", name: str = "S") -> KernelResult:
    """S = Q @ K^T. Batch dims (e.g. heads) may lead the last two, unsplit."""
    mesh = q.mesh
    if mesh.rows != mesh.cols:
        raise MeshError(f"dist-GEMM-T runs on a square region; got {mesh.rows}x{mesh.cols}")
    n = mesh.rows
    if q.layout[-2:] != ("y", "x") or k.layout[-2:] != ("y", "x"):
        raise MeshError(f"dist-GEMM-T: Q and K need layout (..., y, x); got {q.layout}, {k.layout}")
    if q.shape[-1] != k.shape[-1] or q.shape[:-2] != k.shape[:-2]:
        raise MeshError(f"dist-GEMM-T: Q {q.shape} and K {k.shape} disagree")
    lead = q.shape[:-2]
    batch = math.prod(lead)
    tq, td = q.tile_shape[-2:]
    tk = k.tile_shape[-2]
    order = np.asarray(ring_order(n, ring))
    rho = ring_rank(n, ring)
    shape = (*lead, q.shape[-2], k.shape[-2])
    layout = (*(None,) * len(lead), "y", "x")
    with measured(mesh, "dist_gemm_t", routes_per_pe=3 + 3) as rep:
        s_tiles = np.zeros((n, n, *lead, tq, tk), np.float32) if mesh.numeric else None
        rows = np.arange(n)
        for s in range(n):
            b_of_row = order[(rho + s) % n]  # key block held by each row now = root column
            with mesh.ledger.overlap():
                part = matmul_tiles(mesh, q.tiles, k.tiles, transpose_b=True, dtype=q.dtype,
                                    name="dist_gemm_t.tile_matmul", shapes=(tq, td, tk, batch))
                # partial scores over this PE's feature block: summed along the row (x)
                partial = DistTensor(mesh, (*lead, n * tq, tk), (*(None,) * len(lead), "y", None), "fp32", part,
                                     name="S_partial", partial=("x", "sum"))
                with mesh.ledger.concurrent():  # partials reduce along rows, K moves along columns
                    red = comm.reduce(partial, "x", "sum", algo=reduce_algo, root=b_of_row, allreduce=False,
                                      name="dist_gemm_t.reduce", pipelined=True)
                    k = comm.ring_shift(k, "y", -1, ring=ring, name="dist_gemm_t.shift_K")
            mesh.ledger.charge("dist_gemm_t.step", "overhead", mesh.wafer.step_overhead_cycles)
            if s_tiles is not None:
                s_tiles[rows, b_of_row] = red.tiles[rows, b_of_row]
            del red, partial
        # the reductions were pipelined step after step: the last one's latency remains
        mesh.ledger.charge("dist_gemm_t.reduce_tail", "comm", comm.pipeline_tail(mesh, n, 4 * batch * tq * tk, reduce_algo))
        out = DistTensor(mesh, shape, layout, out_dtype,
                         None if s_tiles is None else s_tiles.astype(NP_DTYPES[out_dtype]), name=name)
    rep.extra.update(m=q.shape[-2], k=q.shape[-1], n=k.shape[-2], grid=n, batch=batch)
    return KernelResult(out, rep, {"k": k})
