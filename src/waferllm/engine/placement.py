"""Placement planning: which region of the wafer holds what, and whether it fits.

A phase (prefill or decode) runs on square regions of ``grid x grid`` PEs tiled over
the wafer. Layers form a pipeline of regions (for one request one region is busy at a
time); the LM head (and, for untied models, the embedding table) get regions of their
own, split by vocabulary when one region cannot hold them. Per-PE SRAM is budgeted for
weights, KV cache, activations and buffers; the runtime's SRAM accounting then checks
every allocation for real.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from waferllm.engine.layouts import HeadLayout
from waferllm.errors import MeshError, PlacementError
from waferllm.hardware.plmr import DTYPE_BYTES, WaferSpec
from waferllm.mesh.region import Region

PHASES = ("prefill", "decode")
PLANNING_SLACK = 2048  # bytes per PE


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Stage:
    kind: str  # "layers": a run of layers plus a vocabulary slice of the LM head / embedding
    region: Region
    layers: range = range(0)
    vocab: range = range(0)

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "region": self.region.describe()}
        d["layers"] = [self.layers.start, self.layers.stop]
        d["vocab"] = [self.vocab.start, self.vocab.stop]
        return d


@dataclass
class PhasePlan:
    phase: str
    grid: int
    stages: list[Stage]
    layers_per_region: int
    bytes_per_pe: dict[str, int]
    regions_available: int
    heads_per_pass: int = 1

    @property
    def layer_stages(self) -> list[Stage]:
        return [s for s in self.stages if s.kind == "layers"]

    def to_dict(self) -> dict:
        return {
            "grid": self.grid,
            "regions": len(self.stages),
            "regions_available": self.regions_available,
            "layers_per_region": self.layers_per_region,
            "heads_per_pass": self.heads_per_pass,
            "bytes_per_pe": dict(self.bytes_per_pe),
            "stages": [s.to_dict() for s in self.stages],
        }


@dataclass
class Plan:
    model: str
    wafer: str
    dtype: str
    max_seq_len: int
    prefill: PhasePlan | None
    decode: PhasePlan | None
    kv_capacity_tokens: int
    kv_capacity_tokens_concat: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "wafer": self.wafer, "dtype": self.dtype, "max_seq_len": self.max_seq_len,
            "prefill": self.prefill.to_dict() if self.prefill else None,
            "decode": self.decode.to_dict() if self.decode else None,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "kv_capacity_tokens_concat": self.kv_capacity_tokens_concat, "notes": list(self.notes),
        }


# ------------------------------------------------------------------ per-PE budgets


def layer_weight_bytes(config, grid: int, phase: str, dtype: str = "fp16") -> int:
    """Bytes per PE of one transformer layer's weights on a grid x grid region."""
    b = DTYPE_BYTES[dtype]
    E, F = config.hidden_size, config.intermediate_size
    hl = HeadLayout(config.num_heads, config.num_kv_heads, config.head_dim, grid)
    e, f = cdiv(E, grid), cdiv(F, grid)
    qt, kt = hl.q_padded // grid, hl.tf
    if phase == "prefill":
        elems = e * qt + 2 * e * kt + qt * e + 2 * e * f + f * e + 2 * e
    else:
        elems = e * (qt + 2 * kt) + qt * e + e * 2 * f + f * e + 2 * e
    if config.qkv_bias:
        elems += qt + 2 * kt
    return elems * b


def kv_bytes_per_slot(config, grid: int, dtype: str = "fp16") -> int:
    """Bytes one cached token of one layer takes on a PE (its K and V feature block)."""
    hl = HeadLayout(config.num_heads, config.num_kv_heads, config.head_dim, grid)
    return 2 * hl.tf * DTYPE_BYTES[dtype]


def activation_bytes(config, grid: int, phase: str, seq_len: int, dtype: str = "fp16", heads_per_pass: int = 1) -> int:
    """Peak bytes per PE of activations and buffers during one layer (with double buffers).

    Prefill attention processes ``heads_per_pass`` kv heads (with their query heads) at a
    time: its score tiles are what limits long prompts.
    """
    b = DTYPE_BYTES[dtype]
    E, F = config.hidden_size, config.intermediate_size
    hl = HeadLayout(config.num_heads, config.num_kv_heads, config.head_dim, grid)
    e, f = cdiv(E, grid), cdiv(F, grid)
    qt = hl.q_padded // grid
    if phase == "prefill":
        t = cdiv(seq_len, grid)
        hidden = 4 * t * e * b + t * e * 4  # residual, normed, skewed A + its double buffer, accumulator
        qkv = t * (qt + 2 * hl.tf) * b + t * qt * 4  # q, k, v and the fp32 accumulator of the largest
        heads = heads_per_pass * hl.group
        scores = heads * t * t * (4 + 4 + 2 * b)  # partial, S, P and P's double buffer
        ffn = 2 * t * f * b + t * f * 4
        in_flight = max(e * f, e * qt) * b  # MeshGEMM's next weight tile (double buffer)
        return hidden + qkv + max(scores + t * qt * 4, ffn) + in_flight + 1024
    cap = cdiv(seq_len, grid)
    vec = 6 * e * 4 + 3 * (qt + 2 * hl.tf) * 4
    scores = 4 * config.num_heads * cap * 4
    ffn = 4 * 2 * f * 4
    return vec + max(scores, ffn) + 1024


