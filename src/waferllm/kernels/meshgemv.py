"""MeshGEMV and its baselines: decode's y = x @ W.

W [K, N] is 2D-partitioned. The input x is split over the same mesh axis as W's K
dim and replicated along the other axis, so every PE multiplies its x segment by its
W tile (a local partial GEMV) and the partials are summed along the K axis by an
allreduce: the K-tree for MeshGEMV, a pipeline (the vendor demo's) or a ring for the
baselines. With the broadcast back, every PE of line j holds y_j: **the output is
indexed along the other axis** (x along y in -> y along x out), which is what lets
decode alternate reduce axes and never transpose.

Layouts: W (y, x) with x (y,) -> y (x,); or W (x, y) with x (x,) -> y (y,).

A batch of B vectors (decode of several requests at once) is x [B, K] with layout
(None, axis): every PE holds the B segments of its line, the local product becomes a
skinny B x tk by tk x tn GEMM, and one reduce carries the B partial rows: the weights are
read once per step and the collective's fixed costs are paid once for the batch.

W may be stored block-quantised (a :class:`QuantTensor`, int8 or int4 with fp16 block
scales): each PE dequantises its tile in its SIMD unit as part of the local product.
"""

from __future__ import annotations

import math

import numpy as np

from waferllm.errors import MeshError
from waferllm.kernels.report import KernelResult, measured
from waferllm.mesh import comm
from waferllm.mesh.compute import dequant_ops_per_pe, matmul_tiles
from waferllm.mesh.cost import compute_cycles
from waferllm.mesh.tensor import DistTensor, QuantTensor

GEMV_ALGOS = {"meshgemv": "ktree", "pipeline": "pipeline", "ring": "ring"}


def gemv(x: DistTensor, w: DistTensor, *, algo: str = "meshgemv", k: int = 2, group: int | None = None,
         broadcast: bool = True, out_dtype: str | None = None, name: str = "y", segments=1) -> KernelResult:
    """y = x @ W on the mesh; ``algo`` is meshgemv (K-tree), pipeline or ring.

    ``segments`` > 1 (or "tuned": :func:`plan_segments` picks it): the local product runs in
    that many chunks of output columns and the reduce delivers each as its own segment, so
    the product of chunk c+1 overlaps the reduce of chunk c (:func:`comm.reduce_stream`)."""
    if algo not in GEMV_ALGOS:
        raise MeshError(f"unknown GEMV algorithm {algo!r}; expected one of {', '.join(GEMV_ALGOS)}")
    mesh = x.mesh
    if len(w.shape) != 2 or len(x.shape) not in (1, 2):
        raise MeshError(f"GEMV needs x [K] (or a batch [B, K]) and W [K, N]; got {x.shape} and {w.shape}")
    if x.shape[-1] != w.shape[0]:
        raise MeshError(f"GEMV: x has {x.shape[-1]} elements, W has {w.shape[0]} rows")
    red_axis = w.layout[0]
    batch = x.shape[0] if len(x.shape) == 2 else None
    x_layout = (red_axis,) if batch is None else (None, red_axis)
    if red_axis not in ("y", "x") or w.layout[1] not in ("y", "x") or x.layout != x_layout:
        raise MeshError(f"GEMV needs W (y, x) with x (y,) or W (x, y) with x (x,) (a batch: (None, y) or "
                        f"(None, x)); got W {w.layout}, x {x.layout}")
    out_axis = w.layout[1]
    out_shape, out_layout = ((w.shape[1],), (out_axis,)) if batch is None else ((batch, w.shape[1]), (None, out_axis))
    out_dtype = out_dtype or x.dtype
    tk, tn = w.tile_shape
    quant = w if isinstance(w, QuantTensor) else None
    dtype = quant.compute_dtype if quant else w.dtype
    # k "tuned": the K-tree the cost model picks for this payload (each segment's) and line
    widths, k, group = plan_segments(mesh, red_axis, batch or 1, tk, tn, dtype, quant, k, group, segments,
                                     allreduce=broadcast, algo=GEMV_ALGOS[algo])

    def product(c):
        # every PE: its x segment times chunk c of its W tile's columns (charged here, computed
        # below); a block-quantised W is dequantised in the PE first, in the same op
        matmul_tiles(mesh, None, None, dtype=dtype, name=f"{algo}.local_gemv", shapes=(batch or 1, tk, widths[c]),
                     dequant=quant)

    with measured(mesh, algo) as rep:
        # the values of every chunk at once: a column of the product is the same sum either way
        partial = DistTensor(mesh, out_shape, out_layout, "fp32", local_gemv(x, w, red_axis),
                             name=f"{name}_partial", partial=(red_axis, "sum"))
        y = comm.reduce_stream(partial, red_axis, widths, product, "sum", algo=GEMV_ALGOS[algo], k=k, group=group,
                               allreduce=broadcast, name=f"{algo}.allreduce" if broadcast else f"{algo}.reduce")
        if out_dtype != "fp32":
            y = y.with_tiles(None if y.tiles is None else y.tiles.astype("float16" if out_dtype == "fp16" else "float32"),
                             dtype=out_dtype, name=name)
    n = mesh.axis_size(red_axis)
    rep.extra.update(k=w.shape[0], n=w.shape[1], grid=n, reduce_axis=red_axis, output_axis=out_axis, batch=batch or 1,
                     segments=len(widths))
    return KernelResult(y, rep)


