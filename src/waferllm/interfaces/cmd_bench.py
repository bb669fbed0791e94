"""`waferllm bench gemm|gemv`: sweep kernels over grids and algorithms.

    waferllm bench gemm --k 2048 --grid 120,360,720 --algo meshgemm,summa,cannon --dry-run
    waferllm bench gemv --k 16384 --n 16384 --grid 240,720 --algo meshgemv,pipeline --dry-run --json
    waferllm bench gemm --m 40 --k 50 --n 60 --grid 4 --grid-cols 6 --algo meshgemm --dtype fp32

Every point (grid x algorithm) runs the kernel on a fresh region: numerically (seeded
random inputs, checked against numpy) by default, or shapes only with ``--dry-run``;
both charge the same cycles. A point that does not fit (SRAM, routes under policy
``raise``) is reported with the error's message instead of stopping the sweep.

:func:`bench_point` is the programmatic entry point (``benchmarks/kernels.py`` uses it).
"""

from __future__ import annotations

import json
import math
import time
from typing import List, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from waferllm.errors import HardwareError, MeshError, WaferLLMError
from waferllm.hardware import get_wafer, parse_overrides
from waferllm.hardware.gpu import get_gpu
from waferllm.hardware.plmr import DTYPE_BYTES, WaferSpec
from waferllm.interfaces.cli import app
from waferllm.mesh import Mesh, Region

GEMM_ALGOS = ("meshgemm", "cannon", "summa", "allgather")
GEMV_ALGOS = ("meshgemv", "pipeline", "ring")
RECT_OK = ("meshgemm", "cannon")  # GEMMs that fold onto a non-square region
RTOL = {"fp32": 1e-4, "fp16": 2e-3}  # of max(|A| @ |B|): fp32 accumulation / fp16 output rounding


class VerificationError(WaferLLMError):
    """A kernel's numeric result differs from numpy by more than the dtype's tolerance."""


# ---------------------------------------------------------------------------- parsing


def parse_list(text: str, what: str) -> list[str]:
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise MeshError(f"--{what}: empty list")
    return items


def parse_grids(text: str) -> list[int]:
    out = []
    for s in parse_list(text, "grid"):
        try:
            g = int(s)
        except ValueError:
            raise MeshError(f"--grid: {s!r} is not a whole number of PEs (e.g. --grid 120,360,720)") from None
        if g <= 0:
            raise MeshError(f"--grid: {g} must be a positive number of PEs per side")
        out.append(g)
    return out


def check_algos(op: str, algos: list[str]) -> list[str]:
    known = GEMM_ALGOS if op == "gemm" else GEMV_ALGOS
    bad = [a for a in algos if a not in known]
    if bad:
        raise MeshError(f"unknown {op} algorithm(s) {', '.join(bad)}; expected one of {', '.join(known)}")
    return algos


# ---------------------------------------------------------------------------- one point


def _tolerance(a: np.ndarray, b: np.ndarray, dtype: str) -> float:
    scale = float((np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))).max()) if a.size and b.size else 0.0
    return RTOL[dtype] * max(scale, 1e-30) + 1e-30


def _gemm(mesh, algo, m, k, n, dtype, rng):
    from waferllm.kernels import allgather_gemm, cannon, meshgemm, place_b, summa
    from waferllm.kernels.meshgemm import meshgemm_rect

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
    from waferllm.kernels import gemv

    numeric = mesh.numeric
    x = rng.uniform(-1, 1, (k,)).astype(np.float32) if numeric else (k,)
    W = rng.uniform(-1, 1, (k, n)).astype(np.float32) if numeric else (k, n)
    wl = ("y", "x") if layout == "yx" else ("x", "y")
    xt = mesh.place(x, (wl[0],), dtype, name="x")
    wt = mesh.place(W, wl, dtype, name="W")
    res = gemv(xt, wt, algo=algo, k=ktree_k, group=group)
    return res, (x[None, :] if numeric else None), W


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
    region = Region(wafer, rows, cols, name=f"{rows}x{cols}")  # MeshError if off the wafer
    point = {"op": op, "algo": algo, "m": m, "k": k, "n": n, "grid": f"{rows}x{cols}" if rows != cols else rows,
             "rows": rows, "cols": cols, "pes": rows * cols, "dtype": dtype, "mode": "dry" if dry_run else "numeric"}
    item = DTYPE_BYTES[dtype]
    flops, nbytes = 2.0 * m * k * n, float(item * (m * k + k * n + m * n))
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
        point["error"] = str(exc)
        point["error_type"] = type(exc).__name__
        point["wall_seconds"] = time.perf_counter() - t0
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
        ref = _rounded(A, dtype) @ _rounded(B, dtype)  # gemv: A is x as a [1, K] row
        got = res.out.to_global(np.float64).reshape(ref.shape)
        err = float(np.abs(got - ref).max()) if ref.size else 0.0
        tol = _tolerance(_rounded(A, dtype), _rounded(B, dtype), dtype)
        rep.max_abs_error = err
        point.update(max_abs_error=err, tolerance=tol)
        if check and not err <= tol:
            raise VerificationError(
                f"{algo} {op} [{m},{k}]x[{k},{n}] on {rows}x{cols} ({dtype}): max |error| {err:.3g} vs numpy "
                f"exceeds the tolerance {tol:.3g}")
    return point


