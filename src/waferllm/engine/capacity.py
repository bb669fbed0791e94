"""KV capacity and where each PE's SRAM goes, from the runtime's own SRAM accounting.

After a request, every region's accounting (``mesh.sram``) knows what it holds at rest
(placed weights, vocabulary tables, the decode KV cache) and what it held when its
fullest PE was at its highest: the same, plus the activations and kernel buffers of the
step that got there (and in prefill, the prompt's K/V kept for the transition). Every
allocation is sorted into a kind by its name (see :func:`kind_of`).

The per-layer kinds are scaled to the layers a region holds in the whole model
(``PhasePlan.layer_share``): an extrapolated run places only the first K layers, so a
region may hold fewer than its share, or none. A region with no layer placed borrows
the per-layer figures and the layer step's activations of a region of the same side
that has some; when none has, the planner's estimates stand in (``source`` says which).

KV capacity: a decode region whose PE rows hold ``s`` cache slots needs

    weights + vocabulary tables + s * (KV per slot + attention per slot) + other transients

on its fullest PE. Decode attention sizes its score tiles by the slots of the row
(``decode_scores_bytes_per_slot``): with the cache, they are what grows with the
context. Everything else is measured. The shift-based cache fills every row evenly, so
a region caches ``s * rows`` tokens; the concatenation cache grows one row, ``s``
tokens. The capacity is the tightest region's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from waferllm.engine.placement import (PhasePlan, Plan, activation_bytes, cdiv, decode_scores_bytes_per_slot,
                                       kv_bytes_per_slot, layer_weight_bytes)

KINDS = ("weights", "vocab_tables", "kv_cache", "activations", "buffers")

# allocation names, by kind
_WEIGHT = re.compile(r"L\d+\.")  # a placed layer weight: "L{layer}.{matrix}"
_VOCAB_TABLES = frozenset({"lm_head", "embedding", "final_norm"})
_DECODE_CACHE = re.compile(r"kv(\[[^\]]*\])? cache \(")  # the decode KV cache of a region's layers
# prefill: each layer's K and V, kept on the region until the transition moves them
_PREFILL_KV = {"k_prefill": "k", "v_prefill": "v", "rope_k": "k", "v_proj": "v", "bias_v": "v"}
# kernel scratch: accumulators, partial products before their reduction, receive buffers
_BUFFER_MARKS = ("_acc", "_partial", ".next_tiles", ".reduce", ".shift_")


def kind_of(name: str, phase: str) -> str:
    """The kind of an SRAM allocation: one of :data:`KINDS`."""
    if _WEIGHT.match(name):
        return "weights"
    if name in _VOCAB_TABLES:
        return "vocab_tables"
    if _DECODE_CACHE.match(name) or (phase == "prefill" and name in _PREFILL_KV):
        return "kv_cache"
    if any(m in name for m in _BUFFER_MARKS):
        return "buffers"
    return "activations"


def _by_kind(entries, phase: str) -> dict[str, int]:
    out = dict.fromkeys(KINDS, 0)
    for name, b in entries:
        out[kind_of(name, phase)] += b
    return out


@dataclass
class RegionSRAM:
    """One region's fullest PE at its highest point, for the layers it holds in the whole model."""

    region: str
    side: int
    layers: int  # layers placed on the region in this run
    share: int  # layers it holds in the whole model
    weights: int = 0
    vocab_tables: int = 0
    kv_cache: int = 0
    activations: int = 0
    buffers: int = 0
    kv_bytes_per_slot: int = 0  # decode: one cache slot of every layer of the share
    # decode: each program point where usage peaks, as (transient bytes not sized by the
    # cache, bytes per cache slot of the attention's score tiles live there)
    points: list[tuple[int, int]] = field(default_factory=list)
    source: str = "measured"  # "like <region>": a region of the same side's layers; "scaled from <region>"

    @property
    def total(self) -> int:
        return sum(getattr(self, k) for k in KINDS)

    def kinds(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in KINDS}


@dataclass
class KVCapacity:
    shift: int  # tokens the shift-based cache holds (every row fills)
    concat: int  # tokens the concatenation cache holds (one row grows)
    regions: list[RegionSRAM] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # cache slots per PE row each region can take


@dataclass
class _Measured:
    at_peak: dict[str, int]  # bytes by kind on the fullest PE at its highest point
    weights_at_rest: int
    kv_at_rest: int
    kv_layers_at_peak: int  # prefill: layers whose K/V were held at the highest point
    slots_held: int  # decode: slots per row the cache allocation holds
    points: list[tuple[int, int]]  # decode: see RegionSRAM.points


