"""`waferllm predict --model NAME|PATH --wafer wse2 --input-len N --output-len M [...]`."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.console import Console

from waferllm.interfaces.cli import app


def _config(model: str):
    """A preset name or a model path (a config.json alone is enough: no weights are read)."""
    from waferllm.models.loader import resolve_config

    return resolve_config(model)


@app.command()
def predict(
    model: str = typer.Option("llama3-8b", "--model", "-m", help="Preset (llama3-8b, llama2-13b, ...) or a model path: a GGUF, an HF "
                                                     "folder, or just its config.json (no weights needed)."),
    wafer: str = typer.Option("wse2", "--wafer", help="Wafer preset name or TOML/JSON file."),
    input_len: int = typer.Option(2048, "--input-len", help="Prompt tokens."),
    output_len: int = typer.Option(128, "--output-len", help="Generated tokens."),
    prefill_grid: str = typer.Option("auto", "--prefill-grid", help="P (a PxP region) or auto (tuned)."),
    decode_grid: str = typer.Option("auto", "--decode-grid", help="P (a PxP region) or auto (tuned)."),
    dtype: str = typer.Option("fp16", "--dtype", help="fp16 or fp32."),
    kv_scheme: str = typer.Option("shift", "--kv-scheme", help="shift (WaferLLM) or concat (baseline)."),
    extrapolate: Optional[int] = typer.Option(None, "--extrapolate-from-layers",
                                              help="Place and run only K layers, scale to the whole model."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a wafer constant: KEY=VALUE."),
    allow_beyond_context: bool = typer.Option(False, "--allow-beyond-context",
                                              help="Predict a request longer than the model's context."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write the floorplan, SRAM, time and GPU pictures (PNG) "
                                                            "into this folder."),
) -> None:
    """Predict TTFT, TPOT, throughput and energy of a model on a wafer (dry run: no weights needed)."""
    from waferllm.engine.predict import check_request, predict_run
    from waferllm.engine.run_config import RunConfig
    from waferllm.engine.tuner import tune_grids
    from waferllm.errors import RequestError
    from waferllm.hardware import get_wafer, parse_overrides
    from waferllm.interfaces.report import print_report

    cfg = _config(model)
    check_request(cfg, input_len, output_len, extrapolate, allow_beyond_context)  # before tuning
    spec = get_wafer(wafer, **parse_overrides(set_))

    def grid(v, what):
        if v == "auto":
            return None
        try:
            return int(v)
        except ValueError:
            raise RequestError(f"{what} must be an integer or 'auto', got {v!r}") from None

    pg, dg = grid(prefill_grid, "--prefill-grid"), grid(decode_grid, "--decode-grid")
    if input_len < 1 or output_len < 1:
        raise RequestError(f"--input-len and --output-len must be positive, got {input_len} and {output_len}")
    run = RunConfig.for_request(input_len, output_len, prefill_grid=pg, decode_grid=dg, dtype=dtype,
                                kv_scheme=kv_scheme, layers=extrapolate)
    tuning = None
    if pg is None or dg is None:
        tuning = tune_grids(cfg, spec, run, input_len, output_len)
        run, pg, dg = tuning["run"], tuning["prefill_grid"], tuning["decode_grid"]
    m = predict_run(cfg, spec, run, input_len, output_len, allow_beyond_context=allow_beyond_context)
    if tuning:
        m["tuning"] = {"prefill_grid": pg, "decode_grid": dg,
                       "tried_s": {ph: {str(g): v for g, v in d.items()} for ph, d in tuning["tried"].items()}}
    written = []
    if plot:
        from waferllm.explore.plots import plot_prediction, region_bytes

        written = plot_prediction(m, plot, region_bytes(cfg, spec, run))
    if as_json:
        typer.echo(json.dumps(m, indent=2, default=float))
        return
    console = Console()
    console.print(f"[bold]{cfg.name}[/] on [bold]{spec.name}[/]: {input_len} input + {output_len} output tokens, {dtype}, "
                  f"{kv_scheme} KV cache" + (f", tuned grids {pg}/{dg}" if tuning else ""))
    print_report(m, console, plan=m["placement"], gpus=m.get("gpu_baselines"))
    for p in written:
        console.print(f"wrote {p}")
