"""Pictures of a prediction and of a sweep (matplotlib, Agg: no display needed).

:func:`plot_prediction` draws one prediction (the dict ``predict``/``predict_run``
returns, or ``waferllm predict --json`` prints):

- ``floorplan.png``: the wafer with each phase's regions, their layers and vocabulary
  slices, coloured by how full their PEs' SRAM is;
- ``sram_heatmap.png``: SRAM per PE over the wafer, by kind (weights, KV cache,
  activations, vocabulary tables) and in all, for each phase;
- ``sram.png``: SRAM per PE by kind for each region, and the fullest PE the run measured;
- ``time_breakdown.png``: the request's time by phase and the busy time per op;
- ``gpu_comparison.png``: decode TPR, TTFT and energy per token beside the GPU baselines
  (ideal roofline and calibrated).

:func:`plot_sweep` draws a sweep's rows: ``pareto.png`` (two figures, the Pareto
front highlighted) and ``line_<input>.png`` for each swept input (with a prefix, e.g. the
spec's name, so that several sweeps can share a folder).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

KINDS = ("weights", "kv_cache", "activations", "vocab_tables", "buffers")
KIND_LABELS = {"weights": "weights", "kv_cache": "KV cache", "activations": "activations",
               "vocab_tables": "vocabulary tables", "buffers": "buffers", "reserved": "reserved (code, runtime)",
               "free": "free"}
KIND_COLORS = {"weights": "#4C72B0", "kv_cache": "#DD8452", "activations": "#55A868", "vocab_tables": "#8172B3",
               "buffers": "#937860", "reserved": "#BBBBBB", "free": "#F2F2F2"}
PHASE_COLORS = {"prefill": "#4C72B0", "decode": "#DD8452", "transition": "#999999"}

#: axis labels of figures and inputs (others are shown by name)
LABELS = {
    "ttft_s": "TTFT (s)", "tpot_s": "TPOT (s)", "transition_s": "prefill-to-decode transition (s)",
    "decode_tokens_per_s": "decode TPR (tokens/s)", "prefill_tokens_per_s": "prefill throughput (tokens/s)",
    "e2e_tokens_per_s": "end-to-end TPR (tokens/s)", "energy_j": "energy per request (J)",
    "kv_capacity_tokens": "KV capacity, shift cache (tokens)", "kv_capacity_tokens_concat": "KV capacity, concat cache (tokens)",
    "sram_bytes_per_pe": "SRAM per PE (B)", "reserved_bytes_per_pe": "reserved SRAM per PE (B)",
    "link_bits_per_cycle": "link width (bit/cycle)", "beta_cycles": "software relay cost beta (cycles)",
    "alpha_cycles": "per-hop latency alpha (cycles)", "clock_hz": "clock (Hz)", "rows": "mesh rows (PEs)",
    "cols": "mesh columns (PEs)", "prefill_grid": "prefill grid (PEs per side)", "decode_grid": "decode grid (PEs per side)",
    "input_len": "input length (tokens)", "output_len": "output length (tokens)", "layers": "layers placed",
    "sram_peak_bytes_per_pe.decode": "decode SRAM peak per PE (B)", "sram_peak_bytes_per_pe.prefill": "prefill SRAM peak per PE (B)",
    "fp16_macs_per_cycle": "fp16 MACs per PE per cycle", "power_w": "system power (W)",
}
#: figures where more is better (Pareto direction); any other figure is minimised
MAXIMISE = ("tokens_per_s", "kv_capacity")

_REGION = re.compile(r"^(?P<name>\S+) (?P<rows>\d+)x(?P<cols>\d+)@\((?P<row0>\d+),(?P<col0>\d+)\)$")


def label(key: str) -> str:
    return LABELS.get(key, key)


def _figure(w: float, h: float, ncols: int = 1, nrows: int = 1, **kw):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _const(m: Mapping, key: str, default=None):
    c = (m.get("constants") or {}).get(key)
    return c.get("value", default) if isinstance(c, Mapping) else default


def _regions(m: Mapping, phase: str) -> list[dict]:
    pp = (m.get("placement") or {}).get(phase) or {}
    out = []
    for i, st in enumerate(pp.get("stages") or []):
        g = _REGION.match(st.get("region", ""))
        if not g:
            continue
        share = (pp.get("layer_share") or [])
        out.append({"name": g["name"], "rows": int(g["rows"]), "cols": int(g["cols"]), "row0": int(g["row0"]),
                    "col0": int(g["col0"]), "layers": st.get("layers", [0, 0]), "vocab": st.get("vocab", [0, 0]),
                    "share": share[i] if i < len(share) else None})
    return out


def region_bytes(config, wafer, run) -> dict[str, list[dict]]:
    """Planned bytes per PE by kind for every region of each phase: ``{"prefill": [...], "decode": [...]}``."""
    p = run.plan(config, wafer)
    return {ph: [dict(b) for b in pp.region_bytes] for ph, pp in (("prefill", p.prefill), ("decode", p.decode)) if pp}


# ------------------------------------------------------------------ one prediction


def plot_prediction(m: Mapping[str, Any], out_dir, region_bytes: Mapping[str, Sequence[Mapping]] | None = None
                    ) -> list[Path]:
    """Write the pictures of one prediction into ``out_dir``; returns their paths.

    ``region_bytes`` (from :func:`region_bytes`) gives each region's planned SRAM by kind;
    without it the fullest region's figures stand for every region."""
    out = Path(out_dir)
    paths = [floorplan(m, out / "floorplan.png", region_bytes),
             sram_heatmap(m, out / "sram_heatmap.png", region_bytes),
             sram_by_kind(m, out / "sram.png", region_bytes),
             time_breakdown(m, out / "time_breakdown.png")]
    if m.get("gpu_baselines"):
        paths.append(gpu_comparison(m, out / "gpu_comparison.png"))
    return paths