def lm_head_bytes(config, grid: int, vocab: int, dtype: str = "fp16") -> int:
    return cdiv(config.hidden_size, grid) * cdiv(vocab, grid) * DTYPE_BYTES[dtype] + 2 * cdiv(vocab, grid) * 4


# ------------------------------------------------------------------ region tiling


def region_slots(wafer: WaferSpec, grid: int, phase: str) -> list[Region]:
    """Square regions of grid x grid over the wafer, row-major, skipping any with a defective PE."""
    if grid < 1 or grid > min(wafer.rows, wafer.cols):
        raise PlacementError(
            f"{phase} grid {grid} does not fit the {wafer.rows}x{wafer.cols} mesh of {wafer.name} "
            f"(largest square: {min(wafer.rows, wafer.cols)})"
        )
    out = []
    for r in range(wafer.rows // grid):
        for c in range(wafer.cols // grid):
            try:
                out.append(Region(wafer, grid, grid, r * grid, c * grid, name=f"{phase}[{len(out)}]"))
            except MeshError:
                continue
    return out


def plan_phase(config, wafer: WaferSpec, grid: int, phase: str, seq_len: int, dtype: str = "fp16",
               layers: int | None = None, suggest: bool = True) -> PhasePlan:
    """Regions for one phase: the fewest grid x grid regions that hold every layer.

    Each region holds a run of consecutive layers plus a vocabulary slice of the LM head
    (and of the embedding table when it is not tied), so the LM head runs on all regions
    at once. ``layers`` < num_layers plans only the first ``layers`` (extrapolation).
    """
    n_layers = config.num_layers if layers is None else layers
    # plan with some slack for the small buffers the estimate leaves out; the runtime
    # SRAM accounting checks every real allocation anyway
    usable = wafer.usable_sram_bytes_per_pe - PLANNING_SLACK
    slots = region_slots(wafer, grid, phase)
    w_layer = layer_weight_bytes(config, grid, phase, dtype)
    kv_layer = kv_bytes_per_slot(config, grid, dtype) * cdiv(seq_len, grid)
    tables = 1 if config.tie_word_embeddings else 2

    full_layers = config.num_layers
    extrapolating = n_layers < full_layers

    def usage(n_regions: int, hpp: int, n_layers: int = n_layers) -> dict[str, int]:
        lpr = cdiv(n_layers, n_regions)
        act = activation_bytes(config, grid, phase, seq_len, dtype, hpp)
        if phase == "prefill":
            # the LM head's MeshGEMM (after the layers): the placed vocabulary tile stays the
            # operand of record while the tile in use and the next one arriving are held
            # too (2 more), plus the fp32 accumulator and the normalised rows
            b, t, vt = DTYPE_BYTES[dtype], cdiv(seq_len, grid), cdiv(cdiv(config.vocab_size, n_regions), grid)
            e = cdiv(config.hidden_size, grid)
            act = max(act, 2 * e * vt * b + t * vt * 4 + 4 * t * e * b + 1024)
        return {
            "weights": lpr * w_layer,
            "kv_cache": lpr * kv_layer,
            "activations": act,
            "vocab_tables": tables * lm_head_bytes(config, grid, cdiv(config.vocab_size, n_regions), dtype),
        }

    chosen = None
    # a run of K extrapolated layers may spread its vocabulary slices over more regions
    # than it has layers, as the whole model would
    max_regions = min(len(slots), full_layers if extrapolating else n_layers)
    for n_regions in range(1, max_regions + 1):
        if sum(usage(n_regions, 1).values()) <= usable:
            chosen = n_regions
            break
    if chosen is None:
        spread = min(len(slots), n_layers) or 1
        best = usage(spread, 1)
        total = sum(best.values())
        fit = None
        if suggest:
            fit = next((g for g in range(grid + 1, min(wafer.rows, wafer.cols) + 1, max(1, grid // 16))
                        if _fits(config, wafer, g, phase, seq_len, dtype, n_layers)), None)
        raise PlacementError(
            f"{config.name} does not fit {wafer.name} for {phase} on {grid}x{grid} regions: even spread over "
            f"{spread} of the {len(slots)} such regions (at most one layer each) a PE needs {total:,} B ("
            + ", ".join(f"{k} {v:,}" for k, v in best.items())
            + f"), {total - usable:,} B over the {usable:,} B it may plan for ({wafer.usable_sram_bytes_per_pe:,} B "
            f"usable, {PLANNING_SLACK:,} B kept as slack for small buffers). "
            + (f"A {fit}x{fit} grid would fit. " if fit else "No square grid of this wafer fits it. ")
            + "Other options: a wafer with more SRAM per PE, shorter sequences, or --extrapolate-from-layers K."
        )
    # Extrapolating from K layers: give the executed layers the whole model's conditions,
    # not a nearly empty wafer's. The vocabulary is sliced over the regions the whole
    # model would use (all of them if it does not fit), and the attention pass width is
    # what a region holding the whole model's share of layers could afford.
    pressure_regions, pressure_layers = chosen, n_layers
    if extrapolating:
        full = next((r for r in range(1, min(len(slots), full_layers) + 1)
                     if sum(usage(r, 1, full_layers).values()) <= usable), None)
        pressure_regions, pressure_layers = (full or min(len(slots), full_layers)), full_layers
    hpp = 1
    if phase == "prefill":  # as many kv heads per attention pass as the SRAM allows
        while hpp < config.num_kv_heads and sum(usage(pressure_regions, hpp + 1, pressure_layers).values()) <= usable:
            hpp += 1
    lpr = cdiv(n_layers, chosen)
    n_regions = chosen  # the last regions may hold fewer layers (or only their vocabulary slice)
    if extrapolating:
        lpr = min(cdiv(full_layers, pressure_regions), n_layers)
        n_regions = max(pressure_regions, cdiv(n_layers, lpr))
        if n_regions > len(slots):
            raise PlacementError(f"{n_layers} layers at {lpr} per region need {n_regions} {grid}x{grid} regions; "
                                 f"{wafer.name} holds {len(slots)}")
    vstep = cdiv(config.vocab_size, n_regions)
    stages = [
        Stage("layers", slots[k], layers=range(k * lpr, min(n_layers, (k + 1) * lpr)),
              vocab=range(k * vstep, min(config.vocab_size, (k + 1) * vstep)))
        for k in range(n_regions)
    ]
    b = usage(n_regions, hpp) | {"reserved": wafer.reserved_bytes_per_pe, "usable": wafer.usable_sram_bytes_per_pe}
    pp = PhasePlan(phase, grid, stages, lpr, b, len(slots))
    pp.heads_per_pass = hpp
    return pp


def _fits(config, wafer, grid, phase, seq_len, dtype, n_layers) -> bool:
    try:
        plan_phase(config, wafer, grid, phase, seq_len, dtype, n_layers, suggest=False)
        return True
    except PlacementError:
        return False


def plan(config, wafer: WaferSpec, prefill_grid: int | None, decode_grid: int | None, max_seq_len: int,
         dtype: str = "fp16", prompt_len: int | None = None, layers: int | None = None) -> Plan:
    """Plan both phases (or one, when the other grid is None) for sequences up to ``max_seq_len``."""
    if max_seq_len < 1:
        raise PlacementError("max_seq_len must be positive")
    pre = dec = None
    if prefill_grid is not None:
        pre = plan_phase(config, wafer, prefill_grid, "prefill", prompt_len or max_seq_len, dtype, layers)
    shift_cap = concat_cap = 0
    if decode_grid is not None:
        dec = plan_phase(config, wafer, decode_grid, "decode", max_seq_len, dtype, layers)
        # KV capacity of the decode layout: what the fullest layer region can still hold
        usable = wafer.usable_sram_bytes_per_pe
        per_slot = kv_bytes_per_slot(config, decode_grid, dtype) * dec.layers_per_region
        free = usable - dec.bytes_per_pe["activations"] - dec.bytes_per_pe["weights"] - dec.bytes_per_pe["vocab_tables"]
        slots_per_pe = max(0, free // per_slot)
        shift_cap = slots_per_pe * decode_grid  # every row fills evenly
        concat_cap = slots_per_pe  # growth lands on one row of PEs
        if shift_cap < max_seq_len:
            raise PlacementError(
                f"the KV cache for {max_seq_len} tokens does not fit the {decode_grid}x{decode_grid} decode regions "
                f"(capacity {shift_cap} tokens with the shift-based cache)"
            )
    return Plan(config.name, wafer.name, dtype, max_seq_len, pre, dec, int(shift_cap), int(concat_cap), [])