def _rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """The input as the mesh holds it (rounded to dtype), in float64 for the reference."""
    return np.asarray(x, dtype=np.float16 if dtype == "fp16" else np.float32).astype(np.float64)


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


# ---------------------------------------------------------------------------- output


def _fmt_bytes(b: float) -> str:
    return f"{b / 1024:.1f} KB" if b >= 1024 else f"{int(b)} B"


def render_table(points: list[dict], title: str, console: Console) -> None:
    numeric = any(p.get("mode") == "numeric" for p in points)
    t = Table(title=title, show_lines=False)
    for col in ("algo", "grid", "time us", "cycles", "eff", "compute", "comm", "exposed", "routes/PE", "SRAM/PE",
                "A100 us", "H100 us"):
        t.add_column(col, justify="left" if col in ("algo", "grid") else "right", no_wrap=True)
    if numeric:
        t.add_column("max|err|", justify="right", no_wrap=True)
    errors: list[str] = []
    for p in points:
        grid = str(p["grid"]) if isinstance(p["grid"], str) else f"{p['grid']}x{p['grid']}"
        gpu = [f"{p['gpu_a100_seconds'] * 1e6:.3g}", f"{p['gpu_h100_seconds'] * 1e6:.3g}"]
        if "error" in p:
            errors.append(p["error"])
            label = {"SRAMOverflowError": "does not fit", "RouteOverflowError": "route overflow"}.get(
                p.get("error_type"), "error")
            row = [p["algo"], grid, f"[red]{label} [{len(errors)}][/]", "", "", "", "", "", "", ""] + gpu
            t.add_row(*row, *([""] if numeric else []))
            continue
        routes = f"{p['routes_per_pe']}" + (" (relayed)" if p["relayed"] else "")
        row = [p["algo"], grid, f"{p['seconds'] * 1e6:.4g}", f"{p['cycles']:,.0f}", f"{p['efficiency'] * 100:.1f}%",
               f"{p['compute_cycles']:,.0f}", f"{p['comm_cycles']:,.0f}", f"{p['exposed_comm_cycles']:,.0f}",
               routes, _fmt_bytes(p["sram_peak_bytes_per_pe"])] + gpu
        if numeric:
            row.append("" if p.get("max_abs_error") is None else f"{p['max_abs_error']:.2g}")
        t.add_row(*row)
    console.print(t)
    for i, e in enumerate(errors, 1):
        console.print(f"[red][{i}][/] {e}", highlight=False)