def _phases(m: Mapping) -> list[str]:
    return [ph for ph in ("prefill", "decode") if (m.get("placement") or {}).get(ph)]


def _bytes_of(m: Mapping, phase: str, i: int, region_bytes) -> dict:
    """Planned bytes per PE of region ``i`` of ``phase`` by kind (reserved included)."""
    pp = m["placement"][phase]
    rb = (region_bytes or {}).get(phase)
    b = dict(rb[i]) if rb and i < len(rb) else {k: v for k, v in pp.get("bytes_per_pe", {}).items()
                                                    if k not in ("reserved", "usable")}
    b["reserved"] = _const(m, "reserved_bytes_per_pe", pp.get("bytes_per_pe", {}).get("reserved", 0))
    return b


def _title(m: Mapping) -> str:
    t = f"{m.get('model', '?')} on {m.get('wafer', '?')}: {m.get('input_len', '?')} in + {m.get('output_len', '?')} out tokens"
    if m.get("extrapolated_from_layers"):
        t += f" (extrapolated from {m['extrapolated_from_layers']} layer(s))"
    return t


def floorplan(m: Mapping, path, region_bytes=None) -> Path:
    """The wafer, each phase's regions with their layers and vocabulary slices, coloured by SRAM fill."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    rows, cols = int(_const(m, "rows", 1)), int(_const(m, "cols", 1))
    sram = float(_const(m, "sram_bytes_per_pe", 1))
    phases = _phases(m)
    fig, axes = _figure(6.2 * max(1, len(phases)), 6.2 * rows / cols + 1.6, ncols=max(1, len(phases)))
    cmap, norm = colormaps["viridis"], Normalize(0, 100)
    for ax, ph in zip(axes[0], phases):
        pp = m["placement"][ph]
        ax.add_patch(Rectangle((0, 0), cols, rows, facecolor="#EEEEEE", edgecolor="black", lw=1.2,
                               label="idle PEs"))
        for i, r in enumerate(_regions(m, ph)):
            used = sum(_bytes_of(m, ph, i, region_bytes).values())
            pct = 100 * used / sram
            ax.add_patch(Rectangle((r["col0"], r["row0"]), r["cols"], r["rows"], facecolor=cmap(norm(pct)),
                                   edgecolor="white", lw=1.5))
            lo, hi = r["layers"]
            text = f"{ph}[{i}] {r['rows']}x{r['cols']}\nlayers {lo}-{hi - 1}" if hi > lo else f"{ph}[{i}] {r['rows']}x{r['cols']}\nno layers"
            if r["share"] is not None and r["share"] != hi - lo:
                text += f" (holds {r['share']})"
            v0, v1 = r["vocab"]
            text += f"\nvocab {v0:,}-{v1 - 1:,}\nSRAM {pct:.0f}%"
            size = max(5.0, min(9.0, 9.0 * min(r["rows"], r["cols"]) / 360))
            ax.text(r["col0"] + r["cols"] / 2, r["row0"] + r["rows"] / 2, text, ha="center", va="center",
                    fontsize=size, color="white" if pct < 60 else "black")
        ax.set_xlim(0, cols)
        ax.set_ylim(rows, 0)
        ax.set_aspect("equal")
        ax.set_xlabel("PE column (x)")
        ax.set_ylabel("PE row (y)")
        ax.set_title(f"{ph}: {pp.get('regions')} region(s) on a {pp.get('grid')} grid, "
                     f"{pp.get('layers_per_region')} layers per region at most", fontsize=9)
        ax.legend(loc="lower right", fontsize=7)
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[0].tolist(), shrink=0.8,
                 label="SRAM used per PE, fullest PE of the region (% of SRAM per PE)")
    fig.suptitle(f"Floorplan: {_title(m)}", fontsize=11)
    return _save(fig, Path(path))


def sram_heatmap(m: Mapping, path, region_bytes=None) -> Path:
    """SRAM per PE over the wafer, one map per kind and one in all, for each phase."""
    import numpy as np
    from matplotlib.patches import Rectangle

    rows, cols = int(_const(m, "rows", 1)), int(_const(m, "cols", 1))
    phases = _phases(m)
    kinds = ["weights", "kv_cache", "activations", "vocab_tables", "total"]
    step = max(1, max(rows, cols) // 250)  # maps at a coarser resolution: a cell per step x step PEs
    fig, axes = _figure(3.0 * len(kinds) + 1, 2.6 * max(1, len(phases)) * rows / cols + 1.2, ncols=len(kinds),
                        nrows=max(1, len(phases)))
    sram_kib = float(_const(m, "sram_bytes_per_pe", 1)) / 1024
    for pi, ph in enumerate(phases):
        maps = {k: np.full((math.ceil(rows / step), math.ceil(cols / step)), np.nan) for k in kinds}
        for i, r in enumerate(_regions(m, ph)):
            b = _bytes_of(m, ph, i, region_bytes)
            sl = (slice(r["row0"] // step, math.ceil((r["row0"] + r["rows"]) / step)),
                  slice(r["col0"] // step, math.ceil((r["col0"] + r["cols"]) / step)))
            for k in kinds:
                maps[k][sl] = (sum(b.values()) if k == "total" else b.get(k, 0)) / 1024
        for ki, k in enumerate(kinds):
            ax = axes[pi][ki]
            im = ax.imshow(maps[k], extent=(0, cols, rows, 0), cmap="magma", vmin=0, vmax=sram_kib,
                           interpolation="nearest")
            ax.set_facecolor("#DDDDDD")
            for r in _regions(m, ph):  # region borders
                ax.add_patch(Rectangle((r["col0"], r["row0"]), r["cols"], r["rows"], fill=False, edgecolor="white",
                                       lw=0.8))
            ax.set_title(f"{ph}: {'all kinds (reserved included)' if k == 'total' else KIND_LABELS[k]}", fontsize=8)
            ax.set_xlabel("PE column", fontsize=7)
            ax.set_ylabel("PE row", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=[a for row in axes for a in row], shrink=0.8,
                 label=f"KiB per PE (fullest PE of each region; SRAM per PE = {sram_kib:g} KiB; grey: idle)")
    fig.suptitle(f"SRAM per PE by kind: {_title(m)}", fontsize=10)
    return _save(fig, Path(path))


def sram_by_kind(m: Mapping, path, region_bytes=None) -> Path:
    """Stacked bars of SRAM per PE by kind: each region as planned, and the run's fullest PE."""
    phases = _phases(m)
    sram_kib = float(_const(m, "sram_bytes_per_pe", 1)) / 1024
    measured = m.get("sram_breakdown_bytes_per_pe") or {}
    fig, axes = _figure(5.5 * max(1, len(phases)) + 1, 4.6, ncols=max(1, len(phases)), sharey=True)
    order = ["weights", "kv_cache", "activations", "vocab_tables", "buffers", "reserved"]
    seen = set()
    for ax, ph in zip(axes[0], phases):
        bars = [(f"R{i}\n(plan)", _bytes_of(m, ph, i, region_bytes)) for i in range(len(_regions(m, ph)))]
        if region_bytes is None:
            bars = bars[:1]
            bars[0] = ("fullest\nregion\n(plan)", bars[0][1])
        if measured.get(ph):
            bars.append(("fullest PE\n(run)", {k: v for k, v in measured[ph].items() if k != "free"}))
        x = list(range(len(bars)))
        bottom = [0.0] * len(bars)
        for k in order:
            h = [b.get(k, 0) / 1024 for _, b in bars]
            if not any(h):
                continue
            ax.bar(x, h, bottom=bottom, color=KIND_COLORS[k], edgecolor="white", width=0.7,
                   label=None if k in seen else KIND_LABELS[k])
            seen.add(k)
            bottom = [a + b for a, b in zip(bottom, h)]
        ax.axhline(sram_kib, color="red", ls="--", lw=1.2, label=None if "cap" in seen else f"SRAM per PE ({sram_kib:g} KiB)")
        seen.add("cap")
        ax.set_xticks(x, [n for n, _ in bars], fontsize=7)
        ax.set_ylabel("KiB per PE")
        ax.set_title(f"{ph}: fullest PE of each region", fontsize=9)
        ax.set_ylim(0, sram_kib * 1.12)
    fig.legend(loc="outside right center", fontsize=8)
    fig.suptitle(f"SRAM per PE by kind: {_title(m)}", fontsize=10)
    return _save(fig, Path(path))


