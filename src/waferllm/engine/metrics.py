"""What a request on the wafer is predicted to cost: times, throughput, energy, memory, routes.

The backend counts critical-path cycles per phase while it runs (:class:`RequestCycles`);
:func:`request_metrics` turns them and the ledger's counters into the figures a user
reads. Runs that place only K of the model's layers scale what their layers took (time
and counters) to the whole model; the rest (embedding, LM head, transfers) is not scaled.
On a cluster the figures are the pipeline's (one request on one wafer at a time), every
system's static power counts for the whole request, and the link's energy is earned from
the bytes that crossed it.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

from waferllm.engine import capacity
from waferllm.mesh.cost import energy_breakdown_j
from waferllm.mesh.ledger import COUNTERS


@dataclass
class RequestCycles:
    """Critical-path cycles of one request, counted as it runs, and what its layers did."""

    # restore: the weights moved back to the prefill layout before the prefill (a request
    # after one that decoded); it delays the first token, so TTFT includes it
    phase: dict = field(default_factory=lambda: {"restore": 0.0, "prefill": 0.0, "transition": 0.0, "decode": 0.0})
    layers: dict = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})  # spent inside layers
    steps: list = field(default_factory=list)  # each decode step's cycles
    # flops, bytes, ... of the work done per layer (the layers, the transition's moves)
    layer_counters: dict = field(default_factory=lambda: defaultdict(float))

    def add_layers(self, phase: str, delta: dict) -> None:
        """Count a layer run (or replayed) in ``phase``: ``delta`` is its ledger delta."""
        self.layers[phase] += delta["cycles"]
        self.add_per_layer_counters(delta)

    def add_per_layer_counters(self, delta: dict) -> None:
        """Count work that grows with the layers placed (what an extrapolation scales)."""
        for k in COUNTERS:
            self.layer_counters[k] += delta.get(k, 0.0)

    def layer_totals(self, phase: str) -> dict:
        """What the layers took so far: ``phase``'s cycles and the counters (for differences)."""
        return {"cycles": self.layers[phase], **{k: self.layer_counters[k] for k in COUNTERS}}


def kv_capacity(model, regions: list | None = None) -> dict[str, int]:
    """Tokens the decode KV cache holds with the shift-based and the concatenation scheme:
    the whole model's, from the decode regions' own SRAM accounting (``engine.capacity``).
    ``regions``: the decode regions' :func:`capacity.region_sram`, when already read."""
    cap = capacity.kv_capacity(model.config, *_measured(model, "decode"), regions=regions)
    return {"kv_capacity_tokens": cap.shift, "kv_capacity_tokens_concat": cap.concat}


def _measured(model, phase: str):
    """(phase plan, stages) whose SRAM accounting the capacity figures read (see
    ``WaferModel.measured_stages``; the plan's own phase and stages otherwise)."""
    if hasattr(model, "measured_stages"):
        return model.measured_stages(phase)
    pp = model.plan.prefill if phase == "prefill" else model.plan.decode
    return pp, model.prefill_stages if phase == "prefill" else model.decode_stages


def sram_breakdown(model, decode_regions: list | None = None) -> dict:
    """Where the fullest PE's SRAM goes, per phase (``engine.capacity.sram_breakdown``);
    ``decode_regions`` as in :func:`kv_capacity`."""
    (pre, pre_st), (dec, dec_st) = _measured(model, "prefill"), _measured(model, "decode")
    plan = model.plan
    if pre is not plan.prefill or dec is not plan.decode:
        plan = dataclasses.replace(plan, prefill=pre, decode=dec)
    return capacity.sram_breakdown(model.config, plan, pre_st, dec_st, decode_regions=decode_regions)


def decode_regions(model) -> list | None:
    """The decode regions' SRAM (:func:`capacity.region_sram`), read once for both the KV
    capacity and the breakdown (None: no decode phase ran)."""
    pp, stages = _measured(model, "decode")
    return capacity.region_sram(model.config, pp, stages) if pp is not None and stages else None


def energy(model, seconds: float, counters: dict) -> dict:
    """Energy of the request from its events: MACs by dtype, SRAM bytes read and written,
    bits times hops on the fabric, plus the wafer's static power for its time on the
    critical path; and whole-system power x time beside it as a cross-check."""
    breakdown = energy_breakdown_j(model.wafer, counters, seconds)
    power_x_time = model.wafer.power_w * seconds
    cluster = getattr(model, "cluster", None)
    if cluster is not None:
        # every system draws its static power while the request is on any of them
        breakdown["static"] *= cluster.wafers
        breakdown["interwafer"] = 8.0 * counters.get("interwafer_bytes", 0.0) * cluster.link_energy_pj_per_bit * 1e-12
        power_x_time *= cluster.wafers
    return {"energy_j": sum(breakdown.values()), "energy_breakdown_j": breakdown,
            "energy_power_x_time_j": power_x_time}


