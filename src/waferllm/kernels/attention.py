"""Attention kernels with heads: GQA/MQA/MHA grouped *before* the local products.

Features of every attention operand are split over mesh x in a head-aware order (see
``waferllm.engine.layouts``): PE column j holds the same block of kv features F_j for
K and V, and for Q the r = Hq/Hkv query heads that share each of those kv heads, so a
PE never needs a feature another PE holds. ``head_of_pos[j, p]`` says which kv head
feature p of column j belongs to (-1 for padding).

- :func:`grouped_scores`: S = Q K^T per head with dist-GEMM-T's schedule (K rotates
  along the column ring, partials reduce-add along the row to a rotating root).
  Each PE's product touches only its own features, r x tq x tf x tk MACs.
- :func:`grouped_pv`: O = P V per head with MeshGEMM's schedule (both operands are
  activations, so both are skewed on the mesh). P tiles carry all heads, V tiles the
  column's features; out[t, r, p] = sum_k P[head(p), r, t, k] V[k, p].
"""

from __future__ import annotations

import numpy as np

from waferllm.errors import MeshError
from waferllm.kernels.gemm_t import rotating_root_schedule
from waferllm.kernels.meshgemm import cannon_schedule, ring_routes, skew_a, skew_b
from waferllm.kernels.report import KernelResult, measured
from waferllm.mesh.compute import matmul_tiles
from waferllm.mesh.tensor import NP_DTYPES, DistTensor


def _onehot(head_of_pos: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """(C, tf) head ids -> (C, tf, Hkv) one-hot (padding rows all zero)."""
    hp = np.asarray(head_of_pos)
    oh = (hp[..., None] == np.arange(num_kv_heads)).astype(np.float32)
    return oh


def grouped_scores(q: DistTensor, k: DistTensor, head_of_pos: np.ndarray, num_kv_heads: int, group: int, *,
                   ring: str = "interleave", reduce_algo: str = "ktree", name: str = "scores") -> KernelResult:
    """S [Hkv, r, Lq, Lk] (None, None, y, x) from Q [Lq, r*Fpad] and K [Lk, Fpad], both (y, x)."""
    mesh = q.mesh
    if mesh.rows != mesh.cols:
        raise MeshError("grouped dist-GEMM-T runs on a square region")
    n = mesh.rows
    tq, tqf = q.tile_shape
    tk, tf = k.tile_shape
    if tqf != group * tf:
        raise MeshError(f"{name}: Q tile has {tqf} features, expected {group} x {tf}")
    hkv, r = num_kv_heads, group
    onehot = _onehot(head_of_pos, hkv) if mesh.numeric else None  # (C, tf, Hkv)
    qt = None if q.tiles is None else q.tiles.astype(np.float32, copy=False).reshape(n, n, tq, r, tf)

    def local(kk):
        # r query heads x (tq x tf) @ (tf x tk): each feature meets only its own head's queries
        matmul_tiles(mesh, None, None, dtype=q.dtype, name="grouped_scores.tile_matmul", shapes=(tq, tf, tk, r))
        if qt is None:
            return None
        # (n,n,tq,r,tf) x (n,tf,Hkv) x (n,n,tk,tf) -> (n,n,Hkv,r,tq,tk): each feature to its head
        qh = qt[..., None] * onehot[None, :, None, None, :, :]
        return np.einsum("ijtrfg,ijkf->ijgrtk", qh, kk.tiles, optimize=True)

    with measured(mesh, "grouped_scores") as rep:
        out, k = rotating_root_schedule(k.compute_view(), local, (hkv, r), tq, algo="grouped_scores", ring=ring,
                                        reduce_algo=reduce_algo)
        res = DistTensor(mesh, (hkv, r, q.shape[0], k.shape[0]), (None, None, "y", "x"), "fp32", out, name=name)
    rep.extra.update(grid=n, heads=hkv * r)
    return KernelResult(res, rep, {"k": k})


def grouped_pv(p: DistTensor, v: DistTensor, head_of_pos: np.ndarray, *, ring: str = "interleave",
               out_dtype: str = "fp32", name: str = "attn_out") -> KernelResult:
    """O [Lq, r*Fpad] (y, x) from P [Hkv, r, Lq, Lk] (None, None, y, x) and V [Lk, Fpad] (y, x)."""
    mesh = p.mesh
    n = mesh.rows
    hkv, r, tq, tk = p.tile_shape
    tk2, tf = v.tile_shape
    if tk != tk2:
        raise MeshError(f"{name}: P key tile {tk} != V key tile {tk2}")
    hp = np.asarray(head_of_pos)
    with measured(mesh, "grouped_pv") as rep:
        mesh.routes.request("grouped_pv.rings", 2 * ring_routes(n), relayable=False)
        p = skew_a(p.compute_view(), ring)
        v = skew_b(v.compute_view(), ring)
        operands = [p, v]
        del p, v  # the schedule holds the only references to the operands it shifts
        acc = np.zeros((n, n, tq, r, tf), np.float32) if mesh.numeric else None
        if acc is not None:
            safe = np.where(hp < 0, 0, hp)  # (C, tf)
            valid = (hp >= 0).astype(np.float32)

        def local(p_, v_):
            # r query heads x (tq x tk) @ (tk x tf): each feature takes only its own head's P
            matmul_tiles(mesh, None, None, dtype=v_.dtype, name="grouped_pv.tile_matmul", shapes=(tq, tk, tf, r))
            if acc is not None:
                pt = p_.tiles  # (n,n,Hkv,r,tq,tk), float32 host view
                vt = v_.tiles  # (n,n,tk,tf)
                allh = np.einsum("ijgrtk,ijkf->ijgrtf", pt, vt, optimize=True)  # every head x feature
                # keep, for each feature, its own head: gather along g with the column's map
                sel = np.take_along_axis(allh, safe[None, :, None, None, None, :], axis=2)[:, :, 0]
                acc[...] += (sel * valid[None, :, None, None, :]).transpose(0, 1, 3, 2, 4)

        p, v = cannon_schedule(mesh, operands, local, algo="grouped_pv", steps=n, ring=ring, names=("P", "V"))
        res = DistTensor(mesh, (p.shape[2], r * n * tf), ("y", "x"), out_dtype,
                         None if acc is None else acc.reshape(n, n, tq, r * tf).astype(NP_DTYPES[out_dtype]),
                         name=name)
    rep.extra.update(grid=n)
    return KernelResult(res, rep)
