"""Defective PEs: what a defect rate costs in speed and capacity, for both recovery schemes.

    .venv/bin/python benchmarks/defects.py [--markdown benchmarks/RESULTS-defects.md]
        [--plot docs/defects.png] [--model llama3-8b] [--rates 0,0.001,0.0025,0.005,0.01] [--seeds 1,2]

Every point is a dry-run prediction of one request (2048 + 128 tokens, prefill grid 600,
decode grid 360, every layer placed) on a wse2 whose defect map is drawn at the rate with
the seed on the physical fabric, recovered by ``spare`` (the hardware remaps spare rows and
columns: programs see a perfect rectangle and pay the extra hops) or ``reroute``
(fault-aware placement: regions stretch over the spare columns and messages detour), beside
the same request on the perfect wafer (``waferllm.engine.defect_impact``). The figures are
the mean over the seeds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from waferllm.engine.defect_impact import defect_impact
from waferllm.engine.run_config import RunConfig
from waferllm.hardware import get_wafer
from waferllm.hardware.defects import with_defect_rate
from waferllm.models.presets import get_model_preset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Out  # noqa: E402

SCHEMES = ("spare", "reroute")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--rates", default="0,0.001,0.0025,0.005,0.01")
    ap.add_argument("--seeds", default="1,2")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = get_model_preset(args.model)
    run = RunConfig.for_request(2048, 128, prefill_grid=600, decode_grid=360)
    out = Out()
    t0 = time.perf_counter()
    out.header("Defective PEs", "defects.py")
    out(f"{args.model}, 2048 + 128 tokens, grids 600/360, wse2, every layer placed; mean over seeds "
        f"{', '.join(map(str, seeds))}. Lost: the fraction of the perfect wafer's figure lost (times: added).")
    out()
    rows, curves = [], {s: [] for s in SCHEMES}
    for scheme in SCHEMES:
        for rate in rates:
            acc: dict[str, list] = {}
            for seed in seeds:
                wafer = with_defect_rate(get_wafer("wse2"), rate, seed, scheme) if rate else get_wafer("wse2")
                d = defect_impact(cfg, wafer, run, 2048, 128, rate=rate, seed=seed)
                for key in ("decode_tokens_per_s", "ttft_s", "e2e_tokens_per_s", "kv_capacity_tokens"):
                    acc.setdefault(key, []).append(d["defective"][key])
                    acc.setdefault(f"lost.{key}", []).append(d["lost_fraction"].get(key, 0.0))
                acc.setdefault("pes", []).append(d["defective_pes"])
                acc.setdefault("same", []).append(d["same_regions"])
            mean = {k: sum(v) / len(v) for k, v in acc.items()}
            curves[scheme].append((rate, mean["decode_tokens_per_s"]))
            rows.append([scheme, f"{rate:.2%}", f"{mean['pes']:,.0f}", f"{mean['decode_tokens_per_s']:,.0f}",
                         f"{mean['lost.decode_tokens_per_s']:.1%}", f"{mean['ttft_s'] * 1e3:.2f}",
                         f"{mean['lost.ttft_s']:.1%}", f"{mean['e2e_tokens_per_s']:,.0f}",
                         f"{mean['kv_capacity_tokens']:,.0f}", "yes" if all(acc["same"]) else "no"])
            print(f"  {scheme} {rate:.3%}: decode TPR {mean['decode_tokens_per_s']:.0f}", flush=True)
    out.table(["scheme", "defect rate", "defective PEs", "decode TPR", "lost", "TTFT ms", "added", "e2e TPR",
               "KV capacity", "same regions"], rows)
    out()
    if args.plot:
        _plot(curves, args.plot, args.model)
        out(f"Plot: `{args.plot}`")
        out()
    out(f"Total benchmark wall time: {time.perf_counter() - t0:.0f} s.")
    out.save(args.markdown)


def _plot(curves: dict, path: str, model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for scheme, pts in curves.items():
        ax.plot([100 * r for r, _ in pts], [v for _, v in pts], "o-", label=scheme)
    ax.set_xlabel("defective PEs (%)")
    ax.set_ylabel("decode TPR (tokens/s per request)")
    ax.set_title(f"{model} on wse2 (600/360, 2048+128)\ndecode TPR against the defect rate", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(title="recovery")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