@dataclass
class PhaseCycles:
    """A request's critical-path cycles per phase, its layers' scaled to the whole model."""

    restore: float
    prefill: float  # the restore included: it delays the first token
    transition: float
    decode: float


def phase_cycles(model) -> PhaseCycles:
    """The cycles of the request ``model`` ran since its reset(); a run of K of the model's
    layers scales what its layers took to all of them."""
    cyc = model.cycles
    scale = model.config.num_layers / model.layers
    restore = cyc.phase["restore"] * scale  # it moves every layer's weights
    return PhaseCycles(restore, restore + cyc.phase["prefill"] + cyc.layers["prefill"] * (scale - 1),
                       cyc.phase["transition"] * scale, cyc.phase["decode"] + cyc.layers["decode"] * (scale - 1))


def request_counters(model) -> dict:
    """The request's event counters (flops, bytes, ...) since its reset(), its layers' scaled
    to the whole model, and the ledger delta they come from."""
    scale = model.config.num_layers / model.layers
    delta = model.ledger.since(model.request_mark)
    return {k: delta.get(k, 0.0) + model.cycles.layer_counters[k] * (scale - 1) for k in COUNTERS}, delta


def request_times(model) -> dict:
    """The request's times and rates alone (what a search ranks its options by): the
    figures :func:`request_metrics` reports under these names, without its energy, SRAM and
    capacity analysis."""
    sec = model.wafer.cycles_to_seconds
    ph = phase_cycles(model)
    pre, trans, dec = ph.prefill, ph.transition, ph.decode
    n_dec = len(model.cycles.steps)
    prompt = model.position - n_dec
    out_tokens = n_dec + 1  # the first token comes from the prefill logits
    tpot = sec(dec / n_dec) if n_dec else None
    total = sec(pre + trans + dec)
    return {
        "ttft_s": sec(pre),
        "restore_s": sec(ph.restore),
        "transition_s": sec(trans),
        "tpot_s": tpot,
        "prefill_tokens_per_s": prompt / sec(pre) if pre else None,
        "decode_tokens_per_s": 1.0 / tpot if tpot else None,
        "e2e_tokens_per_s": out_tokens / total if total else None,
        "total_s": total,
    }


def request_metrics(model) -> dict:
    """Predicted wafer figures of the request ``model`` (a ``WaferModel``) ran since its reset()."""
    w = model.wafer
    scale = model.config.num_layers / model.layers
    times = request_times(model)
    total = times.pop("total_s")
    counters, delta = request_counters(model)
    regions = decode_regions(model)
    return {
        "wafer": w.name,
        "extrapolated_from_layers": model.layers if model.layers != model.config.num_layers else None,
        "prefill_grid": model.plan.prefill.grid if model.plan.prefill else None,
        "decode_grid": model.plan.decode.grid if model.plan.decode else None,
        **times,
        **energy(model, total, counters),
        **kv_capacity(model, regions),
        "sram_breakdown_bytes_per_pe": sram_breakdown(model, regions),
        "flops": counters["flops"],
        "bytes_moved": counters["bytes_moved"],
        "routing_stages": counters["routing_stages"],
        "sram_peak_bytes_per_pe": {
            "prefill": max((s.mesh.sram.peak_bytes for s in model.prefill_stages), default=0),
            "decode": max((s.mesh.sram.peak_bytes for s in model.decode_stages), default=0),
            "usable": w.usable_sram_bytes_per_pe,
        },
        "routes_peak_per_pe": max((s.mesh.routes.peak for s in model.prefill_stages + model.decode_stages), default=0),
        "kv_shift_moves": round(sum(s.cache.shift_moves for s in model.decode_stages) * scale),  # every layer's
        "breakdown_s": {k: w.cycles_to_seconds(v) for k, v in phase_breakdown(delta["by_primitive"]).items()},
        **cluster_figures(model, counters, delta["by_primitive"]),
    }


def cluster_figures(model, counters: dict, by_primitive: dict) -> dict:
    """On a cluster: the wafers in use and their layout, and what crossed the links (bytes,
    hand-offs, and the busy time of the transfers). Nothing on one wafer."""
    cluster = getattr(model, "cluster", None)
    if cluster is None:
        return {}
    crossing = sum(v for k, v in by_primitive.items() if k.split(".")[0] == "interwafer")
    return {"wafers": cluster.wafers, "layout": cluster.layout, "prefill_wafers": cluster.prefill_wafers,
            "interwafer_bytes": counters.get("interwafer_bytes", 0.0),
            "interwafer_transfers": counters.get("interwafer_transfers", 0.0),
            "interwafer_s": model.wafer.cycles_to_seconds(crossing)}


def phase_breakdown(by_primitive: dict[str, float]) -> dict[str, float]:
    """Busy cycles per op (primitive names before the first dot), largest first.

    Work that overlapped other work is counted in full, so the shares show where the
    PEs are busy, not a partition of the critical path."""
    out: dict[str, float] = {}
    for name, cycles in by_primitive.items():
        key = name.split(".")[0]
        out[key] = out.get(key, 0.0) + cycles
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
