"""`waferllm sweep SPEC.toml [--out results.csv] [--plot DIR] [--no-ray | --address ADDR]`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from waferllm.interfaces.cli import app


@app.command()
def sweep(
    spec_path: str = typer.Argument(..., metavar="SPEC.toml", help="Sweep spec (see waferllm.explore.spec)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Results table (CSV); default: SPEC.csv beside the spec."),
    no_ray: bool = typer.Option(False, "--no-ray", help="Run the points one after another in this process."),
    address: Optional[str] = typer.Option(None, "--address", help="Join this Ray cluster instead of starting one."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs of the local Ray (default: all cores)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Points per Ray task (default: spec's, else automatic)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed points again (default: only crashed ones)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop after this many seconds (a rerun resumes)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write SPEC_pareto.png and SPEC_line_<input>.png into this "
                                                            "folder (SPEC: the spec file's name)."),
    pareto: Optional[str] = typer.Option(None, "--pareto", help="Two figures for the Pareto plot: X,Y (default: the spec's, else energy_j,decode_tokens_per_s)."),
    y: Optional[str] = typer.Option(None, "--y", help="Figures of the line plots, comma-separated."),
    list_points: bool = typer.Option(False, "--list", help="Print the points (JSON lines) and run nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Predict a grid or a random sample of designs (wafer constants, models, grids, lengths) on Ray into a table."""
    from waferllm.explore.spec import SweepError, load_spec
    from waferllm.explore.sweep import default_output, describe_points, run_sweep

    spec = load_spec(spec_path)
    if list_points:
        for p in describe_points(spec):
            typer.echo(json.dumps(p))
        return
    if no_ray and address:
        raise SweepError("--no-ray and --address exclude each other")
    for name, v in (("--num-cpus", num_cpus), ("--batch", batch)):
        if v is not None and v < 1:
            raise SweepError(f"{name} must be a positive integer, got {v}")
    if timeout is not None and timeout <= 0:
        raise SweepError(f"--timeout must be positive, got {timeout}")
    figures = spec.pareto
    if pareto:
        parts = [p.strip() for p in pareto.split(",") if p.strip()]
        if len(parts) != 2:
            raise SweepError(f"--pareto takes two figures X,Y, got {pareto!r}")
        figures = (parts[0], parts[1])
    ys = [s.strip() for s in y.split(",") if s.strip()] if y else list(spec.y)
    path = out or default_output(spec_path)
    res = run_sweep(spec, path, use_ray=not no_ray, address=address, num_cpus=num_cpus, batch=batch,
                    retry_failed=retry_failed, timeout_s=timeout, progress=not quiet)
    console = Console()
    rate = (f", {res.points_per_s:.2f} points/s ({res.points_per_s_running:.2f} once Ray was up, "
            f"{res.startup_s:.1f} s to start it)" if res.backend == "ray" else f", {res.points_per_s:.2f} points/s")
    console.print(f"[bold]{spec.name}[/]: {res.points} points: {res.ran} predicted in {res.wall_s:.1f} s"
                  + (rate if res.ran else "") + f", {res.skipped} already in the table; "
                  f"{res.ok} ok, {res.failed} failed. Table: {res.path}")
    if res.failed:
        errors = Counter(str(r.get("error") or "")[:160] for r in res.rows if r["status"] != "ok")
        for msg, n in list(errors.items())[:5]:  # the first five kinds, in the order they happened
            console.print(f"  [yellow]{n} failed:[/] {msg}", highlight=False)
    if plot:
        from waferllm.explore.plots import plot_sweep

        known = {k for r in res.rows if r["status"] == "ok" for k, v in r.items() if isinstance(v, (int, float))}
        unknown = [f for f in (*figures, *ys) if known and f not in known]
        if unknown:
            hint = ", ".join(k for k in ("decode_tokens_per_s", "e2e_tokens_per_s", "tpot_s", "ttft_s", "energy_j",
                                         "kv_capacity_tokens", "sram_peak_bytes_per_pe.decode") if k in known)
            raise SweepError(f"no figure named {', '.join(unknown)} in the table {res.path}; figures are its numeric "
                             f"columns, e.g. {hint}")

        prefix = Path(spec_path).stem + "_"
        for p in plot_sweep(res.rows, plot, swept=spec.swept, pareto=figures, y=ys, title=spec.name, prefix=prefix):
            console.print(f"wrote {p}", soft_wrap=True)  # a path stays on one line
