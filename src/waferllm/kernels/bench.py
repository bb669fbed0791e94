"""One kernel benchmark point, and sweeps of them: the library behind `waferllm bench` and
``benchmarks/kernels.py``.

A point runs one GEMM or GEMV algorithm on a fresh rows x cols region: numerically
(seeded random inputs, checked against numpy) or shapes only (``dry_run``); both charge
the same cycles. A point that does not fit (SRAM, routes under policy ``raise``) comes
back with the error's message instead of raising, so a sweep never stops half-way.
"""

from __future__ import annotations

import time

import numpy as np

from waferllm.errors import HardwareError, MeshError, WaferLLMError
from waferllm.hardware import get_wafer
from waferllm.hardware.gpu import get_gpu
from waferllm.hardware.plmr import DTYPE_BYTES, WaferSpec
from waferllm.kernels.gemm_baselines import allgather_gemm, cannon, summa
from waferllm.kernels.meshgemm import meshgemm, meshgemm_rect, place_b
from waferllm.kernels.meshgemv import gemv
from waferllm.mesh import Mesh, Region

GEMM_ALGOS = ("meshgemm", "cannon", "summa", "allgather")
GEMV_ALGOS = ("meshgemv", "pipeline", "ring")
RECT_OK = ("meshgemm", "cannon")  # GEMMs that fold onto a non-square region
RTOL = {"fp32": 1e-4, "fp16": 2e-3}  # of max(|A| @ |B|): fp32 accumulation / fp16 output rounding


class VerificationError(WaferLLMError):
    """A kernel's numeric result differs from numpy by more than the dtype's tolerance."""


def check_algos(op: str, algos: list[str]) -> list[str]:
    known = GEMM_ALGOS if op == "gemm" else GEMV_ALGOS
    bad = [a for a in algos if a not in known]
    if bad:
        raise MeshError(f"unknown {op} algorithm(s) {', '.join(bad)}; expected one of {', '.join(known)}")
    return algos


def tolerance(a: np.ndarray, b: np.ndarray, dtype: str) -> float:
    """The largest |error| accepted for ``a @ b`` in ``dtype``: RTOL of max(|a| @ |b|)."""
    scale = float((np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))).max()) if a.size and b.size else 0.0
    return RTOL[dtype] * max(scale, 1e-30) + 1e-30


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """The input as the mesh holds it (rounded to dtype), in float64 for the reference."""
    return np.asarray(x, dtype=np.float16 if dtype == "fp16" else np.float32).astype(np.float64)


def _gemm(mesh, algo, m, k, n, dtype, rng):
    numeric = mesh.numeric
    A = rng.uniform(-1, 1, (m, k)).astype(np.float32) if numeric else (m, k)
    B = rng.uniform(-1, 1, (k, n)).astype(np.float32) if numeric else (k, n)
    if mesh.rows != mesh.cols:
        res = meshgemm_rect(mesh, A, B, dtype=dtype, ring="interleave" if algo == "meshgemm" else "plain")
    else:
        a = mesh.place(A, ("y", "x"), dtype, name="A")
        if algo in ("meshgemm", "cannon"):
            b = place_b(mesh, B, dtype, ring="interleave" if algo == "meshgemm" else "plain")
            res = (meshgemm if algo == "meshgemm" else cannon)(a, b)
        else:
            b = mesh.place(B, ("y", "x"), dtype, name="B")
            res = (summa if algo == "summa" else allgather_gemm)(a, b)
    return res, A, B


def _gemv(mesh, algo, k, n, dtype, rng, ktree_k, group, layout):
    numeric = mesh.numeric
    x = rng.uniform(-1, 1, (k,)).astype(np.float32) if numeric else (k,)
    W = rng.uniform(-1, 1, (k, n)).astype(np.float32) if numeric else (k, n)
    wl = ("y", "x") if layout == "yx" else ("x", "y")
    xt = mesh.place(x, (wl[0],), dtype, name="x")
    wt = mesh.place(W, wl, dtype, name="W")
    res = gemv(xt, wt, algo=algo, k=ktree_k, group=group)
    return res, (x[None, :] if numeric else None), W


def _check_point(op, algo, m, k, n, rows, cols, dtype, ktree_k, group, layout) -> None:
    """Refuse a point's bad arguments (before any work) with a :class:`WaferLLMError`."""
    if op not in ("gemm", "gemv"):
        raise MeshError(f"unknown op {op!r}; expected gemm or gemv")
    check_algos(op, [algo])
    if dtype not in DTYPE_BYTES:
        raise HardwareError(f"unsupported dtype {dtype!r}; expected fp16 or fp32")
    if op == "gemv":
        if m != 1:
            raise MeshError(f"gemv multiplies a single row: --m must be 1, got {m}")
        if layout not in ("yx", "xy"):
            raise MeshError(f"--layout must be yx (W (y, x), x (y,)) or xy (W (x, y), x (x,)), got {layout!r}")
        if ktree_k < 1:
            raise MeshError(f"--ktree-k must be >= 1, got {ktree_k}")
        if group is not None and group < 2:
            raise MeshError(f"--group must be >= 2 PEs, got {group}")
    elif rows != cols and algo not in RECT_OK:
        raise MeshError(f"{algo} runs on square regions only; non-square grids ({rows}x{cols}) are supported by "
                        f"{', '.join(RECT_OK)} (folded onto the lcm x lcm logical grid)")
    for label, v in (("m", m), ("k", k), ("n", n)):
        if v <= 0:
            raise MeshError(f"--{label} must be positive, got {v}")


