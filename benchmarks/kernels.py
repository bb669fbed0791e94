"""Kernel benchmarks: the SPEC's MeshGEMM / MeshGEMV claims against the model, and simulator speed.

    .venv/bin/python benchmarks/kernels.py [--wafer wse2] [--markdown benchmarks/RESULTS-kernels.md]

(a) MeshGEMV [1,16K]x[16K,16K] and [1,32K]x[32K,32K]: predicted (best square grid, as the
    offline tuner picks) vs the measured 1.2 us and 2.03 us (SPEC section 5).
(b) GEMM 2K and 8K on 120..720 square grids: MeshGEMM vs SUMMA vs Cannon (dry run).
(c) GEMV 2K/8K/16K on 60..720 grids: MeshGEMV vs pipeline vs ring, speedups and each
    algorithm's turning point (the grid where it is fastest).
(d) Simulator speed: a numeric 4096^3 fp32 MeshGEMM on 64x64 PEs (SRAM enlarged: 4096^2
    on 64x64 does not fit in 48 KB) vs numpy.matmul, and a dry-run 32K GEMV on 720x720.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from waferllm.calibration.targets import Evaluator
from waferllm.hardware import get_wafer
from waferllm.hardware.gpu import get_gpu
from waferllm.kernels.bench import bench_point
from waferllm.kernels.meshgemm import meshgemm, place_b
from waferllm.kernels.meshgemv import gemv
from waferllm.mesh import Mesh

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Out  # noqa: E402

GEMM_GRIDS = (120, 240, 360, 480, 600, 720)
GEMV_GRIDS = (60, 120, 180, 240, 360, 480, 600, 720)


def _us(s: float) -> str:
    return f"{s * 1e6:.3g}"


def part_a(out: Out, wafer) -> None:
    out("## (a) MeshGEMV vs the WSE-2 measurements (fp16, best square grid of 240..720)")
    out()
    rows = []
    for size, meas, cublas in ((16384, 1.2e-6, 0.336e-3), (32768, 2.03e-6, 1.231e-3)):
        pred, grid = Evaluator(wafer).gemv_best(size)
        rep = bench_point("gemv", "meshgemv", 1, size, size, grid, wafer=wafer, dry_run=True)
        a100 = get_gpu("a100").roofline_seconds(2 * size * size, 2 * (size + size * size + size))
        rows.append([f"[1,{size // 1024}K]x[{size // 1024}K,{size // 1024}K]", f"{grid}x{grid}", _us(pred),
                     _us(meas), f"{pred / meas:.2f}", f"{rep['exposed_comm_cycles'] / rep['cycles'] * 100:.0f}%",
                     f"{cublas * 1e3:.3g} ms", f"{a100 * 1e3:.3g} ms", f"{cublas / pred:.0f}x (paper {cublas / meas:.0f}x)"])
    out.table(["GEMV", "grid", "predicted us", "measured us", "pred/meas", "exposed comm",
               "A100 cuBLAS (meas.)", "A100 roofline", "speedup vs cuBLAS"], rows)


def part_b(out: Out, wafer) -> None:
    out("## (b) GEMM: MeshGEMM vs SUMMA vs Cannon (fp16, dry run)")
    out()
    for size in (2048, 8192):
        rows = []
        for g in GEMM_GRIDS:
            pts = {a: bench_point("gemm", a, size, size, size, g, wafer=wafer, dry_run=True)
                   for a in ("meshgemm", "summa", "cannon")}
            row = [f"{g}x{g}"]
            for a in ("meshgemm", "summa", "cannon"):
                p = pts[a]
                row += ["does not fit", "-"] if "error" in p else [_us(p["seconds"]), f"{p['efficiency'] * 100:.0f}%"]
            mg = pts["meshgemm"]
            best = [pts[a]["seconds"] for a in ("summa", "cannon") if "error" not in pts[a]]
            row.append(f"{min(best) / mg['seconds']:.2f}x" if best and "error" not in mg else "-")
            rows.append(row)
        out(f"GEMM [{size // 1024}K,{size // 1024}K]x[{size // 1024}K,{size // 1024}K]:")
        out()
        out.table(["grid", "MeshGEMM us", "eff", "SUMMA us", "eff", "Cannon us", "eff",
                   "MeshGEMM speedup vs best other"], rows)


def part_c(out: Out, wafer) -> None:
    out("## (c) GEMV: MeshGEMV (K-tree, K=2) vs pipeline vs ring allreduce (fp16, dry run)")
    out()
    algos = ("meshgemv", "pipeline", "ring")
    for size in (2048, 8192, 16384):
        rows, best = [], {a: (np.inf, None) for a in algos}
        for g in GEMV_GRIDS:
            pts = {a: bench_point("gemv", a, 1, size, size, g, wafer=wafer, dry_run=True) for a in algos}
            row = [f"{g}x{g}"]
            for a in algos:
                p = pts[a]
                if "error" in p:
                    row.append("does not fit")
                    continue
                row.append(f"{_us(p['seconds'])} ({p['exposed_comm_cycles'] / p['cycles'] * 100:.0f}% comm)")
                best[a] = min(best[a], (p["seconds"], g))
            ok = all("error" not in pts[a] for a in algos)
            row += [f"{pts['pipeline']['seconds'] / pts['meshgemv']['seconds']:.2f}x" if ok else "-",
                    f"{pts['ring']['seconds'] / pts['meshgemv']['seconds']:.2f}x" if ok else "-"]
            rows.append(row)
        out(f"GEMV [1,{size // 1024}K]x[{size // 1024}K,{size // 1024}K] (us, share of exposed communication):")
        out()
        out.table(["grid", "MeshGEMV", "pipeline", "ring", "pipeline/MeshGEMV", "ring/MeshGEMV"], rows)
        out("turning point (grid where each is fastest): " + ", ".join(
            f"{a} {best[a][1]}x{best[a][1]} ({_us(best[a][0])} us)" for a in algos if best[a][1]))
        out()


def part_d(out: Out, wafer) -> None:
    out("## (d) Simulator speed (wall clock on this host)")
    out()
    n, size = 64, 4096
    big = wafer.replace(sram_bytes_per_pe=512 * 1024)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    t0 = time.perf_counter()
    ref = a @ b
    t_np = time.perf_counter() - t0
    mesh = Mesh.square(big, n)
    t0 = time.perf_counter()
    at = mesh.place(a, ("y", "x"), "fp32", name="A")
    bt = place_b(mesh, b, "fp32")
    t_place = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = meshgemm(at, bt)
    t_run = time.perf_counter() - t0
    err = float(np.abs(res.out.to_global() - ref).max() / np.abs(ref).max())
    mesh32 = Mesh.square(wafer, 720, mode="dry")
    t0 = time.perf_counter()
    rep = gemv(mesh32.place((32768,), ("y",), "fp16"), mesh32.place((32768, 32768), ("y", "x"), "fp16")).report
    t_gemv = time.perf_counter() - t0
    out.table(["case", "wall s", "notes"], [
        [f"numeric MeshGEMM {size}^3 fp32 on {n}x{n} (SRAM 512 KB/PE)", f"{t_run:.2f}",
         f"+ {t_place:.2f} s placement; {n} steps; max rel. error vs numpy {err:.1e}; "
         f"predicted wafer time {rep_us(res.report.seconds)} us"],
        [f"numpy.matmul {size}^3 fp32", f"{t_np:.2f}", f"simulator / numpy = {t_run / t_np:.1f}x"],
        ["dry-run MeshGEMV [1,32K]x[32K,32K] on 720x720", f"{t_gemv:.3f}",
         f"predicted {rep_us(rep.seconds)} us"],
    ])


def rep_us(s):
    return f"{s * 1e6:.4g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wafer", default="wse2")
    ap.add_argument("--markdown", default=None, help="also write the output to this file")
    ap.add_argument("--skip-speed", action="store_true", help="skip (d), the simulator-speed runs")
    args = ap.parse_args()
    wafer = get_wafer(args.wafer)
    out = Out()
    out("# Kernel benchmarks")
    out()
    out("Command: `" + " ".join(["python", "benchmarks/kernels.py", *sys.argv[1:]]) + "`")
    preset = "src/waferllm/hardware/presets/wse2.toml"
    try:
        git = dict(capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        commit = subprocess.run(["git", "log", "-1", "--format=%h %s", "--", preset], **git).stdout.strip()
        if subprocess.run(["git", "diff", "--quiet", "--", preset], **git).returncode:
            commit = f"uncommitted edits on top of {commit}"
    except OSError:
        commit = "?"
    out()
    out(f"Host: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}.")
    out(f"Wafer: {wafer.name} (preset: {commit or '?'}); free constants: "
        f"beta={wafer.beta_cycles:g}, op_overhead={wafer.op_overhead_cycles:g}, "
        f"step_overhead={wafer.step_overhead_cycles:g} cycles, fp16 lanes={wafer.fp16_macs_per_cycle:g}.")
    out()
    t0 = time.perf_counter()
    part_a(out, wafer)
    part_b(out, wafer)
    part_c(out, wafer)
    if not args.skip_speed:
        part_d(out, wafer)
    out(f"Total benchmark wall time: {time.perf_counter() - t0:.0f} s.")
    out.save(args.markdown)


if __name__ == "__main__":
    main()