def time_breakdown(m: Mapping, path, top: int = 14) -> Path:
    """The request's time by phase, and the busy time of each op (overlapped work counted in full)."""
    fig, axes = _figure(12, 5, ncols=2, width_ratios=[1, 1.6])
    ax = axes[0][0]
    n_dec = max(0, int(m.get("output_len") or 1) - 1)
    parts = [("prefill (TTFT)", m.get("ttft_s") or 0.0, PHASE_COLORS["prefill"]),
             ("transition", m.get("transition_s") or 0.0, PHASE_COLORS["transition"]),
             (f"decode ({n_dec} x TPOT)", (m.get("tpot_s") or 0.0) * n_dec, PHASE_COLORS["decode"])]
    total = sum(p[1] for p in parts) or 1.0
    for i, (name, v, c) in enumerate(parts):
        ax.barh(i, v * 1e3, color=c)
        ax.text(v * 1e3, i, f" {v * 1e3:.3g} ms ({100 * v / total:.0f}%)", va="center", fontsize=8)
    ax.set_yticks(range(len(parts)), [p[0] for p in parts])
    ax.invert_yaxis()
    ax.set_xlabel("predicted wafer time (ms)")
    ax.set_xlim(0, max(p[1] for p in parts) * 1e3 * 1.45 or 1)
    ax.set_title(f"time per phase (request: {total * 1e3:.3g} ms)", fontsize=9)
    ax = axes[0][1]
    bd = sorted((m.get("breakdown_s") or {}).items(), key=lambda kv: -kv[1])
    if len(bd) > top:
        bd = bd[:top] + [(f"{len(bd) - top} other ops", sum(v for _, v in bd[top:]))]
    ops_total = sum(v for _, v in bd) or 1.0
    ax.barh(range(len(bd)), [v * 1e3 for _, v in bd], color="#4C72B0")
    for i, (_, v) in enumerate(bd):
        ax.text(v * 1e3, i, f" {v * 1e3:.3g} ms ({100 * v / ops_total:.0f}%)", va="center", fontsize=7)
    ax.set_yticks(range(len(bd)), [k for k, _ in bd], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, (bd[0][1] * 1e3 * 1.35) if bd else 1)
    ax.set_xlabel("busy time, both phases (ms)")
    ax.set_title("busy time per op (overlapped work counted in full)", fontsize=9)
    fig.suptitle(f"Where the time goes: {_title(m)}", fontsize=10)
    return _save(fig, Path(path))


