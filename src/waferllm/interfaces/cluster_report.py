"""`waferllm predict --wafers auto|N`: a model pipelined over the wafers of a cluster.

The prediction (:func:`waferllm.engine.predict.predict_cluster`), its report (each wafer's
layers, vocabulary slice and regions, the traffic over the links, the options the search
predicted) and the single-wafer does-not-fit error completed with the wafers it needs.
"""

from __future__ import annotations

from rich.table import Table

from waferllm.errors import PlacementError, RequestError


def parse_wafers(value: str) -> int | str:
    """``--wafers``: a positive whole number or ``auto``."""
    v = str(value).strip().lower()
    if v == "auto":
        return "auto"
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise RequestError(f"--wafers must be a positive whole number or 'auto', got {value!r}")
    return n


def cluster_spec(wafer_spec, cluster: str | None):
    """The cluster of the run: ``--cluster`` (its systems' wafer, with the ``--set`` overrides
    already applied to ``wafer_spec`` when it is the same preset), or the preset of
    ``wafer_spec``'s systems."""
    from waferllm.hardware.cluster import cluster_for, get_cluster

    if cluster is None:
        return cluster_for(wafer_spec)
    c = get_cluster(cluster)
    same = c.wafer.name == wafer_spec.name.split("[")[0]
    return get_cluster(c, wafer=wafer_spec) if same else c


def with_wafers_needed(exc: PlacementError, config, wafer, run) -> PlacementError:
    """``exc`` (the model does not fit one wafer on any grid tried) with the fewest wafers that
    hold it on the candidate grids, planned; ``exc`` itself when none do or it already says."""
    from waferllm.engine.cluster import fewest_any_grid

    if "wafers_needed" in exc.context:
        return exc
    try:
        found = fewest_any_grid(config, wafer, run)
    except PlacementError:
        found = None
    if found is None:
        return exc
    n, pg, dg = found
    text = str(exc)
    cut = text.find(" Pipelined over wafers")  # a count for one grid quoted from an inner error
    text = text[:cut] if cut >= 0 else text
    return PlacementError(f"{text} Pipelined over wafers, it needs {n} {wafer.name} wafers (prefill grid {pg}, decode "
                          f"grid {dg}; checked by planning them): --wafers {n}, or --wafers auto.",
                          **{**exc.context, "wafers_needed": n})


def _t(s) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.4g} ms" if s >= 1e-3 else f"{s * 1e6:.4g} us"


def wafer_table(m: dict) -> Table:
    """Each wafer of the chosen option: its phases, layers, vocabulary slice and regions."""
    p = m["placement"]
    t = Table("wafer", "phases", "layers", "vocabulary", "prefill regions", "decode regions",
              title=f"{p.get('wafers', 1)} wafers, {p.get('layout', 'shared')} layout (per-wafer placement)")
    for w in p.get("per_wafer", []):
        regions = {ph: (", ".join(f"{s}" for s in w[ph]["region_sides"]) if ph in w else "-")
                   for ph in ("prefill", "decode")}
        vocab = w["vocab"]
        t.add_row(str(w["wafer"]), "+".join(w["phases"]), f"{w['layers'][0]}-{w['layers'][1] - 1}",
                  f"{vocab[0]:,}-{vocab[1] - 1:,}" if vocab[1] > vocab[0] else "-",
                  regions["prefill"], regions["decode"])
    return t


def link_table(m: dict) -> Table:
    c = m.get("cluster") or {}
    t = Table("metric", "value", title="between the wafers")
    if c:
        t.add_row("link", f"{c['link_bytes_per_s']['value'] / 1e9:.4g} GB/s per system each direction, "
                          f"{c['hops']['value']} hops x {_t(c['hop_latency_s']['value'])}, "
                          f"{_t(c['transfer_overhead_s']['value'])} per hand-off ({c['name']})")
    t.add_row("bytes over the links", f"{m.get('interwafer_bytes', 0):,.0f} in {m.get('interwafer_transfers', 0):,.0f} "
                                      "hand-offs")
    t.add_row("time in transfers between wafers", _t(m.get("interwafer_s")))
    return t


def options_table(m: dict) -> Table:
    """The options the search predicted, each with its figures (or why it did not place)."""
    s = m["cluster_search"]
    t = Table("wafers", "layout", "grids (prefill/decode)", "TTFT", "TPOT", "e2e time", "e2e TPR", "",
              title=f"options predicted (fewest wafers that hold it: {s['fewest_wafers']})")
    best = s["chosen"]
    for o in s["options"]:
        lay = o["layout"] + (f" ({o['prefill_wafers']}+{o['wafers'] - o['prefill_wafers']})" if o["prefill_wafers"]
                             else "")
        grids = f"{o['prefill_grid']}/{o['decode_grid']}"
        if o["e2e_s"] is None:
            t.add_row(str(o["wafers"]), lay, grids, "-", "-", "-", "-", o["note"][:60])
            continue
        mark = "chosen" if (o["wafers"], o["layout"], o["prefill_wafers"]) == (
            best["wafers"], best["layout"], best["prefill_wafers"]) else ""
        t.add_row(str(o["wafers"]), lay, grids, _t(o["ttft_s"]), _t(o["tpot_s"]), _t(o["e2e_s"]),
                  f"{o['e2e_tokens_per_s']:,.1f}", mark)
    return t


def print_cluster(m: dict, console) -> None:
    if m.get("placement", {}).get("per_wafer"):
        console.print(wafer_table(m))
        console.print(link_table(m))
    if m.get("cluster_search"):
        console.print(options_table(m))
