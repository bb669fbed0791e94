"""MeshGEMM: Cannon's cyclic shifting on INTERLEAVE rings, for prefill's C = A @ B.

PE (i, j) of an N x N region owns tiles of A [M, K] (layout y, x), B [K, N] (y, x)
and C. Let rho(p) be position p's rank on the INTERLEAVE ring. At step s, PE (i, j)
must hold A(i, kappa) and B(kappa, j) for the same kappa = order[rho(i) + rho(j) + s]:
- B is pre-skewed when it is placed (weights are placed once): column j starts
  rotated by rho(j) ring steps (``place_b``).
- A is skewed on the mesh: row i is rotated by rho(i) ring steps, which the ring
  does in at most floor(N/2) rounds since a line may turn either way.
- Each of the N steps multiplies the current tiles while the next ones travel one ring
  position (at most 2 hops): step time = max(compute, shift) + step overhead. After N
  steps every operand is back where it started, so a skewed A can be reused by the
  next GEMM that shares it (Q, K, V; gate, up) and B stays placed.
With ``ring="plain"`` the same code is Cannon on a mesh (its wrap-around is N-1 hops).
"""

from __future__ import annotations

import numpy as np

from waferllm.errors import MeshError
from waferllm.kernels.report import KernelResult, measured
from waferllm.mesh import comm
from waferllm.mesh.compute import matmul_tiles
from waferllm.mesh.interleave import ring_order, ring_rank
from waferllm.mesh.tensor import NP_DTYPES, DistTensor


def _square(mesh, algo):
    if mesh.rows != mesh.cols:
        raise MeshError(f"{algo} runs on a square region; got {mesh.rows}x{mesh.cols} (use a square sub-region)")
    return mesh.rows


def skew_blocks(n: int, ring: str, operand: str) -> dict:
    """Block map of a pre-skewed operand: which logical block each PE holds."""
    order = np.asarray(ring_order(n, ring))
    rho = ring_rank(n, ring)
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    kappa = order[(rho[ii] + rho[jj]) % n]
    return {0: kappa, 1: jj} if operand == "B" else {0: ii, 1: kappa}


def place_b(mesh, b, dtype="fp16", ring="interleave", name="B") -> DistTensor:
    """Place a weight [K, N] pre-skewed for MeshGEMM (placement itself is not charged)."""
    n = _square(mesh, "MeshGEMM")
    return mesh.place(b, ("y", "x"), dtype, name=name, blocks=skew_blocks(n, ring, "B") if mesh.numeric else None)


def skew_a(a: DistTensor, ring: str = "interleave", name="skew_A") -> DistTensor:
    """Rotate row i of A by rho(i) ring positions (at most floor(N/2) rounds)."""
    n = _square(a.mesh, "MeshGEMM")
    rho = ring_rank(n, ring)
    return comm.ring_shift(a, "x", -rho, ring=ring, name=name)


def meshgemm(a: DistTensor, b: DistTensor, *, ring: str = "interleave", a_skewed: bool = False,
             out_dtype: str | None = None, algo: str | None = None, name: str = "C") -> KernelResult:
    """C = A @ B with A [M, K] (y, x) and B [K, N] (y, x) pre-skewed by :func:`place_b`.

    Pass ``a_skewed=True`` with the ``state["a_skewed"]`` of a previous call to reuse
    its skew. The result C [M, N] has layout (y, x) in the plain block order.
    """
    mesh = a.mesh
    n = _square(mesh, "MeshGEMM")
    algo = algo or ("meshgemm" if ring == "interleave" else "cannon")
    if a.layout != ("y", "x") or b.layout != ("y", "x"):
        raise MeshError(f"{algo}: A and B need layout (y, x); got {a.layout}, {b.layout}")
    if a.shape[1] != b.shape[0]:
        raise MeshError(f"{algo}: inner dims differ: A {a.shape} x B {b.shape}")
    out_dtype = out_dtype or a.dtype
    m_t, k_t = a.tile_shape
    n_t = b.tile_shape[1]
    if b.tile_shape[0] != k_t:
        raise MeshError(f"{algo}: tile K sizes differ ({k_t} vs {b.tile_shape[0]})")
    # three routes per ring (send, receive, pass-through), one ring per operand
    with measured(mesh, algo, routes_per_pe=6) as rep:
        if not a_skewed:
            a = skew_a(a, ring)
        skewed = a
        acc = mesh.zeros((a.shape[0], b.shape[1]), ("y", "x"), "fp32", name=f"{name}_acc")
        acc_tiles = acc.tiles
        for s in range(n):
            with mesh.ledger.overlap():
                acc_tiles = matmul_tiles(mesh, a.tiles, b.tiles, acc_tiles, dtype=a.dtype, name=f"{algo}.tile_matmul",
                                         shapes=(m_t, k_t, n_t))
                # next tiles travel while this product runs (double buffering); the N-th
                # shift brings every operand home.
                a = comm.ring_shift(a, "x", -1, ring=ring, name=f"{algo}.shift_A")
                b_next = comm.ring_shift(b, "y", -1, ring=ring, name=f"{algo}.shift_B")
            mesh.ledger.charge(f"{algo}.step", "overhead", mesh.wafer.step_overhead_cycles)
            b = b_next
        out = DistTensor(mesh, (a.shape[0], b.shape[1]), ("y", "x"), out_dtype,
                         None if acc_tiles is None else acc_tiles.astype(NP_DTYPES[out_dtype]), name=name)
        del acc
    rep.extra.update(m=a.shape[0], k=a.shape[1], n=b.shape[1], grid=n, skew_rounds=n // 2)
    return KernelResult(out, rep, {"a_skewed": skewed, "b": b})
