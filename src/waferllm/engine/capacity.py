"""KV capacity and where each PE's SRAM goes, from the runtime's own SRAM accounting.

After a request, every region's accounting (``mesh.sram``) knows what it holds at rest
(placed weights, vocabulary tables, the decode KV cache) and what it held at each
program point where its fullest PE's usage peaked: the same, plus the activations and
kernel buffers of the step there (and in prefill, the prompt's K/V kept for the
transition). Every allocation is sorted into a kind by its name (see :func:`kind_of`).

The per-layer kinds are scaled to the layers a region holds in the whole model
(``PhasePlan.layer_share``): an extrapolated run places only the first K layers, so a
region may hold fewer than its share, or none. A region with no layer placed borrows
the per-layer figures and the layer step's peaks of a region of the same side that has
some, or else of the nearest side, scaled by the planner's ratios between the two sides
(``RegionSRAM.source`` says which).

KV capacity: with ``s`` cache slots per PE row, each peak of a decode region needs

    weights + vocabulary tables + s * (KV per slot + score tiles per slot) + the rest

on its fullest PE: decode attention sizes its score tiles by the slots it scans, so
with the cache they are what grows with the context. All of it is measured. The
shift-based cache fills every row evenly, so a region caches ``s * rows`` tokens; the
concatenation cache grows one row, ``s`` tokens. The capacity is the tightest region's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from waferllm.engine.placement import (PhasePlan, Plan, activation_bytes, cdiv, decode_row_slots,
                                       decode_score_tile_bytes_per_slot, decode_scores_bytes_per_slot,
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
# a softmax's per-head statistics: with one cache slot, the size of a score tile
_STATISTIC = re.compile(r"\.(allreduce_)?(max|sum)$")


@lru_cache(maxsize=8192)
def kind_of(name: str, phase: str) -> str:
    """The kind of an SRAM allocation: one of :data:`KINDS` (the same names recur)."""
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


@dataclass(frozen=True)
class Point:
    """What a region holds beside its placed tensors at one program point where its usage
    peaked (bytes on the fullest PE)."""

    activations: int  # not counting attention's score tiles
    buffers: int
    score_bytes_per_slot: int = 0  # decode: attention's live score tiles, per scanned cache slot

    def transient(self, slots: int = 0) -> int:
        return self.activations + self.buffers + slots * self.score_bytes_per_slot

    def scaled(self, f: float) -> "Point":
        return Point(round(self.activations * f), round(self.buffers * f), self.score_bytes_per_slot)


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
    slots: int = 0  # decode: cache slots per row attention scans (the fullest row's occupancy)
    points: list[Point] = field(default_factory=list)  # where its usage peaks
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
    rest: dict[str, int]  # bytes by kind on the fullest PE now, the request done
    points: dict[str, Point]  # by the allocation that reached it
    kv_per_layer: float  # prefill: one layer's K/V; decode: one cache slot of one layer
    slots: int  # decode: cache slots per row attention scanned at the end
    slots_held: int  # decode: cache slots per row the allocation holds


def _points(config, sram, phase: str, rest: dict[str, int], slots: int, queries: int = 1) -> tuple[dict[str, Point], float]:
    """Each program point where the region's usage peaked (by the allocation that got it
    there), and (prefill) the bytes of one layer's K and V.

    Prefill: every layer's K and V tiles have one shape (the prompt's [L, kv] on the
    region), so one layer's K/V take twice the bytes of any K tile held.

    Decode: a score tile holds every head's fp32 score for each scanned slot of the PE's
    row (:func:`~waferllm.engine.placement.decode_score_tile_bytes_per_slot`), so the
    transients of exactly that size are the copies attention keeps at once,
    whatever its buffer lifetimes. With one slot, a softmax's per-head statistics (its
    max and sum) have that size too: they are told apart by name."""
    now = sram.held()
    highs = {at: (_by_kind(e.values(), phase), e) for at, e in sram.held_at_highs().items()}
    kv_layer = 0.0
    if phase == "prefill":
        kv_layer = 2 * max((b for _, e in highs.values() for name, b in e.values() if _PREFILL_KV.get(name) == "k"),
                           default=0)
    # one query's score tile; a verification pass's T queries keep T of them side by side
    score_tile = decode_score_tile_bytes_per_slot(config) * slots if phase == "decode" else -1
    tiles = {score_tile * t for t in range(1, queries + 1)}
    points = {}
    for at, (kinds, entries) in highs.items():
        # a placed tensor's copies in flight (MeshGEMM rotates a weight through its placed
        # space, lent, and one receive buffer) are kernel buffers beyond what rests there
        in_flight = sum(max(0, kinds[x] - rest[x]) for x in ("weights", "vocab_tables"))
        scores = sum(b for h, (name, b) in entries.items()
                     if b in tiles and h not in now and not _STATISTIC.search(name))
        points[at] = Point(kinds["activations"] - scores, kinds["buffers"] + in_flight, scores // max(slots, 1))
    return points, kv_layer


def _measure(config, stage, phase: str, queries: int = 1) -> _Measured:
    sram = stage.mesh.sram
    rest = sram.memo(("rest", phase), lambda: _by_kind(sram.held().values(), phase))
    cache = getattr(stage, "cache", None)

    def points_at(slots):  # what the accounting says, read once per state of it
        return sram.memo(("points", phase, slots, config.num_heads, queries),
                         lambda: _points(config, sram, phase, rest, slots, queries))

    if cache is None:
        points, kv_layer = points_at(0)
        return _Measured(rest, points, kv_layer, 0, 0)
    # the allocation holds cap slots per row (shift) or grows with the bottom row (concat);
    # attention scans the fullest row's occupied slots (or, failing that, all of them)
    held = int(cache.cap) if cache.scheme == "shift" else int(cache.count.max())
    slots = max(1, int(cache.count.max()))
    points, _ = points_at(slots)
    if not any(p.score_bytes_per_slot for p in points.values()) and cache.cap != slots:
        by_cap, _ = points_at(int(cache.cap))
        if any(p.score_bytes_per_slot for p in by_cap.values()):
            points, slots = by_cap, int(cache.cap)
    layers = len(stage.layer_ids)
    kv_slot = rest["kv_cache"] / (layers * held) if layers and held else \
        kv_bytes_per_slot(config, stage.mesh.rows, cache.dtype)  # nothing cached: the cache's own layout
    return _Measured(rest, points, kv_slot, slots, held)


def region_sram(config, pp: PhasePlan, stages) -> list[RegionSRAM]:
    """Each region's fullest PE for the whole model's layer share, from ``stages`` (the
    engine's stages of phase ``pp``, in plan order: each with ``.mesh`` and ``.layer_ids``,
    decode ones with their ``.cache``), after they have run.

    A region with no layer placed takes the per-layer figures and the layer step's peaks
    of a region of the same side that has layers; when no region of its side has, of the
    nearest side, scaled by the planner's ratios between the two sides. Its own peaks
    (e.g. its LM head's) count too."""
    phase = pp.phase
    share = pp.layer_share or [len(s.layers) for s in pp.stages]
    meas = [_measure(config, st, phase, pp.queries) for st in stages]
    ran = [i for i, st in enumerate(stages) if len(st.layer_ids)]
    out = []
    for i, (st, m, n) in enumerate(zip(stages, meas, share)):
        side = st.mesh.rows
        points = dict(m.points)
        r = RegionSRAM(st.mesh.region.name, side, len(st.layer_ids), n, vocab_tables=m.rest["vocab_tables"],
                       slots=m.slots)
        if ran:
            same = [j for j in ran if stages[j].mesh.rows == side]
            j = i if i in ran else same[0] if same else min(ran, key=lambda j: abs(stages[j].mesh.rows - side))
            d, f = meas[j], _SideRatios(config, pp, stages[j].mesh.rows, side)
            if j != i:
                name = stages[j].mesh.region.name
                r.source = f"like {name}" if same else f"scaled from {name}"
                # the layer step's peaks: where the donor's program differs from this region's own
                points.update({at: p.scaled(f.transients) for at, p in d.points.items() if at not in m.points})
            r.weights = round(d.rest["weights"] / len(stages[j].layer_ids) * n * f.weights)
            if phase == "prefill":
                # the whole share's K/V, as held once every layer has run (at the LM head)
                r.kv_cache = round(d.kv_per_layer * n * f.kv)
            else:
                r.kv_bytes_per_slot = round(d.kv_per_layer * n * f.kv)
                r.kv_cache = r.kv_bytes_per_slot * m.slots_held
        r.points = sorted(set(points.values()), key=lambda p: (p.transient(), p.score_bytes_per_slot))
        if phase == "decode" and n and not any(p.score_bytes_per_slot for p in r.points):
            # no decode step ran: the planner's estimate of a layer step, its score tiles over the
            # slots the plan's attention scans (the concatenation cache: its bottom row's)
            r.slots = decode_row_slots(pp.seq_len, side, pp.kv_scheme, pp.prompt_len, pp.request_len)[1]
            per_slot = decode_scores_bytes_per_slot(config)
            other = activation_bytes(config, side, phase, pp.seq_len, pp.dtype, slots=r.slots) - r.slots * per_slot
            r.points.append(Point(max(0, other), 0, per_slot))
            r.source = "estimated"
        top = max(r.points, key=lambda p: p.transient(r.slots), default=Point(0, 0))
        r.activations, r.buffers = top.activations + r.slots * top.score_bytes_per_slot, top.buffers
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
        w = layer_weight_bytes
        fmt = getattr(pp, "weights", "fp16")
        self.weights = w(config, side, phase, dtype, fmt) / w(config, measured, phase, dtype, fmt)
        kv = kv_bytes_per_slot(config, side, dtype) / kv_bytes_per_slot(config, measured, dtype)
        self.kv = kv * (cdiv(seq, side) / cdiv(seq, measured) if phase == "prefill" else 1)
        if phase == "prefill":
            hpp, att = pp.heads_per_pass, pp.attention  # the passes as planned, for the attention planned
            a = activation_bytes(config, side, phase, seq, dtype, hpp, att)
            self.transients = a / activation_bytes(config, measured, phase, seq, dtype, hpp, att)
        else:  # the other decode transients are slices of hidden-size vectors
            self.transients = cdiv(config.hidden_size, side) / cdiv(config.hidden_size, measured)


def region_slots_capacity(r: RegionSRAM, usable: int) -> int:
    """Cache slots per PE row a decode region can take: the most with which every program
    point where its usage peaks still fits (see the module docstring)."""
    if not r.kv_bytes_per_slot:
        return 0
    room = usable - r.weights - r.vocab_tables
    return max(0, min((room - p.transient()) // (r.kv_bytes_per_slot + p.score_bytes_per_slot)
                      for p in r.points or [Point(0, 0)]))


def kv_capacity(config, pp: PhasePlan | None, stages, regions: list[RegionSRAM] | None = None) -> KVCapacity:
    """Tokens the decode regions can cache, whole model, from their SRAM accounting.

    ``pp`` is the plan's decode phase and ``stages`` the engine's decode stages (see
    :func:`region_sram`), after at least one decode step has run; ``regions``: their
    :func:`region_sram`, when the caller has read it."""
    if pp is None or not stages:
        return KVCapacity(0, 0)
    regions = regions if regions is not None else region_sram(config, pp, stages)
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


def sram_breakdown(config, plan: Plan, prefill_stages, decode_stages,
                   decode_regions: list[RegionSRAM] | None = None) -> dict[str, dict[str, int]]:
    """Per phase, where the fullest PE's SRAM goes for the whole model (see :func:`fullest_pe`):
    ``{"prefill": {...}, "decode": {...}}``, phases that were not planned left out.
    ``decode_regions``: the decode stages' :func:`region_sram`, when the caller has read it."""
    out = {}
    for phase, pp, stages in (("prefill", plan.prefill, prefill_stages), ("decode", plan.decode, decode_stages)):
        if pp is not None and stages:
            read = decode_regions if phase == "decode" and decode_regions is not None else None
            out[phase] = fullest_pe(read or region_sram(config, pp, stages), stages[0].mesh.wafer)
    return out
