"""`waferllm hardware [NAME|FILE] [--json] [--set KEY=VALUE]`."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from waferllm.hardware import get_wafer, parse_overrides, preset_names
from waferllm.hardware.gpu import GPUS
from waferllm.interfaces.cli import app


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


@app.command()
def hardware(
    name: str = typer.Argument("wse2", help="Preset name (wse2, wse3) or a TOML/JSON wafer file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    provenance: bool = typer.Option(False, "--provenance", help="With --json: every constant with its source."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a constant: KEY=VALUE (repeatable)."),
) -> None:
    """Describe a wafer: cores, SRAM, peak FLOP/s, bandwidths, and where each constant came from."""
    spec = get_wafer(name, **parse_overrides(set_))
    summary = spec.summary()
    if as_json:
        if provenance:
            summary["constants"] = spec.to_dict(with_provenance=True)
        typer.echo(json.dumps(summary, indent=2))
        return
    console = Console()
    console.print(f"[bold]{spec.name}[/]  {spec.description}")
    t = Table("figure", "value", title="derived figures")
    t.add_row("mesh", f"{spec.rows} x {spec.cols} = {spec.pes:,} PEs ({len(spec.defective_pes)} defective"
                      + (f", recovery {spec.defect_recovery})" if spec.defective_pes else ")"))
    t.add_row("SRAM", f"{spec.sram_bytes_per_pe:,} B/PE ({spec.usable_sram_bytes_per_pe:,} usable), total {_si(spec.total_sram_bytes, 'B')}")
    t.add_row("peak compute", f"{_si(spec.peak_flops('fp16'), 'FLOP/s')} fp16, {_si(spec.peak_flops('fp32'), 'FLOP/s')} fp32")
    t.add_row("SRAM bandwidth", _si(spec.aggregate_sram_bandwidth, "B/s"))
    t.add_row("fabric bandwidth", f"{_si(spec.aggregate_fabric_bandwidth, 'B/s')} aggregate, {_si(spec.bisection_bandwidth, 'B/s')} bisection")
    t.add_row("clock", _si(spec.clock_hz, "Hz"))
    t.add_row("power", _si(spec.power_w, "W"))
    console.print(t)
    c = Table("constant", "value", "status", "source", title="constants")
    for key, value in spec.to_dict(with_provenance=False).items():
        if key in ("name", "description", "defective_pes", "defect_recovery"):
            continue
        p = spec.source_of(key)
        c.add_row(key, f"{value:g}" if isinstance(value, float) else str(value), p.status, p.source)
    console.print(c)
    console.print(f"presets: {', '.join(preset_names())}; GPU presets: {', '.join(g.name for g in GPUS.values())}")
