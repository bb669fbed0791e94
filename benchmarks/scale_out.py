"""Scale-out: how many wafers each model needs, and what is left of the speed.

    .venv/bin/python benchmarks/scale_out.py [--markdown benchmarks/RESULTS-scale-out.md]
        [--plot docs/scale_out.png] [--input-len 2048] [--output-len 128] [--models ...] [--wafers wse2 wse3]

For every model and wafer, ``waferllm.engine.predict.predict_cluster(wafers="auto",
layout="auto")``: the fewest wafers that hold the whole model (every layer placed on every
wafer's own regions, the shares planned), then every count up to twice that, in both layouts
(``shared``: every wafer runs both phases on its layers; ``split``: prefill and decode on
different wafers), each on the grids its ranking estimate picks, predicted in full as a dry
run of the engine (batch 1, fp16, shift-based KV cache); the fastest by request time is
reported, with its band (the wafer's and the link's assumed constants at the ends of their
ranges). Beside it: the GPU baselines of the same request (``waferllm.baselines``: ideal
roofline and calibrated model per setup). No layer is extrapolated: every point places and
runs the whole model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from waferllm.baselines import baseline_rows
from waferllm.engine.predict import predict_cluster
from waferllm.engine.run_config import RunConfig
from waferllm.hardware import get_wafer
from waferllm.hardware.cluster import cluster_for
from waferllm.models.presets import get_model_preset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Out  # noqa: E402

MODELS = ("llama3-8b", "llama2-13b", "codellama-34b", "llama3-70b", "qwen2-72b", "405b-shape")
GPU_SETUPS = ("A100-80GB", "8xA100-80GB TP", "2x8xA100-80GB TP", "H100-SXM", "H200", "B200")


def model(name: str):
    """A preset, or the 405B-class shape: LLaMA-3.1-405B's dimensions on the llama3-70b preset."""
    if name == "405b-shape":
        return get_model_preset("llama3-70b").replace(name="405b-shape", hidden_size=16384, num_layers=126,
                                                      num_heads=128, num_kv_heads=8, intermediate_size=53248,
                                                      vocab_size=128256)
    return get_model_preset(name)