def _peak_points(config, sram, slots: int) -> list[tuple[int, int]]:
    """(transient bytes not sized by the cache, score bytes per slot) at each program point
    where the region's usage peaked, the attention having scanned ``slots`` per row.

    A score tile holds every head's score for each scanned slot of the PE's row (fp32 or
    fp16): the transients of exactly that size are the copies attention keeps at once,
    whatever its buffer lifetimes. With one slot, the sizes are ambiguous (a per-head
    statistic has the same size): they count as score tiles, which only overstates
    their growth."""
    now = sram.held()
    sizes = {config.num_heads * slots * item for item in (4, 2)}
    points = set()
    for entries in sram.held_at_highs().values():
        transient = [b for h, (_, b) in entries.items() if h not in now]
        scores = sum(b for b in transient if b in sizes)
        points.add((sum(transient) - scores, scores // slots))
    return sorted(points)


def _measure(config, stage, phase: str) -> _Measured:
    sram = stage.mesh.sram
    now = sram.held()
    rest = _by_kind(now.values(), phase)
    peak = sram.held_at_peak()
    at_peak = _by_kind(peak.values(), phase)
    # a placed tensor's copies in flight (MeshGEMM rotates a weight through its placed
    # space, lent, and one receive buffer) are kernel buffers beyond what rests there
    for k in ("weights", "vocab_tables"):
        extra = max(0, at_peak[k] - rest[k])
        at_peak[k] -= extra
        at_peak["buffers"] += extra
    kv_layers = sum(1 for name, _ in peak.values() if _PREFILL_KV.get(name) == "k") if phase == "prefill" else 0
    held, points = 0, []
    cache = getattr(stage, "cache", None)
    if cache is not None:
        # attention scans the fullest row's occupied slots; the cache holds cap slots per
        # row (shift) or grows with the bottom row (concat)
        held = int(cache.cap) if cache.scheme == "shift" else int(cache.count.max())
        points = _peak_points(config, sram, max(1, int(cache.count.max())))
    return _Measured(at_peak, rest["weights"], rest["kv_cache"], kv_layers, held, points)


def region_sram(config, pp: PhasePlan, stages) -> list[RegionSRAM]:
    """Each region's fullest PE for the whole model's layer share, from ``stages`` (the
    engine's stages of phase ``pp``, in plan order: each with ``.mesh`` and ``.layer_ids``,
    decode ones with their ``.cache``), after they have run.

    A region with no layer placed takes the per-layer figures and the layer step's
    transients of a region of the same side that has layers; when no region of its side
    has, of the nearest side, scaled by the planner's ratios between the two sides."""
    phase = pp.phase
    share = pp.layer_share or [len(s.layers) for s in pp.stages]
    meas = [_measure(config, st, phase) for st in stages]
    ran = [i for i, st in enumerate(stages) if len(st.layer_ids)]
    out = []
    for i, (st, m, n) in enumerate(zip(stages, meas, share)):
        side = st.mesh.rows
        r = RegionSRAM(st.mesh.region.name, side, len(st.layer_ids), n, vocab_tables=m.at_peak["vocab_tables"],
                       activations=m.at_peak["activations"], buffers=m.at_peak["buffers"], points=m.points)
        if not ran:
            out.append(r)
            continue
        same = [j for j in ran if stages[j].mesh.rows == side]
        j = i if i in ran else same[0] if same else min(ran, key=lambda j: abs(stages[j].mesh.rows - side))
        d, dl, dside = meas[j], len(stages[j].layer_ids), stages[j].mesh.rows
        if j != i:
            r.source = f"like {stages[j].mesh.region.name}" if same else f"scaled from {stages[j].mesh.region.name}"
        f = _SideRatios(config, pp, dside, side)
        r.weights = round(d.weights_at_rest * n / dl * f.weights)
        # the step that reached the highest point: a layer's, or this region's own (e.g. the
        # LM head's), whichever held more
        if (d.at_peak["activations"] + d.at_peak["buffers"]) * f.transients > r.activations + r.buffers:
            r.activations = round(d.at_peak["activations"] * f.transients)
            r.buffers = round(d.at_peak["buffers"] * f.transients)
        if phase == "prefill":
            # the whole share's K/V, as held once every layer has run (at the LM head)
            r.kv_cache = round(d.at_peak["kv_cache"] / max(1, d.kv_layers_at_peak) * n * f.kv)
        else:
            r.kv_bytes_per_slot = round(d.kv_at_rest / max(1, dl * d.slots_held) * n * f.kv)
            r.kv_cache = r.kv_bytes_per_slot * m.slots_held
            # the layer step's peaks (the donor's), and this region's own (e.g. its LM head's)
            r.points = sorted(set(m.points) | {(round(c * f.transients), d_) for c, d_ in d.points})
            if not any(d_ for _, d_ in r.points):  # no decode step ran: the planner's estimate
                slots = cdiv(pp.seq_len, side)
                per_slot = decode_scores_bytes_per_slot(config)
                r.points.append((activation_bytes(config, side, phase, pp.seq_len, pp.dtype) - slots * per_slot,
                                 per_slot))
                r.source = "estimated"
        out.append(r)
    return out


class _SideRatios:
    """Planner ratios between a region side with a measured layer and one without: what a
    measured per-layer figure is multiplied by (1 for the same side)."""

    def __init__(self, config, pp: PhasePlan, measured: int, side: int):
        self.weights = self.kv = self.transients = 1.0
        if side == measured:
            return
        phase, dtype, seq = pp.phase, pp.dtype, pp.seq_len
        self.weights = layer_weight_bytes(config, side, phase, dtype) / layer_weight_bytes(config, measured, phase, dtype)
        kv = kv_bytes_per_slot(config, side, dtype) / kv_bytes_per_slot(config, measured, dtype)
        self.kv = kv * (cdiv(seq, side) / cdiv(seq, measured) if phase == "prefill" else 1)
        if phase == "prefill":
            a = activation_bytes(config, side, phase, seq, dtype, pp.heads_per_pass)
            self.transients = a / activation_bytes(config, measured, phase, seq, dtype, pp.heads_per_pass)
        else:  # the other decode transients are slices of hidden-size vectors
            self.transients = cdiv(config.hidden_size, side) / cdiv(config.hidden_size, measured)


def region_slots_capacity(r: RegionSRAM, usable: int) -> int:
    """Cache slots per PE row a decode region can take: the most that every program point
    where its usage peaks still fits (see the module docstring)."""
    room = usable - r.weights - r.vocab_tables
    if not r.kv_bytes_per_slot:
        return 0
    return max(0, min((room - c) // (r.kv_bytes_per_slot + d) for c, d in r.points or [(0, 0)]))


def kv_capacity(config, pp: PhasePlan | None, stages) -> KVCapacity:
    """Tokens the decode regions can cache, whole model, from their SRAM accounting.

    ``pp`` is the plan's decode phase and ``stages`` the engine's decode stages (see
    :func:`region_sram`), after at least one decode step has run."""
    if pp is None or not stages:
        return KVCapacity(0, 0)
    regions = region_sram(config, pp, stages)
    usable = stages[0].mesh.wafer.usable_sram_bytes_per_pe
    slots = [region_slots_capacity(r, usable) for r in regions]
    held = [(s, r.side) for s, r in zip(slots, regions) if r.share]
    if not held:
        return KVCapacity(0, 0, regions, slots)
    return KVCapacity(min(s * side for s, side in held), min(s for s, _ in held), regions, slots)


def fullest_pe(regions: list[RegionSRAM], wafer) -> dict[str, int]:
    """Where the SRAM of the fullest PE of these regions goes, bytes by kind; with the
    reserve (code and runtime) and what is left free they sum to the PE's SRAM."""
    if not regions:
        return {}
    r = max(regions, key=lambda x: x.total)
    out = r.kinds()
    out["reserved"] = wafer.reserved_bytes_per_pe
    out["free"] = wafer.usable_sram_bytes_per_pe - r.total
    return out


def sram_breakdown(config, plan: Plan, prefill_stages, decode_stages) -> dict[str, dict[str, int]]:
    """Per phase, where the fullest PE's SRAM goes for the whole model (see :func:`fullest_pe`):
    ``{"prefill": {...}, "decode": {...}}``, phases that were not planned left out."""
    out = {}
    for phase, pp, stages in (("prefill", plan.prefill, prefill_stages), ("decode", plan.decode, decode_stages)):
        if pp is not None and stages:
            out[phase] = fullest_pe(region_sram(config, pp, stages), stages[0].mesh.wafer)
    return out
