"""`waferllm calibrate` (fit the presets' free constants) and `waferllm validate`
(every SPEC section 5 measurement beside the model's value and its error)."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from waferllm.hardware.measurements import format_value
from waferllm.interfaces.cli import app


def validation_table(system: str, rows, title: str) -> Table:
    t = Table("id", "measurement", "kind", "measured / claimed", "model", "error", "ok", title=title)
    t.columns[1].max_width = 56
    for r in rows:
        m = r.measurement
        err = f"{m.error(r.value):+.1%}" if (m.absolute or m.check == "about") else "-"
        within = ("yes" if r.passes else "[bold red]no[/]") + (f" (±{m.tolerance:.0%})" if m.tolerance else "")
        t.add_row(m.id, m.quantity, m.kind, m.shown(), format_value(r.value, m.unit), err, within)
    return t


@app.command()
def validate(
    wafer: Optional[List[str]] = typer.Option(None, "--wafer", help="Preset(s) to validate (default: wse2 and wse3)."),
    gpu: bool = typer.Option(True, "--gpu/--no-gpu", help="Also show the GPU measurements against the roofline."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Every SPEC section 5 measurement beside the model's value and the error."""
    from waferllm.calibration.validate import SYSTEMS, as_dicts, summary, validation_rows
    from waferllm.hardware import get_wafer

    names = wafer or list(SYSTEMS)
    wafers = {n: get_wafer(n) for n in names}
    rows = validation_rows(wafers, gpu=gpu)
    sums = summary(wafers, rows)
    if as_json:
        typer.echo(json.dumps({"rows": as_dicts(rows), "wafers": sums}, indent=2, default=float))
        return
    console = Console(width=max(Console().width, 150))
    for system, rs in rows.items():
        if system == "gpu-roofline":
            title = "A100 measurements (SGLang) against the ideal GPU roofline: not fitted, shows the roofline's gap"
        elif system == "gpu-calibrated":
            title = "A100 measurements (SGLang) against the calibrated GPU model (fitted to them)"
        else:
            s = sums[system]
            rec = "-" if s["recorded_loss"] is None else f"{s['recorded_loss']:.4f}"
            title = f"{system}: model against its measurements (loss {s['loss']:.4f}; recorded at the fit: {rec})"
        console.print(validation_table(system, rs, title))


@app.command()
def calibrate(
    wafer: Optional[List[str]] = typer.Option(None, "--wafer", help="Preset(s) to fit (default: wse2 and wse3)."),
    write: bool = typer.Option(False, "--write", help="Store the fitted constants and their provenance in the presets."),
    iters: int = typer.Option(60, "--iters", min=1, help="Nelder-Mead iterations per fit."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Fit the calibrated GPU model of this preset instead (a100)."),
    measurements: Optional[str] = typer.Option(None, "--measurements",
                                               help="With --gpu: a measurement file (e.g. from benchmarks/gpu_measure.py)."),
) -> None:
    """Fit the free constants of the wafer presets to SPEC section 5, absolute measurements first."""
    from waferllm.calibration.fit import PLANS, calibrate as run
    from waferllm.errors import HardwareError

    if gpu:
        from waferllm.baselines.gpu_calibrated import calibrate_gpu

        calibrate_gpu(gpu, measurements, write=write, log=Console().print)
        return
    if measurements:
        raise HardwareError("--measurements applies to --gpu fits; the wafer fit reads SPEC section 5's measurements")
    names = tuple(wafer or PLANS)
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        raise HardwareError(f"no calibration plan for {', '.join(unknown)}; presets with measurements: {', '.join(PLANS)}")
    console = Console(width=max(Console().width, 150))
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("fitting: {task.completed} model evaluations"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("fit", total=None)
        results = run(names, iters=iters, write=write, log=console.print, on_eval=lambda: bar.advance(task))
    for name, r in results.items():
        console.print(f"[bold]{name}[/]: " + ", ".join(f"{k}={v:g}" for k, v in r["values"].items())
                      + f"; loss {r['loss']:.4f}")
        console.print(validation_table(name, r["rows"], f"{name} after the fit"))