def _f(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _ms(s) -> str:
    return "-" if s is None else _f(s * 1e3)


def _layout(o: dict) -> str:
    """An option's layout; a split as ``split p+d`` (p prefill wafers, d decode wafers)."""
    p = o["prefill_wafers"]
    return o["layout"] + (f" {p}+{o['wafers'] - p}" if p else "")


def _band(m: dict, key: str, scale: float = 1.0) -> str:
    lo, hi = m.get(f"{key}_low"), m.get(f"{key}_high")
    if lo is None or hi is None:
        return "-"
    return f"{_f(lo * scale)}-{_f(hi * scale)}"


WEIGHTS = ("fp16", "int8", "int4")


def section_weights(out: Out, wafers, models, n_in: int, n_out: int) -> None:
    """Wafers needed per weight format: planned (every wafer's share placed on its regions,
    checked by planning the cluster), not run; Q8_0/Q4_0 weights stored at their size."""
    from waferllm.engine.cluster import fewest_any_grid
    from waferllm.engine.placement import plan
    from waferllm.errors import WaferLLMError

    out("## Wafers needed by weight format")
    out()
    out(f"The fewest wafers that hold each model ({n_in} + {n_out} tokens, `shared` layout, any candidate grid), "
        "with its layer matrices stored as fp16, or as GGUF Q8_0 / Q4_0 blocks dequantised on the PEs "
        "(`--weights int8|int4`). Planned, not run: `waferllm predict --wafers auto --weights ...` gives the "
        "figures.")
    out()
    rows = []
    for wname in wafers:
        wafer = get_wafer(wname)
        for name in models:
            cfg = model(name)
            cells = []
            for weights in WEIGHTS:
                run = RunConfig.for_request(n_in, n_out, weights=weights)
                try:
                    one = None
                    for g in (360, 420, 480, 540, 600, 660, 720):
                        try:
                            plan(cfg, wafer, g, g, run.max_seq_len, prompt_len=n_in, weights=weights)
                            one = g
                            break
                        except WaferLLMError:
                            continue
                    if one is not None:
                        cells.append(f"1 ({one}/{one})")
                        continue
                    found = fewest_any_grid(cfg, wafer, run)
                    cells.append("-" if found is None else f"{found[0]} ({found[1]}/{found[2]})")
                except WaferLLMError as exc:
                    cells.append(f"error: {str(exc)[:60]}")
            rows.append([name, wname, *cells])
    out.table(["model", "wafer", "fp16 wafers (grids)", "int8 wafers (grids)", "int4 wafers (grids)"], rows)
    out()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--wafers", nargs="+", default=["wse2", "wse3"])
    args = ap.parse_args()
    out = Out()
    n_in, n_out = args.input_len, args.output_len
    out.header("Scale-out: models pipelined over wafers", "scale_out.py")
    out(f"Every point: one request of {n_in} input + {n_out} output tokens, batch 1, fp16 weights, KV cache and "
        "activations, shift-based KV cache, `predict_cluster(wafers=\"auto\", layout=\"auto\")`: the fewest wafers "
        "that hold the whole model (each wafer's share planned on its own regions), then every count up to twice "
        "that, in both layouts, each predicted in full (a dry run of the engine: every layer placed and run, none "
        "extrapolated); the fastest by request time (TTFT + transition + decode) is reported. Bands: the same "
        "request with the wafer's and the link's `assumed` constants (hop latency 1-5 us, hand-off overhead "
        "2-200 us, 1-4 hops, ...) at the ends of their ranges, widened by the wafer's calibration error. "
        "Link: `cs2` / `cs3` presets (1.2 Tb/s per system each direction, SPEC section 7).")
    out()
    results: dict = {}
    for wname in args.wafers:
        wafer = get_wafer(wname)
        cluster = cluster_for(wafer)
        for name in args.models:
            cfg = model(name)
            run = RunConfig.for_request(n_in, n_out)
            t0 = time.perf_counter()
            m = predict_cluster(cfg, cluster, run, n_in, n_out, allow_beyond_context=True)
            m["bench_wall_s"] = time.perf_counter() - t0
            results[(wname, name)] = m
            s = m["cluster_search"]
            print(f"  {name} on {wname}: fewest {s['fewest_wafers']}, chosen {s['chosen']['wafers']} "
                  f"{s['chosen']['layout']}, decode TPR {m['decode_tokens_per_s']:.1f}, "
                  f"{m['bench_wall_s']:.1f} s host", flush=True)

    out("## 1. Wafers needed and the figures of the fastest count")
    out()
    out("`fewest`: the fewest wafers that hold the whole model on any candidate grid (either layout). `chosen`: "
        "the fastest option the search predicted (count, layout, prefill/decode grids), searched from `fewest` up "
        "to twice that, the model's layer count, or the cluster's `max_wafers` (64 in the `cs2`/`cs3` presets), "
        "whichever is least. TPR = tokens/s per request: decode TPR = 1/TPOT; e2e TPR = output tokens / "
        "(TTFT + transition + decode). Bands in the columns after each figure. `link MB`: bytes over the links "
        "in the request; `energy J`: from the events, with every system's static power for the whole request.")
    out()
    out("Why the counts are what they are: a wafer holds a model's layers on square regions of its grid (and "
        "the smaller squares in the strips they leave); the layers must fit beside the prefill activations of "
        "the prompt, the decode KV cache and, on the wafers that hold them, the vocabulary tables, with 8 KB "
        "per PE reserved for code (assumed). So a wse2 wafer (30.5 GB usable) holds 9-10 of llama3-70b's "
        "1.7 GB layers (17 would fill its SRAM), and two 405B-class layers (6.4 GB each): 63 wafers for 126. Its "
        "16K-wide vocabulary tables (8.4 GB) do not fit one wafer beside a layer, so they are split over the "
        "first wafers.")
    out()
    rows = []
    for (wname, name), m in results.items():
        s, c = m["cluster_search"], m["cluster_search"]["chosen"]
        rows.append([name, wname, s["fewest_wafers"], c["wafers"], _layout(c), f"{c['prefill_grid']}/{c['decode_grid']}",
                     _ms(m["ttft_s"]), _band(m, "ttft_s", 1e3), _f(m["tpot_s"] * 1e6), _band(m, "tpot_s", 1e6),
                     _f(m["decode_tokens_per_s"]), _band(m, "decode_tokens_per_s"), _f(m["e2e_tokens_per_s"]),
                     _band(m, "e2e_tokens_per_s"), f"{m.get('kv_capacity_tokens', 0):,}",
                     _f(m.get("interwafer_bytes", 0) / 1e6), _f(m["energy_j"]), _f(m["bench_wall_s"], 3)])
    out.table(["model", "wafer", "fewest", "chosen", "layout", "grids", "TTFT ms", "band", "TPOT us", "band",
               "decode TPR", "band", "e2e TPR", "band", "KV capacity (tokens)", "link MB", "energy J", "host s"],
              rows)

    out("## 2. GPU baselines of the same request")
    out()
    out("`waferllm.baselines.gpu_baselines`: per setup the ideal roofline (a bound) and the model calibrated on "
        "SGLang's measured A100 numbers (H100/H200/B200 inherit its efficiency factors). `fits`: the weights "
        "and KV cache fit the setup's HBM. Decode TPR / e2e TPR, tokens/s per request.")
    out()
    header = ["model"] + [f"{g} {k}" for g in GPU_SETUPS for k in ("roofline", "calibrated")]
    rows = []
    wafer0 = args.wafers[0]
    for name in args.models:
        m = results[(wafer0, name)]
        by = {(r["device"], r["baseline"]): r for r in baseline_rows(m["gpu_baselines"])}
        row = [name]
        for g in GPU_SETUPS:
            for k in ("roofline", "calibrated"):
                r = by.get((g, k))
                row.append("-" if r is None else f"{_f(r['decode_tokens_per_s'])} / {_f(r['e2e_tokens_per_s'])}"
                           + ("" if r.get("fits", True) else " (does not fit)"))
        rows.append(row)
    out.table(header, rows)

    out("## 3. Every option the search predicted")
    out()
    out("Per model and wafer: each count from the fewest to twice that, in each layout, on the grids the ranking "
        "estimate picked for it (a split `p+d`: p prefill wafers, d decode wafers). More wafers are not only more "
        "link crossings: with fewer layers per wafer, more of them sit on full-size regions rather than the "
        "smaller squares around them, and prefill attention can take more kv heads per pass.")
    out()
    rows = []
    for (wname, name), m in results.items():
        best = m["cluster_search"]["chosen"]
        for o in m["cluster_search"]["options"]:
            chosen = (o["wafers"], o["layout"], o["prefill_wafers"]) == (best["wafers"], best["layout"],
                                                                         best["prefill_wafers"])
            rows.append([name, wname, o["wafers"], _layout(o), f"{o['prefill_grid']}/{o['decode_grid']}", _ms(o["ttft_s"]),
                         _f(o["tpot_s"] * 1e6) if o["tpot_s"] else "-", _ms(o["transition_s"]), _ms(o["e2e_s"]),
                         _f(o["e2e_tokens_per_s"]), "**chosen**" if chosen else (o["note"][:80] or "")])
    out.table(["model", "wafer", "wafers", "layout", "grids", "TTFT ms", "TPOT us", "transition ms", "e2e ms",
               "e2e TPR", ""], rows)

    out("## 4. Per-wafer placement of the chosen option")
    out()
    rows = []
    for (wname, name), m in results.items():
        for w in m["placement"].get("per_wafer", []):
            v = w["vocab"]
            rows.append([name, wname, w["wafer"], "+".join(w["phases"]), f"{w['layers'][0]}-{w['layers'][1] - 1}",
                         f"{v[0]:,}-{v[1] - 1:,}" if v[1] > v[0] else "-",
                         ", ".join(map(str, w["prefill"]["region_sides"])) if "prefill" in w else "-",
                         ", ".join(map(str, w["decode"]["region_sides"])) if "decode" in w else "-"])
        if not m["placement"].get("per_wafer"):
            p = m["placement"]
            rows.append([name, wname, 0, "prefill+decode", f"0-{cfg_layers(name) - 1}", "all",
                         ", ".join(map(str, p["prefill"]["region_sides"])),
                         ", ".join(map(str, p["decode"]["region_sides"]))])
    out.table(["model", "wafer", "wafer #", "phases", "layers", "vocabulary", "prefill regions (sides)",
               "decode regions (sides)"], rows)

    # the 70B-class models in the three weight formats (planning only: a few minutes)
    section_weights(out, args.wafers, [m for m in ("llama3-70b", "qwen2-72b") if m in args.models], n_in, n_out)
    if args.plot:
        _plot(results, args, out)
    if args.markdown:
        out.save(args.markdown)
        print(f"wrote {args.markdown}")


def cfg_layers(name: str) -> int:
    return model(name).num_layers


def _plot(results: dict, args, out: Out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = args.models
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / (len(args.wafers) + 2)
    for ax, key, title in ((axes[0], "decode_tokens_per_s", "decode TPR (tokens/s per request)"),
                           (axes[1], "e2e_tokens_per_s", "end-to-end TPR (tokens/s per request)")):
        for i, wname in enumerate(args.wafers):
            vals = [results[(wname, n)][key] for n in names]
            lo = [v - results[(wname, n)].get(f"{key}_low", v) for v, n in zip(vals, names)]
            hi = [results[(wname, n)].get(f"{key}_high", v) - v for v, n in zip(vals, names)]
            xs = [j + i * width for j in range(len(names))]
            bars = ax.bar(xs, vals, width, yerr=[lo, hi], capsize=2, label=f"{wname} cluster")
            for b, n in zip(bars, names):
                ax.annotate(str(results[(wname, n)]["cluster_search"]["chosen"]["wafers"]),
                            (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
        for k, (setup, base) in enumerate((("8xA100-80GB TP", "calibrated"), ("2x8xA100-80GB TP", "calibrated"))):
            vals = []
            for n in names:
                by = {(r["device"], r["baseline"]): r for r in baseline_rows(results[(args.wafers[0], n)]["gpu_baselines"])}
                vals.append((by.get((setup, base)) or {}).get(key) or 0)
            xs = [j + (len(args.wafers) + k) * width for j in range(len(names))]
            ax.bar(xs, vals, width, label=f"{setup} ({base})", hatch="//" if k else "..", alpha=0.7)
        ax.set_xticks([j + width * (len(args.wafers) + 1) / 2 for j in range(len(names))])
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"batch 1, fp16, {args.input_len}+{args.output_len} tokens; numbers on bars: wafers used", fontsize=10)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    out(f"![decode and end-to-end TPR per model]({os.path.relpath(args.plot, Path(args.markdown or '.').parent)})")
    out()


if __name__ == "__main__":
    main()
