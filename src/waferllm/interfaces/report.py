"""Human-readable reports of wafer predictions (rich tables)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _t(s):
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _r(x):
    return "-" if x is None else f"{x:,.1f}"


def _banded(m: dict, key: str, fmt) -> str:
    """A figure with its low-high band when the prediction carries one."""
    v = m.get(key)
    lo, hi = m.get(f"{key}_low"), m.get(f"{key}_high")
    if v is None or lo is None or hi is None:
        return fmt(v)
    return f"{fmt(v)}  ({fmt(lo)} - {fmt(hi)})"


def timing_table(m: dict, title: str = "predicted on the wafer") -> Table:
    t = Table("metric", "value", title=title)
    t.add_row("wafer", f"{m.get('wafer')}  (prefill grid {m.get('prefill_grid')}, decode grid {m.get('decode_grid')})")
    t.add_row("TTFT (prefill)", _banded(m, "ttft_s", _t))
    if m.get("restore_s"):
        t.add_row("  of which restoring the prefill layout", _t(m["restore_s"]))
    t.add_row("prefill -> decode transition", _banded(m, "transition_s", _t))
    t.add_row("TPOT", _banded(m, "tpot_s", _t))
    t.add_row("prefill tokens/s", _banded(m, "prefill_tokens_per_s", _r))
    t.add_row("decode TPR (tokens/s)", _banded(m, "decode_tokens_per_s", _r))
    t.add_row("end-to-end TPR (tokens/s)", _banded(m, "e2e_tokens_per_s", _r))
    t.add_row("energy (from events)", f"{m.get('energy_j', 0):.4g} J")
    parts = m.get("energy_breakdown_j") or {}
    if parts:
        t.add_row("  of which", ", ".join(f"{k} {v:.3g} J" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))
    if m.get("energy_power_x_time_j") is not None:
        t.add_row("  cross-check: system power x time", f"{m['energy_power_x_time_j']:.4g} J")
    t.add_row("KV capacity (shift / concat)",
              f"{m.get('kv_capacity_tokens', 0):,} / {m.get('kv_capacity_tokens_concat', 0):,} tokens")
    sram = m.get("sram_peak_bytes_per_pe") or {}
    if sram:
        t.add_row("SRAM peak per PE (prefill / decode / usable)",
                  f"{sram.get('prefill', 0):,} / {sram.get('decode', 0):,} / {sram.get('usable', 0):,} B")
    t.add_row("routes per PE (peak)", str(m.get("routes_peak_per_pe")))
    if m.get("note"):
        t.add_row("note", m["note"])
    return t


def breakdown_table(m: dict, top: int = 10) -> Table:
    t = Table("op", "time", "share", title="busy time per op (overlapped work counted in full)")
    items = list((m.get("breakdown_s") or {}).items())
    total = sum(v for _, v in items) or 1.0
    for k, v in items[:top]:
        t.add_row(k, _t(v), f"{100 * v / total:.1f}%")
    return t


def gpu_table(baselines: list[dict]) -> Table:
    """The GPU baselines beside a prediction: every setup with its ideal roofline (a bound)
    and its calibrated model (fitted to measured SGLang numbers); what each rests on is the
    table's caption (the JSON carries every baseline's full provenance)."""
    from waferllm.baselines import baseline_rows

    rows = baseline_rows(baselines)
    bases = dict.fromkeys(f"{g['baseline']}: {g['basis']}" for g in rows if g.get("basis"))
    t = Table("device", "baseline", "TTFT", "TPOT", "decode TPR", "e2e TPR", "energy", "fits",
              title="GPU baselines", caption="; ".join(bases))
    for g in rows:
        energy = "-" if g.get("energy_j") is None else f"{g['energy_j']:.3g} J"
        fits = "-" if g.get("fits") is None else ("yes" if g["fits"] else "no")
        t.add_row(g["device"], g["baseline"], _t(g.get("ttft_s")), _t(g.get("tpot_s")),
                  _r(g.get("decode_tokens_per_s")), _r(g.get("e2e_tokens_per_s")), energy, fits)
    return t


def plan_table(plan: dict) -> Table:
    """The regions of each phase and the planner's budget for its fullest PE (whole model)."""
    t = Table("phase", "grid", "regions", "layers/region", "weights", "KV cache", "activations", "vocab tables",
              title="placement plan (planner's budget, bytes per PE)")
    for phase in ("prefill", "decode"):
        p = plan.get(phase)
        if not p:
            continue
        b = p["bytes_per_pe"]
        layers = max(p.get("layer_share") or [p["layers_per_region"]])
        t.add_row(phase, f"{p['grid']}x{p['grid']}", f"{p['regions']} of {p['regions_available']}", str(layers),
                  f"{b['weights']:,}", f"{b['kv_cache']:,}", f"{b['activations']:,}", f"{b['vocab_tables']:,}")
    return t


SRAM_KINDS = (("weights", "weights"), ("vocab_tables", "vocab tables"), ("kv_cache", "KV cache"),
              ("activations", "activations"), ("buffers", "buffers"), ("reserved", "reserve"), ("free", "free"))


def sram_table(m: dict) -> Table | None:
    """Where the fullest PE's SRAM goes in each phase, whole model, from the runtime's accounting."""
    bd = m.get("sram_breakdown_bytes_per_pe") or {}
    phases = [ph for ph in ("prefill", "decode") if bd.get(ph)]
    if not phases:
        return None
    t = Table("bytes per PE", *phases, title="SRAM of the fullest PE (runtime accounting, whole model)")
    for key, label in SRAM_KINDS:
        t.add_row(label, *(f"{bd[ph].get(key, 0):,}" for ph in phases))
    t.add_row("total", *(f"{sum(bd[ph].get(k, 0) for k, _ in SRAM_KINDS):,}" for ph in phases))
    return t


def print_report(m: dict, console: Console | None = None, plan: dict | None = None, gpus: list | None = None) -> None:
    console = console or Console(stderr=True)
    console.print(timing_table(m))
    if plan:
        console.print(plan_table(plan))
    sram = sram_table(m)
    if sram is not None:
        console.print(sram)
    console.print(breakdown_table(m))
    if gpus:
        console.print(gpu_table(gpus))