def bench_point(op: str, algo: str, m: int, k: int, n: int, rows: int, cols: int | None = None, *,
                wafer: WaferSpec | str = "wse2", dtype: str = "fp16", dry_run: bool = False, seed: int = 0,
                ktree_k: int = 2, group: int | None = None, layout: str = "yx", route_policy: str = "relay",
                check: bool = True) -> dict:
    """Run one kernel on a fresh rows x cols region and return its figures as a flat dict.

    Errors of the point itself (SRAM or routes exhausted) come back as ``{"error": msg}``
    with the point's coordinates; bad arguments raise :class:`WaferLLMError`. With
    ``check`` (numeric only) a result beyond tolerance raises :class:`VerificationError`.
    """
    wafer = wafer if isinstance(wafer, WaferSpec) else get_wafer(wafer)
    cols = rows if cols is None else cols
    _check_point(op, algo, m, k, n, rows, cols, dtype, ktree_k, group, layout)
    region = Region(wafer, rows, cols, name=f"{rows}x{cols}")  # MeshError if off the wafer
    point = {"op": op, "algo": algo, "m": m, "k": k, "n": n, "grid": f"{rows}x{cols}" if rows != cols else rows,
             "rows": rows, "cols": cols, "pes": rows * cols, "dtype": dtype, "mode": "dry" if dry_run else "numeric"}
    flops, nbytes = 2.0 * m * k * n, float(DTYPE_BYTES[dtype] * (m * k + k * n + m * n))
    point["gpu_a100_seconds"] = get_gpu("a100").roofline_seconds(flops, nbytes)
    point["gpu_h100_seconds"] = get_gpu("h100").roofline_seconds(flops, nbytes)
    mesh = Mesh(region, mode="dry" if dry_run else "numeric", route_policy=route_policy)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    try:
        if op == "gemm":
            res, A, B = _gemm(mesh, algo, m, k, n, dtype, rng)
        else:
            res, A, B = _gemv(mesh, algo, k, n, dtype, rng, ktree_k, group, layout)
    except MeshError as exc:  # SRAM overflow, route overflow: the point does not fit
        point.update(error=str(exc), error_type=type(exc).__name__, wall_seconds=time.perf_counter() - t0)
        return point
    wall = time.perf_counter() - t0
    rep = res.report
    peak_per_cycle = 2 * wafer.macs_per_cycle(dtype) * rows * cols
    point.update(
        seconds=rep.seconds, cycles=rep.cycles, compute_cycles=rep.compute_cycles, comm_cycles=rep.comm_cycles,
        exposed_comm_cycles=rep.exposed_comm_cycles, overhead_cycles=rep.overhead_cycles,
        efficiency=rep.efficiency(flops, peak_per_cycle), routes_per_pe=int(rep.routes_per_pe),
        relayed=bool(rep.relayed), sram_peak_bytes_per_pe=int(rep.sram_peak_bytes_per_pe),
        routing_stages=rep.routing_stages, wall_seconds=wall,
    )
    for key in ("skew_rounds", "logical_grid"):
        if key in rep.extra:
            point[key] = rep.extra[key]
    if op == "gemv":
        point.update(reduce=algo if algo != "meshgemv" else f"ktree(K={ktree_k})", layout=layout)
    if mesh.numeric:
        ref = rounded(A, dtype) @ rounded(B, dtype)  # gemv: A is x as a [1, K] row
        got = res.out.to_global(np.float64).reshape(ref.shape)
        err = float(np.abs(got - ref).max()) if ref.size else 0.0
        tol = tolerance(rounded(A, dtype), rounded(B, dtype), dtype)
        rep.max_abs_error = err
        point.update(max_abs_error=err, tolerance=tol)
        if check and not err <= tol:
            raise VerificationError(
                f"{algo} {op} [{m},{k}]x[{k},{n}] on {rows}x{cols} ({dtype}): max |error| {err:.3g} vs numpy "
                f"exceeds the tolerance {tol:.3g}")
    return point


def sweep(op: str, algos: list[str], grids: list[int], m: int, k: int, n: int, grid_cols: int | None = None,
          **kw) -> list[dict]:
    """The cross product grids x algos (validated up front), one :func:`bench_point` each."""
    check_algos(op, algos)
    wafer = kw.get("wafer", "wse2")
    wafer = wafer if isinstance(wafer, WaferSpec) else get_wafer(wafer)
    kw["wafer"] = wafer
    for g in grids:  # bad grids and unsupported combinations fail before any work
        Region(wafer, g, grid_cols or g, name=f"{g}x{grid_cols or g}")
        if op == "gemm" and grid_cols and grid_cols != g:
            bad = [a for a in algos if a not in RECT_OK]
            if bad:
                raise MeshError(f"{', '.join(bad)}: square regions only; for a {g}x{grid_cols} grid use "
                                f"{' or '.join(RECT_OK)}")
    return [bench_point(op, a, m, k, n, g, grid_cols or g, **kw) for g in grids for a in algos]


__all__ = ["GEMM_ALGOS", "GEMV_ALGOS", "RECT_OK", "RTOL", "VerificationError", "bench_point", "check_algos",
           "rounded", "sweep", "tolerance"]
