"""Engine predictions: LLaMA3-8B and LLaMA2-13B on a WSE-2, beside the GPU roofline.

    .venv/bin/python benchmarks/engine_predictions.py [--wafer wse2] [--markdown benchmarks/RESULTS-engine.md]
        [--plot docs/engine_predictions.png] [--quick]

Every point is a dry-run ``waferllm.engine.predict.predict`` (the engine's own code path on
shapes only, batch 1, fp16, shift-based KV cache). Neither model fits one WSE-2 with full
placement on these grids (``PlacementError``, shown once in section 1), so every point uses
``layers=1``: the first layer is placed and run on the given grids and the per-layer time is
scaled to the whole model (the paper's "extrapolate from layers" method). The LM head and the
transition are run as placed for one layer.

1. Full placement: the PlacementError for llama3-8b / llama2-13b, and which grids (if any) fit.
2. Extrapolation check: smollm2-135m (which does fit) with full placement vs ``layers=1``.
3. Prefill grid sweep 480/600/720 (decode grid 420) and decode grid sweep 420/540/660
   (prefill grid 600), for input/output lengths 2048/128, 4096/128, 2048/2048, 4096/4096:
   prefill tokens/s, decode TPR (1/TPOT), end-to-end TPR, next to the GPU roofline
   (A100, 8xA100 tensor-parallel, H100; an ideal floor, not SGLang measurements).
4. A denser decode-grid sweep (240..720) for the plot: decode TPR and e2e TPR vs decode
   grid per model and length, GPU roofline as horizontal lines.

The host wall time of each prediction is recorded (``host s`` columns).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

from waferllm.engine.placement import plan
from waferllm.engine.predict import predict
from waferllm.errors import PlacementError
from waferllm.hardware import get_wafer
from waferllm.models.presets import get_model_preset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Out, code_version  # noqa: E402

MODELS = ("llama3-8b", "llama2-13b")
LENGTHS = ((2048, 128), (4096, 128), (2048, 2048), (4096, 4096))
PREFILL_GRIDS = (480, 600, 720)
DECODE_GRIDS = (420, 540, 660)
FIXED_DECODE = 420
FIXED_PREFILL = 600
PLOT_DECODE_GRIDS = (240, 300, 360, 420, 480, 540, 600, 660, 720)
GPU_ORDER = ("A100-80GB", "8xA100-80GB TP", "H100-SXM")


def _f(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


_CACHE: dict = {}


def run_point(wafer, model: str, li: int, lo: int, pg: int, dg: int, layers: int | None = 1) -> dict:
    key = (model, li, lo, pg, dg, layers)
    if key not in _CACHE:
        t0 = time.perf_counter()
        # llama2-13b has a 4K context: its 4096/4096 points are predicted beyond it, as the
        # length sweep asks (the cost model does not depend on the trained context)
        m = predict(get_model_preset(model), wafer, li, lo, pg, dg, layers=layers, allow_beyond_context=True,
                    band=False)  # the tables show the central figures; `predict` gives the bands
        m["bench_wall_s"] = time.perf_counter() - t0
        # the calibrated GPU model (fitted to SGLang's measured numbers) is the one to quote;
        # the roofline is the ideal bound beside it
        m["gpu"] = {g["setup"]: g["calibrated"] for g in m["gpu_baselines"]}
        m["gpu_roofline"] = {g["setup"]: g["roofline"] for g in m["gpu_baselines"]}
        _CACHE[key] = m
    return _CACHE[key]


def section_full_placement(out: Out, wafer) -> None:
    out("## 1. Full placement (all layers on the wafer)")
    out()
    for model, pg, dg in (("llama3-8b", 600, 420), ("llama3-8b", 360, 360), ("llama2-13b", 600, 420)):
        c = get_model_preset(model)
        try:
            t0 = time.perf_counter()
            m = predict(c, wafer, 2048, 128, pg, dg)
            out(f"- `{model}` prefill {pg} / decode {dg}, 2048/128, full placement: fits; decode TPR "
                f"{m['decode_tokens_per_s']:.0f} tok/s ({time.perf_counter() - t0:.2f} s host)")
        except PlacementError as e:
            out(f"- `{model}` prefill {pg} / decode {dg}, 2048/128, full placement: **PlacementError**: {e}")
    out()
    # which square grids (60..720, step 60) fit at all, per phase, for the shortest and longest length
    rows = []
    for model in MODELS:
        c = get_model_preset(model)
        for li, lo in ((2048, 128), (4096, 4096)):
            fits = []
            for g in range(60, min(wafer.rows, wafer.cols) + 1, 60):
                try:
                    plan(c, wafer, g, g, li + lo, prompt_len=li)
                    fits.append(str(g))
                except PlacementError:
                    pass
            rows.append([model, f"{li}/{lo}", ", ".join(fits) or "none"])
    out("Square grids g (60..720, step 60) on which the full model fits with prefill grid = decode grid = g:")
    out()
    out.table(["model", "input/output", "grids that fit"], rows)


def section_extrapolation_check(out: Out, wafer) -> None:
    out("## 2. Extrapolation check: full placement vs layers=1 on models that fit")
    out()
    out("`llama3-8b-8L`/`llama2-13b-8L` are those models' shapes with 8 layers (built with `dataclasses.replace`); they and "
        "smollm2-135m fit the wafer, so the same point can be run with every layer placed (a pipeline of "
        "one or more regions per phase) and extrapolated from its first layer. `hpp` = KV heads per prefill "
        "attention pass, which the planner raises while SRAM allows: a lone layer leaves more SRAM free than a "
        "fully placed model, so layers=1 can get a larger hpp (fewer, larger attention passes) than the "
        "full placement would.")
    out()
    smol = get_model_preset("smollm2-135m")
    l8 = dataclasses.replace(get_model_preset("llama3-8b"), num_layers=8, name="llama3-8b-8L")
    m8 = dataclasses.replace(get_model_preset("llama2-13b"), num_layers=8, name="llama2-13b-8L")
    rows = []
    for c, li, lo, pg, dg in ((smol, 512, 128, 120, 90), (smol, 2048, 128, 150, 90), (smol, 4096, 4096, 180, 90),
                              (l8, 2048, 128, 480, 420), (l8, 4096, 4096, 600, 420), (m8, 2048, 128, 300, 300),
                              (m8, 4096, 4096, 360, 420)):
        ms = {}
        for layers in (None, 1):
            t0 = time.perf_counter()
            try:
                ms[layers] = (predict(c, wafer, li, lo, pg, dg, layers=layers, allow_beyond_context=True),
                              time.perf_counter() - t0)
            except PlacementError as e:
                ms[layers] = (None, str(e))
        (f, tf), (o, to) = ms[None], ms[1]
        if f is None or o is None:
            which = "full" if f is None else "layers=1"
            rows.append([c.name, f"{li}/{lo}", f"{pg}/{dg}", f"{which}: PlacementError: " + (tf if f is None else to)[:110],
                         "", "", "", "", "", ""])
            continue
        rows.append([c.name, f"{li}/{lo}", f"{pg}/{dg}",
                     f"{len(f['placement']['prefill']['stages'])} / {len(f['placement']['decode']['stages'])}",
                     f"{f['placement']['prefill']['heads_per_pass']} / {o['placement']['prefill']['heads_per_pass']}",
                     f"{f['ttft_s'] * 1e3:.3g} / {o['ttft_s'] * 1e3:.3g}",
                     f"{f['tpot_s'] * 1e6:.3g} / {o['tpot_s'] * 1e6:.3g}",
                     f"{o['ttft_s'] / f['ttft_s']:.3f}", f"{o['tpot_s'] / f['tpot_s']:.3f}",
                     f"{tf:.2f} / {to:.2f}"])
    out.table(["model", "in/out", "grids pre/dec", "regions pre/dec (full)", "hpp full / 1-layer", "TTFT ms full / 1-layer",
               "TPOT us full / 1-layer", "TTFT ratio 1-layer/full", "TPOT ratio 1-layer/full",
               "host s full / 1-layer"], rows)


def _row(m: dict, model: str, li: int, lo: int, pg: int, dg: int) -> list:
    g = m["gpu"]
    return [model, f"{li}/{lo}", pg, dg,
            f"{m['ttft_s'] * 1e3:.3g}", _f(m["prefill_tokens_per_s"]),
            f"{m['tpot_s'] * 1e6:.3g}", _f(m["decode_tokens_per_s"]), _f(m["e2e_tokens_per_s"]),
            " / ".join(_f(g[d]["prefill_tokens_per_s"], 3) for d in GPU_ORDER),
            " / ".join(_f(g[d]["decode_tokens_per_s"], 3) for d in GPU_ORDER),
            " / ".join(_f(g[d]["e2e_tokens_per_s"], 3) for d in GPU_ORDER),
            f"{m['decode_tokens_per_s'] / g['A100-80GB']['decode_tokens_per_s']:.0f}x / "
            f"{m['decode_tokens_per_s'] / g['8xA100-80GB TP']['decode_tokens_per_s']:.1f}x",
            f"{m['host_wall_s']:.2f}"]


HEADER = ["model", "in/out", "prefill grid", "decode grid", "TTFT ms", "prefill tok/s", "TPOT us", "decode TPR",
          "e2e TPR", "GPU prefill tok/s (A100 / 8xA100 / H100)", "GPU decode TPR (A100 / 8xA100 / H100)",
          "GPU e2e TPR (A100 / 8xA100 / H100)", "decode vs A100 / 8xA100", "host s"]


def section_sweeps(out: Out, wafer, models, lengths) -> None:
    out(f"## 3. Predictions, extrapolated from 1 layer (layers=1: one layer placed and run, its time scaled by "
        f"the layer count, 32 for llama3-8b and 40 for llama2-13b), wafer {wafer.name}, fp16, batch 1")
    out()
    out("TPR = tokens/s per request: decode TPR = 1/TPOT, e2e TPR = output tokens / (TTFT + transition + decode). "
        "GPU columns: the calibrated GPU model (`waferllm.baselines.gpu_calibrated`: the roofline's terms with "
        "efficiency factors and fixed overheads fitted to SGLang's measured A100 numbers, SPEC section 5; "
        "H100 inherits the A100 factors). Section 4b compares with the ideal roofline too.")
    out()
    out(f"### 3a. Prefill grid sweep (decode grid fixed at {FIXED_DECODE})")
    out()
    rows = []
    for model in models:
        for li, lo in lengths:
            for pg in PREFILL_GRIDS:
                rows.append(_row(run_point(wafer, model, li, lo, pg, FIXED_DECODE), model, li, lo, pg, FIXED_DECODE))
    out.table(HEADER, rows)
    out(f"### 3b. Decode grid sweep (prefill grid fixed at {FIXED_PREFILL})")
    out()
    rows = []
    for model in models:
        for li, lo in lengths:
            for dg in DECODE_GRIDS:
                rows.append(_row(run_point(wafer, model, li, lo, FIXED_PREFILL, dg), model, li, lo, FIXED_PREFILL, dg))
    out.table(HEADER, rows)


def section_plot_sweep(out: Out, wafer, models, lengths, grids, plot_path: str | None) -> None:
    out(f"## 4. Decode TPR vs decode grid (prefill grid {FIXED_PREFILL}, layers=1 extrapolated)")
    out()
    data = {}
    header = ["model", "in/out"] + [f"{g}" for g in grids] + ["best grid"]
    rows, erows = [], []
    for model in models:
        for li, lo in lengths:
            pts = []
            for g in grids:
                try:
                    pts.append((g, run_point(wafer, model, li, lo, FIXED_PREFILL, g)))
                except PlacementError:
                    pts.append((g, None))
            data[(model, li, lo)] = pts
            ok = [(g, m) for g, m in pts if m is not None]
            best = max(ok, key=lambda gm: gm[1]["decode_tokens_per_s"])[0] if ok else "-"
            rows.append([model, f"{li}/{lo}"] + [_f(m["decode_tokens_per_s"]) if m else "no fit" for _, m in pts]
                        + [best])
            beste = max(ok, key=lambda gm: gm[1]["e2e_tokens_per_s"])[0] if ok else "-"
            erows.append([model, f"{li}/{lo}"] + [_f(m["e2e_tokens_per_s"]) if m else "no fit" for _, m in pts]
                         + [beste])
    out("Decode TPR (tokens/s) per decode grid:")
    out()
    out.table(header, rows)
    out("End-to-end TPR (tokens/s) per decode grid:")
    out()
    out.table(header, erows)
    if plot_path:
        _plot(data, models, lengths, plot_path, wafer.name)
        out(f"Plot: `{plot_path}`")
        out()


def _plot(data, models, lengths, path: str, wafer_name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), len(lengths), figsize=(4.2 * len(lengths), 3.8 * len(models)),
                             squeeze=False)
    gpu_style = {"A100-80GB": ("tab:gray", ":"), "8xA100-80GB TP": ("tab:red", ":"), "H100-SXM": ("tab:green", ":")}
    for i, model in enumerate(models):
        for j, (li, lo) in enumerate(lengths):
            ax = axes[i][j]
            pts = [(g, m) for g, m in data[(model, li, lo)] if m is not None]
            gs = [g for g, _ in pts]
            ax.plot(gs, [m["decode_tokens_per_s"] for _, m in pts], "o-", color="tab:blue", label="wafer decode TPR")
            ax.plot(gs, [m["e2e_tokens_per_s"] for _, m in pts], "s--", color="tab:orange", label="wafer e2e TPR")
            if pts:
                for dev, (col, ls) in gpu_style.items():
                    ax.axhline(pts[0][1]["gpu"][dev]["decode_tokens_per_s"], color=col, ls=ls, lw=1.2,
                               label=f"{dev} calibrated decode TPR")
            ax.set_yscale("log")
            ax.set_title(f"{model}, in/out {li}/{lo}", fontsize=10)
            ax.set_xlabel("decode grid (PxP)")
            if j == 0:
                ax.set_ylabel("tokens/s per request")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=9)
    fig.suptitle(f"WaferLLM predictions on {wafer_name} (prefill grid {FIXED_PREFILL}, extrapolated from 1 layer) "
                 f"vs the calibrated GPU model", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


WAFER_VS_GPU = ("A100-80GB", "8xA100-80GB TP", "H100-SXM", "H200")


def section_wafer_vs_gpu(out: Out, wafer) -> None:
    out("## 4b. Wafer against both GPU baselines (4096/128, prefill 600 / decode 420, layers=1)")
    out()
    out("Each GPU setup twice: `roofline` (ideal bound: peak compute and HBM, full link bandwidth) and "
        "`calibrated` (fitted to SGLang's measured A100 numbers; H100/H200 inherit the A100 factors). Energy per "
        "request: the wafer's from its events (MACs, SRAM bytes, bit-hops, static power), the GPUs' as board "
        "power x GPUs x time.")
    out()
    rows = []
    for model in MODELS:
        m = run_point(wafer, model, 4096, 128, FIXED_PREFILL, FIXED_DECODE)
        rows.append([model, f"wafer {wafer.name}", "this model", _f(m["prefill_tokens_per_s"]),
                     _f(m["decode_tokens_per_s"]), f"{m['energy_j']:.4g}", "-", "-"])
        for dev in WAFER_VS_GPU:
            for kind in ("roofline", "calibrated"):
                g = (m["gpu_roofline"] if kind == "roofline" else m["gpu"])[dev]
                rows.append([model, dev, kind, _f(g["prefill_tokens_per_s"]), _f(g["decode_tokens_per_s"]),
                             f"{g['energy_j']:.4g}",
                             f"{m['prefill_tokens_per_s'] / g['prefill_tokens_per_s']:.2g}x",
                             f"{m['decode_tokens_per_s'] / g['decode_tokens_per_s']:.3g}x"])
    out.table(["model", "system", "baseline", "prefill tok/s", "decode TPR", "energy J", "wafer prefill speedup",
               "wafer decode speedup"], rows)
    out()


def section_summary(out: Out) -> None:
    out("## 5. Summary of the ratios (all layers=1 points above)")
    out()
    rows = []
    for model in MODELS:
        ms = [m for (mod, *_), m in _CACHE.items() if mod == model]
        for what, key in (("prefill tok/s", "prefill_tokens_per_s"), ("decode TPR", "decode_tokens_per_s"),
                          ("e2e TPR", "e2e_tokens_per_s")):
            vals = [m[key] for m in ms]
            ratios = [[m[key] / m["gpu"][d][key] for m in ms] for d in GPU_ORDER]
            rows.append([model, what, f"{min(vals):,.0f} - {max(vals):,.0f}"]
                        + [f"{min(r):.2g} - {max(r):.2g}x" for r in ratios])
    out.table(["model", "figure", "wafer range", "vs A100", "vs 8xA100 TP", "vs H100"], rows)


def section_host_time(out: Out) -> None:
    walls = [m["host_wall_s"] for m in _CACHE.values()]
    out("## 6. Host wall time per prediction (layers=1)")
    out()
    out(f"{len(walls)} predictions: min {min(walls):.2f} s, median {sorted(walls)[len(walls) // 2]:.2f} s, "
        f"max {max(walls):.2f} s, total {sum(walls):.1f} s (per-point values in the `host s` columns).")
    out()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wafer", default="wse2")
    ap.add_argument("--markdown", default=None, help="also write the output to this file")
    ap.add_argument("--plot", default="docs/engine_predictions.png", help="PNG path ('' for none)")
    ap.add_argument("--quick", action="store_true", help="only 2048/128 and 4096/4096, no dense sweep")
    args = ap.parse_args()
    wafer = get_wafer(args.wafer)
    out = Out()
    t0 = time.perf_counter()
    rev = code_version()
    out("# Engine predictions")
    out()
    out("Command: `.venv/bin/python benchmarks/engine_predictions.py " + " ".join(sys.argv[1:]) + "`")
    out()
    c = {k: wafer.to_dict()[k]["value"] for k in ("beta_cycles", "op_overhead_cycles", "step_overhead_cycles",
                                                   "collective_overhead_cycles", "task_switch_cycles",
                                                   "fp16_macs_per_cycle") if k in wafer.to_dict()}
    out(f"Host: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. Code: {rev}. "
        f"Wafer: {wafer.name} ({wafer.rows}x{wafer.cols} PEs), free constants "
        + ", ".join(f"{k}={v}" for k, v in c.items()) + ".")
    out()
    lengths = ((2048, 128), (4096, 4096)) if args.quick else LENGTHS
    section_full_placement(out, wafer)
    section_extrapolation_check(out, wafer)
    section_sweeps(out, wafer, MODELS, lengths)
    if not args.quick:
        section_plot_sweep(out, wafer, MODELS, lengths, PLOT_DECODE_GRIDS, args.plot or None)
    section_wafer_vs_gpu(out, wafer)
    section_summary(out)
    section_host_time(out)
    out(f"Total benchmark wall time: {time.perf_counter() - t0:.0f} s.")
    out.save(args.markdown)


if __name__ == "__main__":
    main()
