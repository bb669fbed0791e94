"""`waferllm predict --model NAME|PATH --wafer wse2 --input-len N --output-len M [...]`."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.console import Console

from waferllm.interfaces import algorithm_options
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
    weights: str = typer.Option("fp16", "--weights", help="Layer weights on the PEs: fp16 (dense, in --dtype), int8 or "
                                                          "int4 (GGUF Q8_0/Q4_0 blocks, dequantised by the PEs), or "
                                                          "native (a GGUF model file's own Q8_0/Q4_0)."),
    defect_rate: Optional[float] = typer.Option(None, "--defect-rate", help="Fraction of defective PEs (e.g. 0.001), "
                                                "drawn with --seed; the report sets the perfect wafer beside it."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the defect map of --defect-rate (default 0)."),
    recovery: Optional[str] = typer.Option(None, "--recovery", help="How defective PEs are handled: spare (the "
                                           "hardware's spare rows/columns, default), reroute (fault-aware placement "
                                           "and routing around them) or avoid (regions skip them)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write the floorplan, SRAM, time and GPU pictures (PNG) "
                                                            "into this folder."),
    wafers: str = typer.Option("1", "--wafers", help="Wafers the layers are pipelined over: N, or auto (the fastest "
                                                     "count from the fewest that hold the model up to twice that)."),
    wafer_layout: str = typer.Option("auto", "--wafer-layout", help="With --wafers: shared (every wafer runs both "
                                                                    "phases on its layers), split (prefill and decode "
                                                                    "on different wafers) or auto (the faster)."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="With --wafers: cluster preset (cs2, cs3) or "
                                                                  "TOML/JSON file (the link between the systems; its "
                                                                  "wafer replaces --wafer). Default: the wafer's systems."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Host threads for BLAS (default: the library's own). "
                                                                  "Only host time changes."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="Speculative decoding: a draft model with "
                                              "the target's vocabulary (preset or path), on the PEs the target's decode "
                                              "leaves idle; needs --acceptance."),
    draft_layers: Optional[int] = typer.Option(None, "--draft-layers", help="Speculative decoding with the target's "
                                               "first N layers as the draft; needs --acceptance."),
    speculative_tokens: Optional[int] = typer.Option(None, "--speculative-tokens",
                                                     help="Drafts per round (with a draft; default 4)."),
    acceptance: Optional[float] = typer.Option(None, "--acceptance", help="With a draft: the probability the target "
                                               "accepts each draft (a shape-only run has no tokens to compare)."),
    draft_grid: Optional[int] = typer.Option(None, "--draft-grid", help="With a draft: its regions' side (default: "
                                             "the largest that fits beside the target)."),
    draft_ahead: bool = typer.Option(False, "--draft-ahead", help="With a draft: it drafts the next round while the "
                                     "target verifies (its PEs are its own)."),
    prefill_attention: str = algorithm_options.PREFILL_ATTENTION,
    decode_collectives: str = algorithm_options.DECODE_COLLECTIVES,
    gemv_ktree: str = algorithm_options.GEMV_KTREE,
    gemv_overlap: str = algorithm_options.GEMV_OVERLAP,
    beyond_paper: bool = algorithm_options.BEYOND_PAPER,
) -> None:
    """Predict TTFT, TPOT, throughput and energy of a model on a wafer (dry run: no weights needed)."""
    from waferllm.engine.predict import check_request, predict_run
    from waferllm.engine.run_config import RunConfig
    from waferllm.engine.tuner import tune_grids
    from waferllm.errors import PlacementError, RequestError
    from waferllm.hardware import get_wafer, parse_overrides
    from waferllm.interfaces.report import print_report

    from waferllm.interfaces.cmd_generate import with_defect_options
    from waferllm.models.quant import resolve_weights
    from waferllm.engine.threads import set_threads

    set_threads(threads)
    cfg = _config(model)
    check_request(cfg, input_len, output_len, extrapolate, allow_beyond_context)  # before tuning
    spec = with_defect_options(get_wafer(wafer, **parse_overrides(set_)), defect_rate, seed, recovery)
    weights = resolve_weights(weights, model)

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
    algorithms = algorithm_options.chosen(prefill_attention, decode_collectives, gemv_ktree, beyond_paper,
                                          gemv_overlap)
    run = RunConfig.for_request(input_len, output_len, prefill_grid=pg, decode_grid=dg, dtype=dtype,
                                kv_scheme=kv_scheme, layers=extrapolate, weights=weights, **algorithms)
    from waferllm.interfaces import cluster_report

    n_wafers = cluster_report.parse_wafers(wafers)
    if n_wafers != 1 or cluster is not None:
        _predict_cluster(cfg, spec, run, n_wafers, wafer_layout, cluster, input_len, output_len, extrapolate, plot,
                         allow_beyond_context, as_json)
        return
    spec_cfg = None
    drafting = draft_model is not None or draft_layers is not None
    stray = [flag for flag, v in (("--speculative-tokens", speculative_tokens), ("--acceptance", acceptance),
                                  ("--draft-grid", draft_grid), ("--draft-ahead", draft_ahead or None))
             if v is not None]
    if stray and not drafting:
        raise RequestError(f"{', '.join(stray)} only appl{'y' if len(stray) > 1 else 'ies'} with a draft: add "
                           "--draft-model NAME|PATH or --draft-layers N, or drop them")
    if drafting and plot:
        raise RequestError("--plot draws one model's placement; a prediction with a draft has two: drop --plot")
    if drafting:
        speculative_tokens = 4 if speculative_tokens is None else speculative_tokens
        from waferllm.engine.speculative import SpeculativeConfig

        if n_wafers != 1 or cluster is not None:
            raise RequestError("speculative decoding (--draft-model, --draft-layers) runs on one wafer: drop --wafers")
        spec_cfg = SpeculativeConfig(num_speculative_tokens=speculative_tokens, draft_layers=draft_layers,
                                     draft_model=draft_model, draft_grid=draft_grid, acceptance=acceptance,
                                     draft_ahead=draft_ahead)
        if acceptance is None:
            raise RequestError("a shape-only prediction has no tokens to compare: give --acceptance (0..1), the "
                               "probability the target accepts each draft")
        run = run.replace(speculative_tokens=speculative_tokens)
    tuning = None
    if pg is None or dg is None:
        try:
            tuning = tune_grids(cfg, spec, run, input_len, output_len)
        except PlacementError as exc:  # say how many wafers would hold it
            raise cluster_report.with_wafers_needed(exc, cfg, spec, run) from None
        run, pg, dg = tuning["run"], tuning["prefill_grid"], tuning["decode_grid"]
    if spec_cfg is not None:
        _predict_speculative(cfg, spec, run, spec_cfg, input_len, output_len, allow_beyond_context, as_json)
        return
    m = predict_run(cfg, spec, run, input_len, output_len, allow_beyond_context=allow_beyond_context)
    if spec.defective_pes:
        from waferllm.engine.defect_impact import defect_impact

        m["defects"] = defect_impact(cfg, spec, run, input_len, output_len, m, allow_beyond_context,
                                     rate=defect_rate, seed=seed)
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
                  f"{kv_scheme} KV cache" + (f", {weights} weights" if weights != "fp16" else "")
                  + (f", tuned grids {pg}/{dg}" if tuning else "")
                  + "".join(f", {k.replace('_', ' ')} {v}" for k, v in m.get("algorithms", {}).items()
                            if v != "paper"))
    print_report(m, console, plan=m["placement"], gpus=m.get("gpu_baselines"))
    if "defects" in m:
        _print_defects(console, m["defects"])
    for p in written:
        console.print(f"wrote {p}", soft_wrap=True)  # a path stays on one line


def _print_defects(console, d: dict) -> None:
    """The defective wafer beside the perfect one."""
    from rich.table import Table

    what = f"{d['defective_pes']:,} defective PEs" + (f" (rate {d['rate']:g}, seed {d['seed'] or 0})"
                                                     if d.get("rate") is not None else "")
    console.print(f"{what}, recovery [bold]{d['recovery']}[/], against a perfect wafer:")
    t = Table()
    for col in ("", "perfect", "defective", "change"):
        t.add_column(col, justify="right")
    rows = (("TTFT (ms)", "ttft_s", 1e3, "+", 3), ("TPOT (ms)", "tpot_s", 1e3, "+", 4),
            ("decode TPR (tok/s)", "decode_tokens_per_s", 1, "-", 1), ("e2e TPR (tok/s)", "e2e_tokens_per_s", 1, "-", 1),
            ("KV capacity (tokens)", "kv_capacity_tokens", 1, "-", 0))
    for label, key, scale, sign, digits in rows:
        a, b, f = d["perfect"].get(key), d["defective"].get(key), d["lost_fraction"].get(key)
        if a is None or b is None:
            continue
        change = "0%" if not f else f"{sign if f > 0 else '+' if sign == '-' else '-'}{abs(f) * 100:.2f}%"
        t.add_row(label, f"{a * scale:,.{digits}f}", f"{b * scale:,.{digits}f}", change)
    console.print(t)


def _predict_cluster(cfg, spec, run, wafers, layout, cluster, input_len, output_len, extrapolate, plot,
                     allow_beyond_context, as_json) -> None:
    """``--wafers N|auto``: the model pipelined over the wafers of a cluster."""
    from waferllm.engine.predict import predict_cluster
    from waferllm.errors import RequestError
    from waferllm.interfaces.cluster_report import cluster_spec, print_cluster
    from waferllm.interfaces.report import print_report

    if extrapolate is not None:
        raise RequestError("--extrapolate-from-layers runs part of the model on one wafer; with --wafers every layer "
                           "is placed: drop one of them")
    if plot:
        raise RequestError("--plot draws one wafer; it does not combine with --wafers")
    if layout not in ("auto", "shared", "split"):
        raise RequestError(f"--wafer-layout must be shared, split or auto, got {layout!r}")
    c = cluster_spec(spec, cluster)
    m = predict_cluster(cfg, c, run, input_len, output_len, wafers=wafers, layout=layout,
                        allow_beyond_context=allow_beyond_context)
    m["weights"] = run.weights
    if as_json:
        typer.echo(json.dumps(m, indent=2, default=float))
        return
    console = Console()
    best = m["cluster_search"]["chosen"]
    console.print(f"[bold]{cfg.name}[/] on [bold]{best['wafers']} x {c.wafer.name}[/] ({best['layout']} layout, "
                  f"grids {best['prefill_grid']}/{best['decode_grid']}): {input_len} input + {output_len} output "
                  f"tokens, {run.dtype}, {run.kv_scheme} KV cache")
    print_report(m, console, plan=m["placement"], gpus=m.get("gpu_baselines"))
    print_cluster(m, console)


def _predict_speculative(cfg, spec, run, spec_cfg, input_len, output_len, allow_beyond_context, as_json) -> None:
    """The request with a draft beside the target, and the target alone, side by side."""
    from rich.table import Table

    from waferllm.engine.predict import predict_run
    from waferllm.engine.speculative import predict_speculative

    draft_config = _config(spec_cfg.draft_model) if spec_cfg.draft_model is not None else None
    alone = predict_run(cfg, spec, run.replace(speculative_tokens=0), input_len, output_len, False, False,
                        allow_beyond_context)
    m = predict_speculative(cfg, spec, run, spec_cfg, input_len, output_len, draft_config)
    if as_json:
        typer.echo(json.dumps({"speculative": m, "target_alone": alone}, indent=2, default=float))
        return
    s = m["speculative"]
    console = Console()
    console.print(f"[bold]{cfg.name}[/] with the draft [bold]{s['draft']}[/] on {s['draft_grid']}x{s['draft_grid']} "
                  f"regions of {spec.name}: {input_len} + {output_len} tokens, {spec_cfg.num_speculative_tokens} drafts "
                  f"per round, assumed acceptance {spec_cfg.acceptance:.0%}")
    t = Table()
    for col in ("", "target alone", "with the draft"):
        t.add_column(col, justify="right")
    def shown(v, scale, digits):  # a figure a one-token request does not have (no decode step) is "-"
        return "-" if v is None else f"{v * scale:,.{digits}f}"

    for label, key, scale, digits in (("TTFT (ms)", "ttft_s", 1e3, 3), ("TPOT (ms)", "tpot_s", 1e3, 4),
                                      ("decode tokens/s", "decode_tokens_per_s", 1, 0),
                                      ("e2e tokens/s", "e2e_tokens_per_s", 1, 0), ("energy (J)", "energy_j", 1, 3)):
        t.add_row(label, shown(alone[key], scale, digits), shown(m[key], scale, digits))
    console.print(t)
    split = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in s["decode_s"].items())
    rate = "-" if s["acceptance_rate"] is None else f"{s['acceptance_rate']:.0%}"
    console.print(f"{s['rounds']} rounds, {shown(s['tokens_per_round'], 1, 2)} tokens per round, {rate} of the drafts "
                  f"examined accepted; decode time: {split}")
