"""RMSNorm fused into the MeshGEMV that follows it: one collective instead of two.

RMSNorm(h) @ W = ((h * g) @ W) / rms(h), and rms(h) is one scalar per token, so the
normalisation can wait until after the product. Every PE computes its partial product
(h * g) @ W_tile and its partial sum of squares of h; ONE reduce along the features' axis
carries [partials | sum of squares] (one word more per token), and every PE then scales
its output block by rsqrt(sum / E + eps). Decode uses it for attn_norm + QKV and
ffn_norm + gate/up: the RMSNorm's own allreduce (and its task switches) disappear.

Layouts as :func:`waferllm.kernels.meshgemv.gemv`: h [K] (a,) or a batch [B, K] (None, a)
with W [K, N] (a, b) gives y [N] (b,) or [B, N] (None, b), complete on every PE; W may be
block-quantised (int8 / int4), dequantised by the PEs in the local product.
"""

from __future__ import annotations

import numpy as np

from waferllm.errors import MeshError
from waferllm.kernels.layer_ops import under
from waferllm.kernels.meshgemv import local_gemv, plan_segments
from waferllm.kernels.report import KernelResult, measured
from waferllm.mesh import comm, compute
from waferllm.mesh.compute import matmul_tiles
from waferllm.mesh.tensor import DistTensor, QuantTensor


def norm_gemv(h: DistTensor, norm_weight: DistTensor, w: DistTensor, eps: float, *, k=2, group: int | None = None,
              out_dtype: str = "fp32", name: str = "y", segments=1) -> KernelResult:
    """RMSNorm(h; ``norm_weight``, ``eps``) @ W on the mesh with one allreduce (K-tree ``k``,
    ``group``; ``k="tuned"``: both chosen for the payload by :func:`comm.best_ktree`), streamed
    in ``segments`` as :func:`waferllm.kernels.meshgemv.gemv` streams its own."""
    mesh = h.mesh
    red_axis, out_axis = _check(h, norm_weight, w)
    batch = h.shape[0] if len(h.shape) == 2 else None
    features = h.shape[-1]
    tk, tn = w.tile_shape
    quant = w if isinstance(w, QuantTensor) else None
    dtype = quant.compute_dtype if quant else w.dtype
    # the sum of squares rides the last segment of the reduce: one value more per token
    widths, kk, gg = plan_segments(mesh, red_axis, batch or 1, tk, tn, dtype, quant, k, group, segments, extra=1)

    def product(c):  # chunk c of the output columns of every PE's (h * g) @ W_tile (computed below)
        matmul_tiles(mesh, None, None, dtype=dtype, name="norm_gemv.local_gemv", shapes=(batch or 1, tk, widths[c]),
                     dequant=quant)

    with measured(mesh, "norm_gemv") as rep:
        # one pass over h: its sum of squares and h * g, the GEMV's input (both partial work of this PE)
        ss = compute.tile_reduce(h, -1, "sumsq", name=f"{name}.sumsq")  # [.., 1], partial along red_axis
        xg = compute.elementwise(lambda a, g: a * under(g, a), h, norm_weight, name=f"{name}.gain", dtype="fp32")
        part = local_gemv(xg, w, red_axis)  # [.., tn] per PE: every chunk's values at once
        mesh.sram.release(xg)
        lead = () if batch is None else (batch,)
        tiles = None if part is None else np.concatenate([part, ss.tiles.astype(np.float32)], axis=-1)
        # [partials | sum of squares] per token: both are sums along red_axis, so one sum-reduce carries them
        packed = DistTensor(mesh, lead + (mesh.axis_size(out_axis) * (tn + 1),), (None,) * len(lead) + (out_axis,),
                            "fp32", tiles, name=f"{name}_partial", partial=(red_axis, "sum"))
        mesh.sram.release(ss)
        summed = comm.reduce_stream(packed, red_axis, widths[:-1] + [widths[-1] + 1], product, "sum", algo="ktree",
                                    k=kk, group=gg, allreduce=True, name="norm_gemv.allreduce")
        mesh.sram.release(packed)
        y, sq = _split(summed, w.shape[1], tn, out_axis, lead)
        # one reciprocal square root per token, then a multiply per output: a division's cost
        out = compute.elementwise(lambda a, s: a / np.sqrt(s / features + eps), y, sq, ops_per_elem=mesh.wafer.ops_div,
                                  name=f"{name}.scale", dtype=out_dtype)
        mesh.sram.release(summed)
    rep.extra.update(k=w.shape[0], n=w.shape[1], grid=mesh.axis_size(red_axis), reduce_axis=red_axis,
                     output_axis=out_axis, batch=batch or 1, ktree=(kk, gg), segments=len(widths))
    return KernelResult(out, rep)


def _check(h: DistTensor, g: DistTensor, w: DistTensor) -> tuple[str, str]:
    if len(w.shape) != 2 or len(h.shape) not in (1, 2):
        raise MeshError(f"norm_gemv needs h [K] (or a batch [B, K]) and W [K, N]; got {h.shape} and {w.shape}")
    red_axis, out_axis = w.layout
    if {red_axis, out_axis} != {"y", "x"}:
        raise MeshError(f"norm_gemv needs W (y, x) or (x, y); got {w.layout}")
    want = (red_axis,) if len(h.shape) == 1 else (None, red_axis)
    if h.layout != want or g.layout != (red_axis,):
        raise MeshError(f"norm_gemv needs h {want} and its norm weight ({red_axis},) for W {w.layout}; "
                        f"got h {h.layout}, weight {g.layout}")
    if h.shape[-1] != w.shape[0] or g.shape != (w.shape[0],):
        raise MeshError(f"norm_gemv: h has {h.shape[-1]} features, the norm weight {g.shape}, W {w.shape[0]} rows")
    if h.partial is not None:
        raise MeshError(f"norm_gemv: {h.name} is partial along {h.partial[0]}; finish it first")
    return red_axis, out_axis


def _split(t: DistTensor, n: int, tn: int, axis: str, lead: tuple) -> tuple[DistTensor, DistTensor]:
    """The reduced [partials | sum of squares]: y [.., N] (.., axis) and the sums [.., 1]; address
    ranges of ``t`` (no SRAM of their own)."""
    mesh = t.mesh
    y = DistTensor(mesh, lead + (n,), (None,) * len(lead) + (axis,), "fp32",
                   None if t.tiles is None else t.tiles[..., :tn], name="norm_gemv.sum", charge_sram=False)
    sq = DistTensor(mesh, lead + (1,), (None,) * (len(lead) + 1), "fp32",
                    None if t.tiles is None else t.tiles[..., tn:], name="norm_gemv.sumsq", charge_sram=False)
    return y, sq


__all__ = ["norm_gemv"]
