"""Fit the cost model's free constants to the WSE-2 measurements of SPEC section 5.

Free constants (not published): ``beta_cycles`` (software relay), ``op_overhead_cycles``
(launching a compute op), ``step_overhead_cycles`` (one synchronised algorithm step)
and ``fp16_macs_per_cycle`` (the fp16 SIMD width). Everything else stays as measured.

The targets are exactly the measurements we may fit to, each turned into a residual:
absolute figures in log space, "over"/"under" claims as one-sided hinges. The model
value of every target comes from running the kernels (dry run) with candidate
constants, the same code as every other prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from waferllm.errors import WaferLLMError
from waferllm.hardware.plmr import WaferSpec
from waferllm.kernels.gemm_baselines import cannon, summa
from waferllm.kernels.meshgemm import meshgemm, place_b
from waferllm.kernels.meshgemv import gemv
from waferllm.mesh.runtime import Mesh

FREE = ("beta_cycles", "op_overhead_cycles", "step_overhead_cycles")
GEMV_GRIDS = (240, 360, 480, 600, 720)


def gemv_seconds(wafer: WaferSpec, size: int, grid: int, algo: str = "meshgemv") -> float:
    mesh = Mesh.square(wafer, grid, mode="dry")
    x = mesh.place((size,), ("y",), "fp16", name="x")
    w = mesh.place((size, size), ("y", "x"), "fp16", name="W")
    return gemv(x, w, algo=algo).report.seconds


def best_gemv(wafer: WaferSpec, size: int, algo: str = "meshgemv", grids=GEMV_GRIDS) -> tuple[float, int]:
    """Fastest time over square grids (what the offline tuner picks) and its grid."""
    best = (math.inf, 0)
    for g in grids:
        try:
            best = min(best, (gemv_seconds(wafer, size, g, algo), g))
        except WaferLLMError:  # does not fit on that grid
            continue
    return best


def gemm_report(wafer: WaferSpec, size: int, grid: int, algo: str):
    mesh = Mesh.square(wafer, grid, mode="dry")
    a = mesh.place((size, size), ("y", "x"), "fp16", name="A")
    if algo == "summa":
        return summa(a, mesh.place((size, size), ("y", "x"), "fp16", name="B")).report
    b = place_b(mesh, (size, size), "fp16", ring="interleave" if algo == "meshgemm" else "plain")
    return (meshgemm if algo == "meshgemm" else cannon)(a, b).report


def gemm_efficiency(wafer: WaferSpec, rep, size: int, grid: int) -> float:
    return 2 * size**3 / (rep.cycles * 2 * wafer.fp16_macs_per_cycle * grid * grid)


@dataclass
class Target:
    name: str
    measured: str
    model: Callable[[WaferSpec], float]
    residual: Callable[[float], float]
    shown: Callable[[float], str]


def _log_ratio(target: float):
    return lambda v: math.log(max(v, 1e-30) / target)


def _at_least(bound: float):
    return lambda v: max(0.0, math.log(bound / max(v, 1e-30)))


def _at_most(bound: float):
    return lambda v: max(0.0, math.log(max(v, 1e-30) / bound))


def _gemm_speedup(w: WaferSpec, sizes=(2048, 8192), grids=(360, 720)) -> float:
    """Geometric mean over sizes/grids of min(SUMMA, Cannon) time / MeshGEMM time."""
    logs = []
    for s in sizes:
        for g in grids:
            mg = gemm_report(w, s, g, "meshgemm").cycles
            other = min(gemm_report(w, s, g, "summa").cycles, gemm_report(w, s, g, "cannon").cycles)
            logs.append(math.log(other / mg))
    return math.exp(sum(logs) / len(logs))


def _gemv_speedup(w: WaferSpec, sizes=(2048, 8192, 16384), grid=720) -> float:
    logs = [math.log(gemv_seconds(w, s, grid, "pipeline") / gemv_seconds(w, s, grid)) for s in sizes]
    return math.exp(sum(logs) / len(logs))


def targets() -> list[Target]:
    us = lambda v: f"{v * 1e6:.3g} us"
    pct = lambda v: f"{v * 100:.0f}%"
    x = lambda v: f"{v:.2f}x"
    return [
        Target("MeshGEMV [1,16K]x[16K,16K] (best grid)", "1.2 us",
               lambda w: best_gemv(w, 16384)[0], _log_ratio(1.2e-6), us),
        Target("MeshGEMV [1,32K]x[32K,32K] (best grid)", "2.03 us",
               lambda w: best_gemv(w, 32768)[0], _log_ratio(2.03e-6), us),
        Target("MeshGEMV speedup over pipeline GEMV, 2K/8K/16K at 720x720", "~4.6x (4-8x)",
               _gemv_speedup, _log_ratio(4.6), x),
        Target("MeshGEMM efficiency, 8K GEMM at 720x720", "> 70%",
               lambda w: gemm_efficiency(w, gemm_report(w, 8192, 720, "meshgemm"), 8192, 720), _at_least(0.7), pct),
        Target("SUMMA efficiency, 8K GEMM at 720x720", "< 50%",
               lambda w: gemm_efficiency(w, gemm_report(w, 8192, 720, "summa"), 8192, 720), _at_most(0.5), pct),
        Target("Cannon efficiency, 8K GEMM at 720x720", "< 50%",
               lambda w: gemm_efficiency(w, gemm_report(w, 8192, 720, "cannon"), 8192, 720), _at_most(0.5), pct),
        Target("MeshGEMM speedup over best of SUMMA/Cannon, 2K & 8K at 360/720", "2-3x",
               _gemm_speedup, lambda v: _at_least(2.0)(v) + _at_most(3.0)(v), x),
        Target("2K GEMM: MeshGEMM time 720x720 / 360x360", "about flat (~1x)",
               lambda w: gemm_report(w, 2048, 720, "meshgemm").cycles / gemm_report(w, 2048, 360, "meshgemm").cycles,
               lambda v: abs(math.log(v)) if abs(math.log(v)) > math.log(1.25) else 0.0, x),
        Target("2K GEMM: Cannon time 720x720 / 360x360", "> 1x (slower)",
               lambda w: gemm_report(w, 2048, 720, "cannon").cycles / gemm_report(w, 2048, 360, "cannon").cycles,
               _at_least(1.0), x),
        Target("2K GEMM: SUMMA time 720x720 / 360x360", "> 1x (slower)",
               lambda w: gemm_report(w, 2048, 720, "summa").cycles / gemm_report(w, 2048, 360, "summa").cycles,
               _at_least(1.0), x),
        Target("16K GEMM at 720x720: cycles MeshGEMM saves vs Cannon", "~17%",
               lambda w: 1 - gemm_report(w, 16384, 720, "meshgemm").cycles / gemm_report(w, 16384, 720, "cannon").cycles,
               lambda v: math.log(max(v, 1e-3) / 0.17) if v < 0.17 else 0.5 * math.log(v / 0.17), pct),
    ]


def evaluate(wafer: WaferSpec, tgts: list[Target] | None = None) -> list[tuple[Target, float, float]]:
    out = []
    for t in tgts or targets():
        v = t.model(wafer)
        out.append((t, v, t.residual(v)))
    return out


def loss(wafer: WaferSpec, tgts=None) -> float:
    return float(sum(r * r for _, _, r in evaluate(wafer, tgts)))


def nelder_mead(f, x0, step, iters=60, tol=1e-4):
    """Minimise f over R^n (small, dependency-free Nelder-Mead)."""
    n = len(x0)
    pts = [np.asarray(x0, float)] + [np.asarray(x0, float) + np.eye(n)[i] * step[i] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts = [pts[i] for i in order]
        vals = [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) < tol:
            break
        centroid = np.mean(pts[:-1], axis=0)
        xr = centroid + (centroid - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = centroid + 2 * (centroid - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (pts[-1] - centroid)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    i = int(np.argmin(vals))
    return pts[i], vals[i]


def fit(wafer: WaferSpec, lanes=(1.0, 2.0, 4.0), iters=50, log=print):
    """Fit beta, op and step overheads (log space) for each candidate fp16 SIMD width; keep the best."""
    best = None
    for lane in lanes:
        base = wafer.replace(fp16_macs_per_cycle=lane)

        def f(z):
            vals = dict(zip(FREE, np.exp(z)))
            return loss(base.replace(**vals))

        z0 = np.log([max(getattr(wafer, k), 1.0) for k in FREE])
        z, val = nelder_mead(f, z0, step=[0.7, 0.7, 0.7], iters=iters)
        log(f"  fp16 lanes {lane:g}: loss {val:.4f} at " + ", ".join(f"{k}={v:.1f}" for k, v in zip(FREE, np.exp(z))))
        if best is None or val < best[1]:
            best = (lane, val, dict(zip(FREE, np.exp(z))))
    lane, val, consts = best
    return {"fp16_macs_per_cycle": lane, **{k: round(float(v), 1) for k, v in consts.items()}}, val