def plan_segments(mesh, axis: str, rows: int, tk: int, tn: int, dtype: str, quant, k, group, segments,
                  allreduce: bool = True, algo: str = "ktree", extra: int = 0, most: int = 16):
    """(widths, k, group): the output-column chunks of a local product of ``rows`` x ``tk`` by
    ``tk`` x ``tn`` per PE whose reduce (``extra`` more values riding the last segment) is
    streamed along ``axis``, and the K-tree of that stream (``k="tuned"``: chosen for one
    segment's payload). ``segments="tuned"``: the count, up to ``most``, whose stream the
    cost model prices fastest, as :func:`comm.best_ktree` does for K. Each segment pays its
    own product launch and messages, so fine streams of small tiles cost more than they hide."""
    if segments != "tuned":
        widths = _widths(tn, int(segments))
        k, group = comm.ktree_for(mesh, axis, 4 * rows * (widths[0] + extra), k, group, allreduce=allreduce)
        return widths, k, group
    key = (axis, rows, tk, tn, dtype, None if quant is None else quant.dtype, k, group, allreduce, algo, extra, most)
    cache = mesh.cache("gemv_segments")
    if key not in cache:
        best = None
        for s in range(1, min(tn, most) + 1):
            widths, kk, gg = plan_segments(mesh, axis, rows, tk, tn, dtype, quant, k, group, s, allreduce, algo, extra)
            cycles = _stream_cycles(mesh, axis, rows, tk, widths, dtype, quant, kk, gg, allreduce, algo, extra)
            if best is None or cycles < best[0]:  # ties keep fewer segments
                best = (cycles, widths, kk, gg)
        cache[key] = best[1:]
    return cache[key]


def _widths(tn: int, segments: int) -> list[int]:
    """``tn`` columns in ``segments`` chunks as even as they go (the wider first)."""
    if not 1 <= segments <= tn:
        raise MeshError(f"cannot cut a tile of {tn} columns into {segments} segments")
    q, r = divmod(tn, segments)
    return [q + (i < r) for i in range(segments)]


def _stream_cycles(mesh, axis, rows, tk, widths, dtype, quant, k, group, allreduce, algo, extra) -> float:
    """The cycles :func:`comm.reduce_stream` would charge for these chunks: the first product,
    then each step the slower of the next product and this segment's occupancy, then the
    last segment's latency (priced with the functions the executed primitives charge with)."""
    w = mesh.wafer
    prod, lat, occ = [], [], []
    for c, width in enumerate(widths):
        cyc = compute_cycles(w, rows * tk * width, dtype)
        if quant is not None and cyc:  # the PE dequantises the chunk's values first (see matmul_tiles)
            cyc += math.ceil(dequant_ops_per_pe(w, quant, tk * width) / w.macs_per_cycle(dtype))
        prod.append(cyc)
        seg = width + (extra if c == len(widths) - 1 else 0)
        a, b = comm.stream_cycles(mesh, axis, 4 * rows * seg, algo, k, group, allreduce)
        lat.append(a)
        occ.append(b)
    if len(widths) == 1:
        return prod[0] + lat[0]
    return prod[0] + sum(max(p, o) for p, o in zip(prod[1:], occ)) + max(lat[-1], occ[-1])


def local_gemv(x, w, red_axis):
    """Numerics of the local products, PE by PE, computed line by line on the host.

    x is replicated along the other axis, so the products of one line of PEs are one
    vector-matrix product with that line's W tiles side by side: the same sums, in far
    fewer BLAS calls than one per PE. A batch's B segments are B rows of the same product.
    """
    if x.tiles is None:
        return None
    r, c = x.tiles.shape[:2]
    tk, tn = w.tile_shape
    xt = x.tiles.astype(np.float32, copy=False)
    if xt.ndim == 3:
        xt = xt[:, :, None, :]  # one vector: a batch of one, [r, c, 1, tk]
        return _local_gemm(xt, w, red_axis, r, c, tk, tn)[:, :, 0]
    return _local_gemm(xt, w, red_axis, r, c, tk, tn)


def _local_gemm(xt, w, red_axis, r, c, tk, tn):
    """xt [r, c, B, tk] (the same along the other axis) times every PE's W tile: [r, c, B, tn].

    Each of the B rows is its own BLAS call of the one-vector shape: a batched GEMM may sum
    in another order, and a request's logits must not depend on who it is batched with."""
    if xt.shape[2] > 1:
        return np.concatenate([_local_gemm(xt[:, :, b:b + 1], w, red_axis, r, c, tk, tn)
                               for b in range(xt.shape[2])], axis=2)
    # a quantised W multiplies with its dequantised values
    values = w.dequantized_tiles if isinstance(w, QuantTensor) else (lambda: w.tiles.astype(np.float32))
    if red_axis == "y":  # x_i is the same on every PE of row i
        wr = w.host_layout("gemv_rows", lambda t: np.ascontiguousarray(
            values().transpose(0, 2, 1, 3).reshape(r, tk, c * tn)))
        b = xt.shape[2]
        # [r, B, tk] @ [r, tk, c*tn] -> [r, B, c, tn] -> [r, c, B, tn]
        return np.matmul(xt[:, 0], wr).reshape(r, b, c, tn).transpose(0, 2, 1, 3)
    wc = w.host_layout("gemv_cols", lambda t: np.ascontiguousarray(
        values().transpose(1, 2, 0, 3).reshape(c, tk, r * tn)))
    b = xt.shape[2]
    # [c, B, tk] @ [c, tk, r*tn] -> [c, B, r, tn] -> [r, c, B, tn]
    return np.matmul(xt[0], wc).reshape(c, b, r, tn).transpose(2, 0, 1, 3)


def meshgemv(x, w, **kw) -> KernelResult:
    return gemv(x, w, algo="meshgemv", **kw)