def gpu_comparison(m: Mapping, path) -> Path:
    """Decode TPR, TTFT and energy per output token: the wafer beside each GPU setup's roofline and calibrated model."""
    gpus = m.get("gpu_baselines") or []
    out_tokens = max(1, int(m.get("output_len") or 1))
    figs = [("decode_tokens_per_s", "decode TPR (tokens/s)"), ("ttft_s", "TTFT (s)"),
            ("energy_per_token", "energy per output token (J)")]
    fig, axes = _figure(15, 5, ncols=3)
    names = [m.get("wafer", "wafer")] + [g["setup"] for g in gpus]
    for ax, (key, ylab) in zip(axes[0], figs):
        def val(d):
            if d is None:
                return None
            if key == "energy_per_token":
                e = d.get("energy_per_output_token_j")
                return e if e is not None else (d.get("energy_j") / out_tokens if d.get("energy_j") else None)
            return d.get(key)

        wv = (m.get("energy_j") or 0) / out_tokens if key == "energy_per_token" else m.get(key)
        lo, hi = m.get(f"{key}_low"), m.get(f"{key}_high")
        err = None
        if wv and lo is not None and hi is not None:
            err = [[max(0.0, wv - min(lo, hi))], [max(0.0, max(lo, hi) - wv)]]
        ax.bar([0], [wv or 0], color="#C44E52", width=0.6, yerr=err, capsize=4,
               label="wafer (this prediction" + (", band" if err else "") + ")")
        xs = range(1, len(gpus) + 1)
        roof = [val(g.get("roofline")) or 0 for g in gpus]
        cal = [val(g.get("calibrated")) or 0 for g in gpus]
        ax.bar([x - 0.2 for x in xs], roof, width=0.38, color="#AEC7E8", edgecolor="#4C72B0", hatch="//",
               label="GPU ideal roofline")
        ax.bar([x + 0.2 for x in xs], cal, width=0.38, color="#4C72B0", label="GPU calibrated")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        vals = [v for v in [wv] + roof + cal if v]
        log = bool(vals) and max(vals) / min(vals) > 20
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(ylab[:-1] + ", log scale)" if log else ylab)
        ax.set_title(ylab, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Wafer vs GPU baselines: {_title(m)}", fontsize=10)
    return _save(fig, Path(path))


# ------------------------------------------------------------------ a sweep


def _num(v) -> float | None:
    if isinstance(v, bool) or v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def maximise(figure: str) -> bool:
    return any(s in figure for s in MAXIMISE)


def pareto_front(points: Iterable[tuple[float, float]], max_x: bool, max_y: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both figures (sorted by x)."""
    pts = sorted(set(points), key=lambda p: (p[0] if not max_x else -p[0], p[1] if not max_y else -p[1]))
    front, best = [], None
    for x, y in pts:
        yy = y if max_y else -y
        if best is None or yy > best:
            front.append((x, y))
            best = yy
    return sorted(front)


def plot_sweep(rows: Sequence[Mapping[str, Any]], out_dir, swept: Sequence[str],
               pareto: tuple[str, str] = ("energy_j", "decode_tokens_per_s"), y: Sequence[str] = (),
               title: str = "sweep", prefix: str = "") -> list[Path]:
    """``<prefix>pareto.png`` and one ``<prefix>line_<input>.png`` per swept input; returns the paths."""
    out = Path(out_dir)
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    paths = [pareto_plot(ok, failed, out / f"{prefix}pareto.png", pareto, swept, title)]
    ys = list(y) or ["decode_tokens_per_s", "kv_capacity_tokens", "energy_j", "ttft_s"]
    for key in swept:
        paths.append(line_plot(ok, failed, out / f"{prefix}line_{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png", key, ys,
                               [s for s in swept if s != key], title))
    return paths


def pareto_plot(ok, failed, path, figures: tuple[str, str], swept: Sequence[str], title: str) -> Path:
    from matplotlib import colormaps

    fx, fy = figures
    fig, axes = _figure(7.5, 5.5)
    ax = axes[0][0]
    pts = [(_num(r.get(fx)), _num(r.get(fy)), r) for r in ok]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    color_key = next((s for s in swept if any(_num(r.get(s)) is not None for _, _, r in pts)), None)
    if pts:
        cscale = 1024.0 if color_key and color_key.endswith("bytes_per_pe") else 1.0
        cs = [(_num(r.get(color_key)) or 0.0) / cscale if color_key else 0.0 for _, _, r in pts]
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=cs, cmap="viridis", s=28, alpha=0.85,
                        edgecolor="none", label=f"{len(pts)} points")
        if color_key:
            clab = label(color_key).replace("(B)", "(KiB)") if cscale != 1.0 else label(color_key)
            fig.colorbar(sc, ax=ax, label=clab)
        front = pareto_front([(p[0], p[1]) for p in pts], maximise(fx), maximise(fy))
        ax.plot([p[0] for p in front], [p[1] for p in front], "-o", color="#C44E52", ms=7, mfc="none", lw=1.5,
                label=f"Pareto front ({len(front)} points)")
        _maybe_log(ax, [p[0] for p in pts], "x")
        _maybe_log(ax, [p[1] for p in pts], "y")
    else:
        ax.text(0.5, 0.5, "no successful point to plot", ha="center", va="center", transform=ax.transAxes)
    arrow = {True: "higher is better", False: "lower is better"}
    ax.set_xlabel(f"{label(fx)}, {arrow[maximise(fx)]}")
    ax.set_ylabel(f"{label(fy)}, {arrow[maximise(fy)]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    sub = f"\n{len(failed)} point(s) failed: see the table's error column" if failed else ""
    ax.set_title(f"{label(fy)} vs {label(fx)}{sub}", fontsize=9)
    fig.suptitle(f"{title}: Pareto front", fontsize=10)
    return _save(fig, Path(path))


def _sort_key(values: tuple) -> tuple:
    """Numbers in numeric order, before text."""
    return tuple((0, _num(v), "") if _num(v) is not None else (1, 0.0, str(v)) for v in values)


def _null_locator():
    from matplotlib.ticker import NullLocator

    return NullLocator()


def _maybe_log(ax, values, axis: str) -> None:
    vals = [v for v in values if v is not None]
    if vals and min(vals) > 0 and max(vals) / min(vals) >= 8:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def line_plot(ok, failed, path, key: str, ys: Sequence[str], others: Sequence[str], title: str) -> Path:
    """Each figure in ``ys`` against the input ``key``, one line per combination of the other swept inputs."""
    n = len(ys)
    ncols = 2 if n > 1 else 1
    nrows = math.ceil(n / ncols)
    fig, axes = _figure(6.2 * ncols, 3.8 * nrows + 0.6, ncols=ncols, nrows=nrows)
    groups: dict[tuple, list] = {}
    for r in ok:
        groups.setdefault(tuple(r.get(o) for o in others), []).append(r)
    many = len(groups) > 10
    scale, xlab = (1024.0, label(key).replace("(B)", "(KiB)")) if key.endswith("bytes_per_pe") else (1.0, label(key))

    def xv(r):
        v = _num(r.get(key))
        return None if v is None else v / scale

    xs_all = [xv(r) for r in ok + failed]
    for i, fig_key in enumerate(ys):
        ax = axes[i // ncols][i % ncols]
        if many:  # too many lines to read: every point, and the median per x
            pts = [(xv(r), _num(r.get(fig_key))) for r in ok]
            pts = sorted(p for p in pts if p[0] is not None and p[1] is not None)
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, alpha=0.5, label="points")
            by_x: dict[float, list] = {}
            for x, v in pts:
                by_x.setdefault(x, []).append(v)
            xm = sorted(by_x)
            ax.plot(xm, [sorted(by_x[x])[len(by_x[x]) // 2] for x in xm], "-", color="black", label="median")
        else:
            for gk, rs in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
                pts = [(xv(r), _num(r.get(fig_key))) for r in rs]
                pts = sorted(p for p in pts if p[0] is not None and p[1] is not None)
                if not pts:
                    continue
                name = ", ".join(f"{o}={v}" for o, v in zip(others, gk)) or "points"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=4, label=name)
        fx = [x for x in (xv(r) for r in failed) if x is not None]
        if fx:
            ax.plot(fx, [0.02] * len(fx), "x", color="red", ms=7, transform=ax.get_xaxis_transform(),
                    label=f"failed ({len(fx)}: see error column)")
        _maybe_log(ax, xs_all, "x")
        ticks = sorted({x for x in xs_all if x is not None})
        if 1 < len(ticks) <= 12:  # the swept values themselves
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
            ax.xaxis.set_minor_locator(_null_locator())
        ax.set_xlabel(xlab)
        ax.set_ylabel(label(fig_key))
        ax.grid(alpha=0.3)
        ax.set_title(f"{label(fig_key)} vs {key}", fontsize=9)
        ax.legend(fontsize=7)
    for j in range(n, nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    fig.suptitle(f"{title}: figures vs {xlab}", fontsize=10)
    return _save(fig, Path(path))
