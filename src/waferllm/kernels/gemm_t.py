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
from waferllm.kernels.meshgemm import ring_routes, run_and_replay
from waferllm.kernels.report import KernelResult, measured
from waferllm.mesh import comm
from waferllm.mesh.compute import matmul_tiles
from waferllm.mesh.interleave import ring_order, ring_rank
from waferllm.mesh.tensor import NP_DTYPES, DistTensor


def rotating_root_schedule(k: DistTensor, local, part_lead: tuple, tq: int, *, algo: str, ring: str = "interleave",
                           reduce_algo: str = "ktree"):
    """dist-GEMM-T's N steps: K moves one position along the column ring per step while
    every PE's partial tile (``local(k)``, which also charges the product) is reduce-added
    along its row to the root column holding that key block.

    Returns the assembled tiles ``(n, n, *part_lead, tq, tk)`` (None in a dry run) and K,
    home again. ``part_lead``: leading dims of a partial tile (batch or heads).
    """
    mesh = k.mesh
    n = mesh.rows
    tk = k.tile_shape[-2]
    order = np.asarray(ring_order(n, ring))
    rho = ring_rank(n, ring)
    rows = np.arange(n)
    lead_layout = (None,) * len(part_lead)
    out = np.zeros((n, n, *part_lead, tq, tk), np.float32) if mesh.numeric else None
    nbytes = 4 * math.prod(part_lead) * tq * tk
    # held for the whole kernel: K's column ring and the row reduction tree
    _, tree_routes = comm.reduce_schedule(n, reduce_algo, 2, None, None, False)
    mesh.routes.request(f"{algo}.routes", ring_routes(n) + tree_routes, relayable=False)
    def step(s: int, k: DistTensor) -> DistTensor:
        root = order[(rho + s) % n]  # key block held by each row now = root column
        with mesh.ledger.overlap():
            part = local(k)
            # partial scores over this PE's feature block: summed along the row (x)
            partial = DistTensor(mesh, (*part_lead, n * tq, tk), (*lead_layout, "y", None), "fp32", part,
                                 name=f"{algo}_partial", partial=("x", "sum"))
            with mesh.ledger.concurrent():  # partials reduce along rows, K moves along columns
                red = comm.reduce(partial, "x", "sum", algo=reduce_algo, root=root, allreduce=False,
                                  name=f"{algo}.reduce", pipelined=True)
                k = comm.ring_shift(k, "y", -1, ring=ring, name=f"{algo}.shift_K")
        mesh.ledger.charge(f"{algo}.step", "overhead", mesh.wafer.step_overhead_cycles)
        if out is not None:
            out[rows, root] = red.tiles[rows, root]
        return k

    if not mesh.numeric and n > 2:
        # shapes only: every step shifts the same K tiles one ring position and reduces partials
        # of one shape to a root per row (the roots only permute), so from the second on each
        # step costs what the second did: it is run once and replayed
        home = k
        k = step(0, k)
        run_and_replay(mesh, lambda: step(1, k), n - 2, f"{algo}.steps (replayed)")
        k = home  # n shifts bring K home
    else:
        for s in range(n):
            k = step(s, k)
    # the reductions were pipelined step after step: the last one's latency remains
    mesh.ledger.charge(f"{algo}.reduce_tail", "comm", comm.pipeline_tail(mesh, n, nbytes, reduce_algo,
                                                                                axis="x"))
    return out, k


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
    shape = (*lead, q.shape[-2], k.shape[-2])
    layout = (*(None,) * len(lead), "y", "x")

    def local(kk):
        return matmul_tiles(mesh, q.tiles, kk.tiles, transpose_b=True, dtype=q.dtype,
                            name="dist_gemm_t.tile_matmul", shapes=(tq, td, tk, batch))

    with measured(mesh, "dist_gemm_t") as rep:
        s_tiles, k = rotating_root_schedule(k, local, lead, tq, algo="dist_gemm_t", ring=ring,
                                            reduce_algo=reduce_algo)
        out = DistTensor(mesh, shape, layout, out_dtype,
                         None if s_tiles is None else s_tiles.astype(NP_DTYPES[out_dtype]), name=name)
    rep.extra.update(m=q.shape[-2], k=q.shape[-1], n=k.shape[-2], grid=n, batch=batch)
    return KernelResult(out, rep, {"k": k})
