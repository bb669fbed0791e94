"""waferllm.kernels.bench: a point's figures equal a direct kernel run and numpy, computed here."""

from __future__ import annotations

import numpy as np
import pytest

from waferllm.errors import MeshError
from waferllm.hardware import get_wafer
from waferllm.kernels import gemv, meshgemm, place_b, summa
from waferllm.kernels.bench import bench_point, sweep
from waferllm.mesh import Mesh, Region

A100_FLOPS, A100_HBM = 312e12, 2.04e12  # vendor datasheet figures
H100_FLOPS, H100_HBM = 989e12, 3.35e12


def _inputs(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize("algo,dtype", [("meshgemm", "fp32"), ("meshgemm", "fp16"), ("summa", "fp32")])
def test_gemm_point_equals_direct_kernel_and_numpy(algo, dtype):
    w = get_wafer("wse2")
    m, k, n, g = 24, 18, 30, 3
    p = bench_point("gemm", algo, m, k, n, g, wafer=w, dtype=dtype, seed=7)

    A, B = _inputs(7, (m, k), (k, n))
    mesh = Mesh(Region(w, g, g, name="direct"))
    a = mesh.place(A, ("y", "x"), dtype, name="A")
    if algo == "meshgemm":
        res = meshgemm(a, place_b(mesh, B, dtype))
    else:
        res = summa(a, mesh.place(B, ("y", "x"), dtype, name="B"))
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    ref = A.astype(np_dtype).astype(np.float64) @ B.astype(np_dtype).astype(np.float64)
    err = float(np.abs(res.out.to_global(np.float64) - ref).max())

    assert p["cycles"] == res.report.cycles
    assert p["comm_cycles"] == res.report.comm_cycles
    assert p["sram_peak_bytes_per_pe"] == res.report.sram_peak_bytes_per_pe
    assert p["max_abs_error"] == err
    assert err < (1e-5 if dtype == "fp32" else 2e-2)
    peak = 2 * w.macs_per_cycle(dtype) * g * g
    assert p["efficiency"] == pytest.approx(2 * m * k * n / (res.report.cycles * peak))
    item = 2 if dtype == "fp16" else 4
    nbytes = item * (m * k + k * n + m * n)
    assert p["gpu_a100_seconds"] == pytest.approx(max(2 * m * k * n / A100_FLOPS, nbytes / A100_HBM))
    assert p["gpu_h100_seconds"] == pytest.approx(max(2 * m * k * n / H100_FLOPS, nbytes / H100_HBM))


def test_gemv_point_equals_direct_kernel_and_numpy():
    w = get_wafer("wse2")
    k, n, g = 64, 48, 4
    p = bench_point("gemv", "meshgemv", 1, k, n, g, wafer=w, dtype="fp32", ktree_k=3, seed=3)
    x, W = _inputs(3, (k,), (k, n))
    mesh = Mesh(Region(w, g, g, name="direct"))
    res = gemv(mesh.place(x, ("y",), "fp32"), mesh.place(W, ("y", "x"), "fp32"), algo="meshgemv", k=3)
    ref = x.astype(np.float64) @ W.astype(np.float64)
    assert p["cycles"] == res.report.cycles
    assert p["max_abs_error"] == float(np.abs(res.out.to_global(np.float64).ravel() - ref).max())
    assert p["reduce"] == "ktree(K=3)"


def test_dry_point_charges_what_the_numeric_one_does():
    num = bench_point("gemm", "cannon", 20, 16, 12, 4, dtype="fp16")
    dry = bench_point("gemm", "cannon", 20, 16, 12, 4, dtype="fp16", dry_run=True)
    assert dry["cycles"] == pytest.approx(num["cycles"], rel=1e-12) and dry["mode"] == "dry" and "max_abs_error" not in dry


def test_sweep_order_and_up_front_refusal():
    pts = sweep("gemm", ["meshgemm", "summa"], [2, 3], 8, 8, 8, dry_run=True)
    assert [(p["grid"], p["algo"]) for p in pts] == [(2, "meshgemm"), (2, "summa"), (3, "meshgemm"), (3, "summa")]
    assert pts[3]["cycles"] == bench_point("gemm", "summa", 8, 8, 8, 3, dry_run=True)["cycles"]
    with pytest.raises(MeshError, match="square regions only"):
        sweep("gemm", ["meshgemm", "summa"], [2], 8, 8, 8, grid_cols=3, dry_run=True)