def plot_points(points: list[dict], path: str, title: str) -> str:
    """Latency vs PEs per algorithm: stacked bars (non-overlapped compute + overhead, then
    exposed communication), one bar per algorithm in each grid's group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = list(dict.fromkeys((p["rows"], p["cols"]) for p in points))
    algos = list(dict.fromkeys(p["algo"] for p in points))
    by = {(p["rows"], p["cols"], p["algo"]): p for p in points}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(grids) * max(1, len(algos)) / 2 + 3), 4.5))
    width = 0.8 / max(1, len(algos))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xs = np.arange(len(grids))
    for i, algo in enumerate(algos):
        comp, comm, miss = [], [], []
        for g in grids:
            p = by.get((*g, algo))
            if p is None or "error" in p:
                comp.append(0.0)
                comm.append(0.0)
                miss.append(p is not None)
                continue
            us = 1e6 / p["cycles"] * p["seconds"] if p["cycles"] else 0.0
            comm.append(p["exposed_comm_cycles"] * us)
            comp.append((p["cycles"] - p["exposed_comm_cycles"]) * us)
            miss.append(False)
        x = xs - 0.4 + width * (i + 0.5)
        c = colors[i % len(colors)]
        ax.bar(x, comp, width, color=c, label=f"{algo}: compute + overhead")
        ax.bar(x, comm, width, bottom=comp, color=c, alpha=0.45, hatch="//", label=f"{algo}: exposed comm")
        for xi, m_ in zip(x, miss):
            if m_:
                ax.text(xi, 0, "does\nnot fit", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{r}x{c}\n{r * c:,} PEs" for r, c in grids], fontsize=8)
    ax.set_ylabel("latency (us)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- command


@app.command()
def bench(
    op: str = typer.Argument(..., help="gemm or gemv."),
    m: Optional[int] = typer.Option(None, "--m", help="Rows of A (gemm; default = --k). gemv: must be 1."),
    k: int = typer.Option(..., "--k", help="Inner dimension."),
    n: Optional[int] = typer.Option(None, "--n", help="Columns of B / W (default = --k)."),
    grid: str = typer.Option(..., "--grid", help="Region side(s) in PEs, comma-separated: 120,360,720."),
    grid_cols: Optional[int] = typer.Option(None, "--grid-cols", help="Region columns (non-square: rows = --grid)."),
    algo: str = typer.Option(..., "--algo", help="Algorithm(s), comma-separated. gemm: meshgemm, cannon, summa, "
                                                 "allgather; gemv: meshgemv, pipeline, ring."),
    wafer: str = typer.Option("wse2", "--wafer", help="Preset name or TOML/JSON wafer file."),
    dtype: str = typer.Option("fp16", "--dtype", help="fp16 or fp32."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Shapes only (same cycles, no numerics)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line per point."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write latency vs PEs (compute/comm split) to this PNG."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a wafer constant: KEY=VALUE (repeatable)."),
    ktree_k: int = typer.Option(2, "--ktree-k", help="gemv meshgemv: K of the K-tree allreduce."),
    group: Optional[int] = typer.Option(None, "--group", help="gemv meshgemv: K-tree group size (default ~N^(1/K))."),
    layout: str = typer.Option("yx", "--layout", help="gemv: yx = W (y, x), x (y,); xy = W (x, y), x (x,)."),
    route_policy: str = typer.Option("relay", "--route-policy", help="relay (software relays) or raise."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random inputs (numeric mode)."),
) -> None:
    """Sweep GEMM/GEMV kernels over grids x algorithms: time, efficiency, comm split, routes, SRAM, GPU roofline."""
    op = op.lower()
    if op not in ("gemm", "gemv"):
        raise MeshError(f"unknown op {op!r}; expected gemm or gemv")
    if route_policy not in ("relay", "raise"):
        raise MeshError(f"--route-policy must be relay or raise, got {route_policy!r}")
    algos = check_algos(op, [a.lower() for a in parse_list(algo, "algo")])
    grids = parse_grids(grid)
    if grid_cols is not None and grid_cols <= 0:
        raise MeshError(f"--grid-cols must be positive, got {grid_cols}")
    if op == "gemv":
        if m not in (None, 1):
            raise MeshError(f"gemv multiplies a single row: --m must be 1 (or omitted), got {m}")
        m = 1
    m = k if m is None else m
    n = k if n is None else n
    spec = get_wafer(wafer, **parse_overrides(set_))
    points = sweep(op, algos, grids, m, k, n, grid_cols, wafer=spec, dtype=dtype, dry_run=dry_run, seed=seed,
                   ktree_k=ktree_k, group=group, layout=layout, route_policy=route_policy)
    title = (f"{op.upper()} [{m},{k}]x[{k},{n}] {dtype} on {spec.name} "
             f"({'dry run' if dry_run else 'numeric, checked against numpy'})")
    if as_json:
        for p in points:
            typer.echo(json.dumps({key: _plain(v) for key, v in p.items()}))
    else:
        console = Console()
        console = console if console.is_terminal else Console(width=200)
        render_table(points, title, console)
        console.print("eff = useful flops / (cycles x the region's peak); compute / comm = cycles of each "
                      "(overlapped); exposed = comm not hidden behind compute; SRAM/PE = peak bytes on the fullest PE",
                      style="dim", highlight=False)
    if plot:
        plot_points(points, plot, title)
        if not as_json:
            Console().print(f"plot written to {plot}")


def _plain(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
