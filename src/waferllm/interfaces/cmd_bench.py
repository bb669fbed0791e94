"""`waferllm bench gemm|gemv`: sweep kernels over grids and algorithms (`bench serve`: cmd_bench_serve).

    waferllm bench gemm --k 2048 --grid 120,360,720 --algo meshgemm,summa,cannon --dry-run
    waferllm bench gemv --k 16384 --n 16384 --grid 240,720 --algo meshgemv,pipeline --dry-run --json
    waferllm bench gemm --m 40 --k 50 --n 60 --grid 4 --grid-cols 6 --algo meshgemm --dtype fp32

Every point (grid x algorithm) runs the kernel on a fresh region: numerically (seeded
random inputs, checked against numpy) by default, or shapes only with ``--dry-run``;
both charge the same cycles. A point that does not fit (SRAM, routes under policy
``raise``) is reported with the error's message instead of stopping the sweep.

:mod:`waferllm.kernels.bench` runs the points (``bench_point``, ``sweep``); this module
parses the options and renders the table, the JSON lines and the plot.
"""

from __future__ import annotations

import json
import math
from typing import List, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from waferllm.errors import MeshError
from waferllm.hardware import get_wafer, parse_overrides
from waferllm.interfaces.cli import app
from waferllm.interfaces.cmd_bench_serve import BenchCommand
from waferllm.kernels.bench import check_algos, sweep

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


@app.command(cls=BenchCommand)
def bench(
    op: str = typer.Argument(..., help="gemm or gemv; serve: load a running server (see bench serve --help)."),
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
    threads: Optional[int] = typer.Option(None, "--threads", help="Host threads for BLAS and the simulator's tile "
                                                                  "products (default: the libraries' own). Only host "
                                                                  "time changes."),
) -> None:
    """Sweep GEMM/GEMV kernels over grids x algorithms: time, efficiency, comm split, routes, SRAM, GPU roofline."""
    from waferllm.engine.threads import set_threads

    set_threads(threads)
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
