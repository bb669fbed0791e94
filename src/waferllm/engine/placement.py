"""Placement planning: which region of the wafer holds what, and whether it fits.

A phase (prefill or decode) runs on square regions of ``grid x grid`` PEs tiled over
the wafer. Layers form a pipeline of regions (for one request one region is busy at a
time); the LM head (and, for untied models, the embedding table) get regions of their
own, split by vocabulary when one region cannot hold them. Per-PE SRAM is budgeted for
weights, KV cache, activations and buffers; the runtime's SRAM accounting then checks
every allocation for real.

Prefill attention runs in passes of kv heads; the planner gives each pass as many heads as
the SRAM left beside a region's layers allows. With the streaming attention a pass's score
tiles hold one key block of the heads of a PE's own features, so passes widen at little
SRAM; where fewer layers per region (so more regions, or fuller small ones) would still
widen them, the planner predicts each option's prefill time by running its layers
shape-only and keeps the fastest.

Decode budgets the KV cache and attention's score tiles (the kernel's own tiles, see
:func:`decode_scores_bytes_per_slot`) over the cache slots of a region's fullest PE row:
the shift-based cache fills the rows evenly; the concatenation cache spreads the prompt
over them at the transition and puts every generated token on the bottom row
(:func:`decode_row_slots`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from waferllm.engine.layouts import HeadLayout
from waferllm.errors import MeshError, PlacementError
from waferllm.hardware.defects import reroute_fit
from waferllm.hardware.plmr import DTYPE_BYTES, WaferSpec
from waferllm.kernels.flash_attention import slots_per_column
from waferllm.mesh.region import Region
from waferllm.mesh.tensor import QUANT_BITS
from waferllm.models import quant

PHASES = ("prefill", "decode")
PLANNING_SLACK = 2048  # bytes per PE


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Stage:
    """A region of a phase: a run of layers plus a vocabulary slice of the LM head / embedding.
    In a cluster, ``wafer`` is the index of the wafer the region is on and ``heads_per_pass``
    (when > 0) that wafer's own prefill attention passes."""

    region: Region
    layers: range = range(0)
    vocab: range = range(0)
    wafer: int = 0
    heads_per_pass: int = 0

    def to_dict(self) -> dict:
        d = {"region": self.region.describe()}
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
    region_bytes: list = field(default_factory=list)  # bytes per PE by kind, for each stage
    # layers each stage's region holds in the whole model (== its layers unless extrapolating);
    # region_bytes and bytes_per_pe budget these
    layer_share: list[int] = field(default_factory=list)
    whole_model_fits: bool = True  # False: extrapolating a model these regions cannot hold
    seq_len: int = 0  # tokens planned for (prefill: the prompt; decode: the whole context)
    dtype: str = "fp16"
    weights: str = "fp16"  # the layers' matrices: dense in dtype, or int8 / int4 blocks
    attention: str = "paper"  # prefill attention the passes were planned for ("paper" or "streaming")
    # decode of a batch: rows of the largest micro-batch a region runs at once, and the longest
    # request (attention runs request by request over its own cache); None: seq_len
    rows: int = 1
    request_len: int | None = None
    queries: int = 1  # tokens of one request attending at once (a verification pass)
    # decode: the cache scheme the budget fills rows by, and the requests' prompt (None: any
    # length); see decode_row_slots
    kv_scheme: str = "shift"
    prompt_len: int | None = None
    weighed: list = field(default_factory=list)  # streaming: every layout weighed (see _weigh_passes)

    def to_dict(self) -> dict:
        return {
            "grid": self.grid,
            "regions": len(self.stages),
            "region_sides": [s.region.rows for s in self.stages],
            "regions_available": self.regions_available,
            "layers_per_region": self.layers_per_region,
            "layer_share": list(self.layer_share),
            "whole_model_fits": self.whole_model_fits,
            "heads_per_pass": self.heads_per_pass,
            "attention": self.attention,
            "batch_rows": self.rows,
            "bytes_per_pe": dict(self.bytes_per_pe),
            "stages": [s.to_dict() for s in self.stages],
        } | ({"weighed": [dict(w) for w in self.weighed]} if self.weighed else {})


@dataclass
class Plan:
    model: str
    wafer: str
    dtype: str
    max_seq_len: int
    prefill: PhasePlan | None
    decode: PhasePlan | None
    kv_capacity_tokens: int  # planned (see planned_kv_capacity)
    kv_capacity_tokens_concat: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "wafer": self.wafer, "dtype": self.dtype, "max_seq_len": self.max_seq_len,
            "prefill": self.prefill.to_dict() if self.prefill else None,
            "decode": self.decode.to_dict() if self.decode else None,
            "planned_kv_capacity_tokens": self.kv_capacity_tokens,
            "planned_kv_capacity_tokens_concat": self.kv_capacity_tokens_concat, "notes": list(self.notes),
        }


# ------------------------------------------------------------------ per-PE budgets


def layer_weight_bytes(config, grid: int, phase: str, dtype: str = "fp16", weights: str = "fp16") -> int:
    """Bytes per PE of one transformer layer's weights on a grid x grid region (``weights``
    int8 / int4: the matrices as stored, see :func:`quantized_layer_bytes`)."""
    if weights in QUANT_BITS:
        return quantized_layer_bytes(config, grid, phase, weights)
    b = DTYPE_BYTES[dtype]
    E, F = config.hidden_size, config.intermediate_size
    hl = HeadLayout(config.num_heads, config.num_kv_heads, config.head_dim, grid)
    e, f = cdiv(E, grid), cdiv(F, grid)
    qt, kt = hl.q_padded // grid, hl.col_features
    if phase == "prefill":
        elems = e * qt + 2 * e * kt + qt * e + 2 * e * f + f * e + 2 * e
    else:
        elems = e * (qt + 2 * kt) + qt * e + e * 2 * f + f * e + 2 * e
    if config.qkv_bias:
        elems += qt + 2 * kt
    # the norms' weights and the biases count at the weights' dtype: the runtime holds them
    # in fp32, and PLANNING_SLACK covers the difference (a few dozen bytes per layer)
    return elems * b


def layer_matrices(config, grid: int, phase: str) -> dict[str, tuple[np.ndarray, int, int]]:
    """Each matrix of one layer as a grid x grid region's placement lays it out (see
    ``DecodeStage._place_layer`` / ``PrefillStage._place_layer``): name -> (input-dim index of
    every placed row, -1 for padding; rows and columns of a PE's tile). Every layer of a
    region asks: the index maps are built once per shape (read-only)."""
    c = config
    return dict(_layer_matrices(c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size, grid,
                                phase))


@lru_cache(maxsize=256)
def _layer_matrices(heads: int, kv_heads: int, head_dim: int, E: int, F: int, grid: int, phase: str) -> dict:
    out = _matrices(heads, kv_heads, head_dim, E, F, grid, phase)
    for rows, _, _ in out.values():
        rows.setflags(write=False)
    return out


def _matrices(heads: int, kv_heads: int, head_dim: int, E: int, F: int, grid: int, phase: str) -> dict:
    hl = HeadLayout(heads, kv_heads, head_dim, grid)
    e, f = cdiv(E, grid), cdiv(F, grid)
    e_rows = np.arange(E)
    if phase == "decode":
        fcols = np.where(np.arange(f * grid) < F, np.arange(f * grid), -1)
        r, width = hl.group, hl.col_features
        return {"qkv": (e_rows, e, (r + 2) * width), "o": (hl.q_cols.copy(), r * width, e),
                "gate_up": (e_rows, e, 2 * f), "down": (fcols, f, e)}
    qt = hl.q_padded // grid
    return {"q": (e_rows, e, qt), "k": (e_rows, e, hl.col_features), "v": (e_rows, e, hl.col_features),
            "o": (hl.q_cols.copy(), qt, e), "gate": (e_rows, e, f), "up": (e_rows, e, f), "down": (np.arange(F), f, e)}


def quantized_layer_bytes(config, grid: int, phase: str, fmt: str) -> int:
    """Bytes per PE of one layer's weights with its matrices stored as ``fmt`` blocks: every
    matrix tile's packed integers and the fp16 block scales its rows touch, per column
    (:func:`waferllm.models.quant.scale_slots`); the norms and biases in fp32, as held."""
    total = 0
    for rows, tk, tn in layer_matrices(config, grid, phase).values():
        total += quant.tile_bytes(fmt, tk, tn, quant.scale_slots(rows, tk))
    hl = HeadLayout(config.num_heads, config.num_kv_heads, config.head_dim, grid)
    total += 2 * cdiv(config.hidden_size, grid) * DTYPE_BYTES["fp32"]
    if config.qkv_bias:
        total += (hl.q_padded // grid + 2 * hl.col_features) * DTYPE_BYTES["fp32"]
    return total


def kv_bytes_per_slot(config, grid: int, dtype: str = "fp16") -> int:
    """Bytes one cached token of one layer takes on a PE (its K and V feature block)."""
    hl = HeadLayout(config.num_heads, config.num_kv_heads, config.head_dim, grid)
    return 2 * hl.col_features * DTYPE_BYTES[dtype]


#: fp32 score tiles decode attention holds at once (``kernels.decode_attention``): the partial
#: scores (``qk_gemv``) while their sum over the head's columns (``qk_allreduce``) arrives; then
#: each softmax step's input while its output is written (scaled, exponentials, normalised),
#: the statistics beside them being one value per head row, not per slot. The fused path's
#: softmax (``_flash_softmax_pv``) frees each input as soon as its output exists, likewise.
DECODE_SCORE_TILES = 2


def decode_score_tile_bytes_per_slot(config) -> int:
    """Bytes per cache slot of one decode score tile on a PE: the kernel's tile is
    [num_kv_heads, r, slots] fp32 (every kv head's r query heads, whichever heads the PE's
    own features belong to), r the query heads sharing a kv head (``HeadLayout.group``)."""
    hl = HeadLayout(config.num_heads, config.num_kv_heads, config.head_dim, 1)
    return hl.num_kv_heads * hl.group * DTYPE_BYTES["fp32"]


def decode_scores_bytes_per_slot(config) -> int:
    """The planner's budget per cache slot attention scans for decode attention's score
    tiles: the most tiles the kernel keeps at once (:data:`DECODE_SCORE_TILES`), each of
    :func:`decode_score_tile_bytes_per_slot`. Its working set grows with the slots of the
    fullest row like the cache itself. A run measures what attention really keeps
    (``engine.capacity``)."""
    return DECODE_SCORE_TILES * decode_score_tile_bytes_per_slot(config)


def concat_bottom_slots(request_len: int, prompt_len: int | None, grid: int) -> int:
    """Slots the concatenation cache's bottom row holds at most for one request of
    ``request_len`` tokens on a grid x grid region: the prompt's share when its
    ``prompt_len`` tokens are spread over the rows at the transition (the bottom rows take
    the extra ones), then every generated token. With no ``prompt_len`` (prompts of any
    length) the worst case: the whole context on the bottom row."""
    if prompt_len is None:
        return request_len
    p = min(prompt_len, request_len)
    return cdiv(p, grid) + request_len - p


def decode_row_slots(seq_len: int, grid: int, kv_scheme: str = "shift", prompt_len: int | None = None,
                     request_len: int | None = None) -> tuple[int, int]:
    """(cache slots on a grid x grid decode region's fullest row, slots one request's
    attention scans there) for a KV pool of ``seq_len`` tokens shared by requests of at most
    ``request_len`` (default ``seq_len``: one request). The shift-based cache fills the rows
    evenly; the concatenation cache puts each request's growth on the bottom row
    (:func:`concat_bottom_slots`), where attention's score tiles span that row's slots."""
    req = request_len or seq_len
    if kv_scheme == "concat":
        per = concat_bottom_slots(req, prompt_len, grid)
        return per * cdiv(seq_len, req), per
    return cdiv(seq_len, grid), cdiv(req, grid)


def activation_bytes(config, grid: int, phase: str, seq_len: int, dtype: str = "fp16", heads_per_pass: int = 1,
                     attention: str = "paper", rows: int = 1, request_len: int | None = None,
                     slots: int | None = None, queries: int = 1) -> int:
    """Peak bytes per PE of activations and buffers during one layer (with double buffers).

    Prefill attention processes ``heads_per_pass`` kv heads (with their query heads) at a
    time: its score tiles are what limits long prompts (``attention``: see
    :func:`streaming_attention_bytes` for the streaming kernel's). Decode of a batch holds
    ``rows`` tokens' vectors at once, and one request's score tiles at a time, over the
    ``slots`` its attention scans on a PE row (default: ``request_len`` tokens, or
    ``seq_len``, spread evenly over the rows; see :func:`decode_row_slots`); a verification
    pass's ``queries`` tokens of one request attend at once, their score tiles side by side.
    """
    b = DTYPE_BYTES[dtype]
    E, F = config.hidden_size, config.intermediate_size
    hl = HeadLayout(config.num_heads, config.num_kv_heads, config.head_dim, grid)
    e, f = cdiv(E, grid), cdiv(F, grid)
    qt = hl.q_padded // grid
    if phase == "prefill":
        t = cdiv(seq_len, grid)
        hidden = 4 * t * e * b + t * e * 4  # residual, normed, skewed A + its double buffer, accumulator
        qkv = t * (qt + 2 * hl.col_features) * b + t * qt * 4  # q, k, v and the fp32 accumulator of the largest
        heads = heads_per_pass * hl.group
        scores = heads * t * t * (4 + 4 + 2 * b)  # partial, S, P and P's double buffer
        attn = scores + t * qt * 4  # and the fp32 output
        if attention == "streaming":
            attn = streaming_attention_bytes(config, grid, seq_len, dtype, heads_per_pass)
        ffn = 2 * t * f * b + t * f * 4
        in_flight = max(e * f, e * qt) * b  # MeshGEMM's next weight tile (double buffer)
        return hidden + qkv + max(attn, ffn) + in_flight + 1024
    cap = cdiv(request_len or seq_len, grid) if slots is None else slots
    vec = 6 * e * 4 + 3 * (qt + 2 * hl.col_features) * 4
    scores = decode_scores_bytes_per_slot(config) * cap * queries
    ffn = 4 * 2 * f * 4
    return rows * vec + max(scores, rows * ffn) + 1024


def streaming_attention_bytes(config, grid: int, seq_len: int, dtype: str = "fp16", heads_per_pass: int = 1) -> int:
    """Peak bytes per PE the streaming attention kernel adds beside q, k and v
    (:mod:`waferllm.kernels.flash_attention`). With S a score tile (one key block of the G
    heads of a pass that a column holds, fp32), st one running statistic and O the fp32
    output, its program points peak at 2 S + O + 4 st (a block's sum being taken while the
    next block's scores are summed) or 2 S + O + 2 st and a K tile arriving."""
    hl = HeadLayout(config.num_heads, config.num_kv_heads, config.head_dim, grid)
    t = cdiv(seq_len, grid)
    g = _slots(hl, heads_per_pass)
    s_tile, stat, out = g * hl.group * t * t * 4, g * hl.group * t * 4, t * hl.group * hl.col_features * 4
    kv = t * hl.col_features * DTYPE_BYTES[dtype]
    return 2 * s_tile + out + max(4 * stat, 2 * stat + kv)


@lru_cache(maxsize=4096)
def _slots(hl: HeadLayout, heads_per_pass: int) -> int:
    """Heads of one pass a PE column holds at most (the planner asks for the same few often)."""
    return slots_per_column(hl.head_of_pos, heads_per_pass)


def lm_head_bytes(config, grid: int, vocab: int, dtype: str = "fp16") -> int:
    return cdiv(config.hidden_size, grid) * cdiv(vocab, grid) * DTYPE_BYTES[dtype] + 2 * cdiv(vocab, grid) * 4


# ------------------------------------------------------------------ region tiling


def _squares(wafer, r0: int, c0: int, h: int, w: int, min_side: int) -> list[tuple[int, int, int]]:
    """Largest squares first, greedily tiling an h x w rectangle at (r0, c0): (row, col, side)."""
    if min(h, w) < min_side:
        return []
    side = min(h, w)
    count = max(h, w) // side
    out = [(r0 + (i * side if h > w else 0), c0 + (i * side if h <= w else 0), side) for i in range(count)]
    used = count * side
    if h > w:
        return out + _squares(wafer, r0 + used, c0, h - used, w, min_side)
    return out + _squares(wafer, r0, c0 + used, h, w - used, min_side)


def region_slots(wafer: WaferSpec, grid: int, phase: str, fill: bool = True) -> list[Region]:
    """Square regions for a phase: grid x grid ones first (row-major), then, with ``fill``,
    the largest squares that fit in the strips they leave (a 750x994 mesh at grid 360 has
    four 360s and 30% of its PEs in the strips). Defective PEs (see the wafer's
    ``defect_recovery``): ``avoid`` skips squares with one; ``spare`` sees a perfect mesh;
    ``reroute`` widens each square to the columns its rows need to skip theirs."""
    # the planner asks for the same slots over and over while tuning (regions are values)
    return list(_region_slots(wafer, grid, phase, fill))


@lru_cache(maxsize=256)
def _region_slots(wafer: WaferSpec, grid: int, phase: str, fill: bool) -> tuple[Region, ...]:
    return tuple(_build_region_slots(wafer, grid, phase, fill))


def _build_region_slots(wafer: WaferSpec, grid: int, phase: str, fill: bool) -> list[Region]:
    if grid < 1 or grid > min(wafer.rows, wafer.cols):
        raise PlacementError(
            f"{phase} grid {grid} does not fit the {wafer.rows}x{wafer.cols} mesh of {wafer.name} "
            f"(largest square: {min(wafer.rows, wafer.cols)})"
        )
    nr, nc = wafer.rows // grid, wafer.cols // grid
    squares = [(r * grid, c * grid, grid) for r in range(nr) for c in range(nc)]
    min_side = max(8, grid // 4)
    if fill:
        squares += _squares(wafer, 0, nc * grid, wafer.rows, wafer.cols - nc * grid, min_side)
        squares += _squares(wafer, nr * grid, 0, wafer.rows - nr * grid, nc * grid, min_side)
    if wafer.defect_recovery == "reroute" and wafer.defective_pes:
        # fault-aware placement: each square spans the columns its rows need to skip their defects
        return [Region(wafer, side, side, r, c, name=f"{phase}[{i}]", span=span) for i, (r, c, side, span) in
                enumerate(reroute_fit(wafer, squares, min(min_side, grid)))]
    out = []
    for r, c, side in squares:
        try:
            out.append(Region.inside(wafer, side, side, r, c, f"{phase}[{len(out)}]"))
        except MeshError:
            continue
    return out


def _split(total: int, weights: list[int]) -> list[int]:
    """Integer shares of ``total`` proportional to ``weights`` (largest remainders)."""
    wsum = sum(weights)
    raw = [total * w / wsum for w in weights]
    out = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: out[i] - raw[i])[: total - sum(out)]:
        out[i] += 1
    return out


class PhaseBudget:
    """Per-PE SRAM needs of one phase on square regions, and how many layers a region takes.

    ``need`` budgets a region holding ``layers`` layers and a ``vocab``-entry slice of the
    vocabulary tables; the planner keeps some slack under the usable SRAM for the small
    buffers the estimate leaves out (the runtime SRAM accounting checks every real
    allocation anyway).
    """

    def __init__(self, config, wafer: WaferSpec, phase: str, seq_len: int, dtype: str = "fp16",
                 vocab_size: int | None = None, weights: str = "fp16", attention: str = "paper", rows: int = 1,
                 request_len: int | None = None, kv_scheme: str = "shift", prompt_len: int | None = None,
                 queries: int = 1):
        self.config = config
        # vocabulary entries the regions hold (a cluster's wafers without the tables: 0)
        self.vocab_size = config.vocab_size if vocab_size is None else vocab_size
        self.wafer = wafer
        self.phase = phase
        self.seq_len = seq_len
        self.dtype = dtype
        self.weights = weights
        self.attention = attention if phase == "prefill" else "paper"
        self.rows, self.request_len = rows, request_len  # decode of a batch (see activation_bytes)
        self.queries = queries  # ... and of a verification pass's tokens
        # decode: how the cache fills its rows, and the requests' prompt (see decode_row_slots)
        self.kv_scheme, self.prompt_len = kv_scheme, prompt_len
        self.usable = wafer.usable_sram_bytes_per_pe - PLANNING_SLACK
        self.tables = 1 if config.tie_word_embeddings else 2
        self.pass_heads = 1  # the attention pass the layer capacities leave room for
        self._caps: dict[tuple[int, int], int] = {}

    def sized_for(self, heads_per_pass: int) -> "PhaseBudget":
        """This budget with layer capacities that leave room for passes of ``heads_per_pass``
        kv heads (fewer layers per region, wider passes)."""
        out = copy.copy(self)
        out.pass_heads, out._caps = heads_per_pass, {}
        return out

    def need(self, g: int, layers: int, vocab: int, heads_per_pass: int | None = None) -> dict[str, int]:
        """Bytes per PE by kind on a g x g region (passes of ``heads_per_pass`` kv heads; default
        what the budget is sized for)."""
        config, phase, dtype, seq_len = self.config, self.phase, self.dtype, self.seq_len
        heads_per_pass = self.pass_heads if heads_per_pass is None else heads_per_pass
        cached, scanned = self.slots(g)
        act = activation_bytes(config, g, phase, seq_len, dtype, heads_per_pass, self.attention, self.rows,
                               self.request_len, scanned, self.queries)
        if phase == "prefill":
            # the LM head's MeshGEMM (after the layers): the placed vocabulary tile, the one
            # in use and the next one arriving, the fp32 accumulator and the normalised rows
            b, t, vt = DTYPE_BYTES[dtype], cdiv(seq_len, g), cdiv(vocab, g)
            e = cdiv(config.hidden_size, g)
            act = max(act, 2 * e * vt * b + t * vt * 4 + 4 * t * e * b + 1024)
        return {
            "weights": layers * layer_weight_bytes(config, g, phase, dtype, self.weights),
            "kv_cache": layers * kv_bytes_per_slot(config, g, dtype) * cached,
            "activations": act,
            "vocab_tables": self.tables * lm_head_bytes(config, g, vocab, dtype),
        }

    def slots(self, g: int) -> tuple[int, int]:
        """(cache slots on the fullest PE row, slots one request's attention scans) on a g x g
        region: prefill, the prompt's tokens over the rows (scanned by its own attention
        passes, budgeted apart); decode, see :func:`decode_row_slots`."""
        if self.phase == "prefill":
            return cdiv(self.seq_len, g), cdiv(self.seq_len, g)
        return decode_row_slots(self.seq_len, g, self.kv_scheme, self.prompt_len, self.request_len)

    def fits(self, g: int, layers: int, vocab: int, heads_per_pass: int | None = None) -> bool:
        return sum(self.need(g, layers, vocab, heads_per_pass).values()) <= self.usable

    def capacity(self, g: int, vocab: int) -> int:
        """Layers a g x g region holding this vocabulary slice can take (-1: not even the slice)."""
        key = (g, vocab)
        if key not in self._caps:
            base = sum(self.need(g, 0, vocab).values())
            per = sum(self.need(g, 1, vocab).values()) - base
            self._caps[key] = -1 if base > self.usable else int((self.usable - base) // per)
        return self._caps[key]

    def capacities(self, regs: list[Region]) -> tuple[list[int], list[int]]:
        """The vocabulary split over ``regs`` (by PEs) and the layers each region can take."""
        vocab = _split(self.vocab_size, [r.pes for r in regs])
        return vocab, [self.capacity(r.rows, v) for r, v in zip(regs, vocab)]


def _assign(budget: PhaseBudget, regs: list[Region], total_layers: int) -> tuple[list[int], list[int]] | None:
    """(vocabulary slice, layer count) per region holding ``total_layers``, or None if they do not fit.

    Layers are spread in proportion to what each region can take, then topped up where
    there is room."""
    vocab, caps = budget.capacities(regs)
    if min(caps) < 0 or sum(caps) < total_layers:
        return None
    return vocab, fill_by_capacity(total_layers, caps)


def fill_by_capacity(total: int, caps: list[int]) -> list[int]:
    """``total`` items over holders of capacities ``caps`` (their sum at least ``total``):
    in proportion to the capacities, capped by them, then topped up in order where there is room."""
    usable = [max(c, 0) for c in caps]
    counts = [min(c, x) for c, x in zip(caps, _split(total, usable))] if sum(usable) else [0] * len(caps)
    short = total - sum(counts)
    for i, c in enumerate(caps):
        take = min(short, c - counts[i])
        counts[i] += take
        short -= take
    return counts


def _drop_idle_slots(budget: PhaseBudget, slots: list[Region]) -> list[Region]:
    """Keep only regions that can take at least one layer beside their vocabulary share
    (tiny squares in the strips may not); drop and re-split until that holds. When none
    can, the first region stays (the does-not-fit error reports on it)."""
    while slots:
        _, caps = budget.capacities(slots)
        keep = [r for r, c in zip(slots, caps) if c >= 1]
        if len(keep) == len(slots) or not keep:
            return slots if keep else slots[:1]
        slots = keep
    return slots


def _fewest_regions(budget: PhaseBudget, slots: list[Region], total_layers: int):
    """(n, (vocab, counts)) for the fewest leading ``slots`` that hold the layers, or None.

    More regions only add room (and shrink the vocabulary slices), so a binary search
    over the count finds it."""
    if _assign(budget, slots, total_layers) is None:
        return None
    lo, hi = 1, len(slots)
    while lo < hi:
        mid = (lo + hi) // 2
        if _assign(budget, slots[:mid], total_layers) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo, _assign(budget, slots[:lo], total_layers)


def _no_regions(wafer: WaferSpec, grid: int, phase: str) -> PlacementError:
    """The error for a grid none of whose squares is free of defective PEs (recovery ``avoid``),
    with the largest grid that has such squares (its regions checked, not the model's fit)."""
    free = next((g for g in range(grid - 1, 0, -1) if region_slots(wafer, g, phase, fill=False)), None)
    advice = (f"a {free}x{free} grid has squares free of them" if free else "no grid has a square free of them")
    return PlacementError(
        f"no {grid}x{grid} {phase} region of {wafer.name} is free of defective PEs ({len(wafer.defective_pes):,} "
        f"of them, recovery '{wafer.defect_recovery}' skips every square holding one): {advice}; or recovery "
        "'spare' (the hardware's spare rows and columns) or 'reroute' (regions route around them)",
        phase=phase, grid=grid, fit_grid=None, detail=f"no defect-free {grid}x{grid} region")


def _does_not_fit(budget: PhaseBudget, slots: list[Region], grid: int, n_layers: int,
                  suggest: bool, all_slots: list[Region] | None = None) -> PlacementError:
    """The error for a model whose layers the regions cannot hold: by how much, and what would
    fit. A suggested grid is planned before it is offered (with its KV cache, for decode);
    ``error.context`` carries ``phase``, ``grid``, ``fit_grid`` (or None), ``seq_len`` and
    ``detail`` (the message without the advice, for callers that word their own). With the
    concatenation cache the advice also names, each planned, the longest request that fits
    these regions with it (``context["longest"]``) and whether the shift-based cache would."""
    config, wafer, phase = budget.config, budget.wafer, budget.phase
    all_slots = all_slots or slots
    vocab, caps = budget.capacities(slots)
    held = sum(max(0, c) for c in caps)
    one = budget.need(grid, 1, vocab[0])
    fixed = one["activations"] + one["vocab_tables"]
    what = "prompt tokens" if phase == "prefill" else "tokens of context"
    concat = phase == "decode" and budget.kv_scheme == "concat"
    cached, scanned = budget.slots(grid)
    kv_for = f"KV cache {one['kv_cache']:,} for {budget.seq_len} tokens"
    if concat:
        kv_for = (f"KV cache {one['kv_cache']:,} for the {cached} slots of the concatenation cache's bottom row: "
                  f"{_concat_fill(budget, grid)}")
    act_for = f"with attention's score tiles over those {scanned} slots" if concat else f"for {budget.seq_len} {what}"
    detail = (
        f"{config.name} does not fit {wafer.name} for {phase} on {grid}x{grid} regions: all {len(all_slots):,} regions "
        f"({grid}x{grid} and the smaller squares around them, {sum(r.pes for r in all_slots):,} PEs) hold "
        f"{held} of its {n_layers} layers, {n_layers - held} short. On a {grid}x{grid} region a layer takes "
        f"{one['weights'] + one['kv_cache']:,} B per PE (weights {one['weights']:,}, {kv_for}) beside activations "
        f"{one['activations']:,} B ({act_for}) and vocabulary slices {one['vocab_tables']:,} B, of the "
        f"{budget.usable:,} B it may plan for "
        f"({wafer.usable_sram_bytes_per_pe:,} B usable, {PLANNING_SLACK:,} B kept as slack)"
        + (": the activations and vocabulary slices alone take more, so no region can hold a layer." if fixed > budget.usable
           else ".")
    )
    if concat:
        scheme = _scheme_of(budget)
        seq = scheme.pop("request_len")
        fit = smallest_fitting_grid(config, wafer, phase, seq, budget.dtype, grid + 1, n_layers, weights=budget.weights,
                                    **scheme) if suggest else None
        longest = _longest_concat(config, wafer, grid, budget, n_layers) if suggest else None
        shift = suggest and phase_fits(config, wafer, grid, phase, seq, budget.dtype, n_layers, budget.weights,
                                       max_num_seqs=scheme["max_num_seqs"])
        advice = ((f" A {fit}x{fit} grid would fit it with the concatenation cache" if fit else
                   " No grid of this wafer fits it with the concatenation cache")
                  + (f"; on {grid}x{grid} regions a request of at most {longest} tokens in all does"
                     + (f" (the {budget.prompt_len}-token prompt and {longest - budget.prompt_len} generated)"
                        if budget.prompt_len else "") if longest else "")
                  + (f"; the shift-based cache (--kv-scheme shift) holds it on {grid}x{grid} regions" if shift else "")
                  + (" (checked by planning it)." if fit or longest or shift else ".")
                  + " Other options: a wafer with more SRAM per PE, or shorter sequences.")
        return PlacementError(detail + advice, phase=phase, grid=grid, fit_grid=fit, seq_len=seq, detail=detail,
                              longest=longest, shift_fits=bool(shift))
    fit = smallest_fitting_grid(config, wafer, phase, budget.seq_len, budget.dtype, grid + 1, n_layers,
                                weights=budget.weights, prefill_attention=budget.attention) if suggest else None
    advice = ((f" A {fit}x{fit} grid would fit (checked by planning it)." if fit else " No grid of this wafer fits it.")
              + " Other options: a wafer with more SRAM per PE, shorter sequences, or (for a prediction) "
                "--extrapolate-from-layers K.")
    return PlacementError(detail + advice, phase=phase, grid=grid, fit_grid=fit, seq_len=budget.seq_len, detail=detail)


def phase_fits(config, wafer: WaferSpec, grid: int, phase: str, seq_len: int, dtype: str = "fp16",
               layers: int | None = None, weights: str = "fp16", prefill_attention: str = "paper",
               max_num_seqs: int = 1, kv_scheme: str = "shift", prompt_len: int | None = None,
               verify_rows: int = 1) -> bool:
    """Whether ``phase`` plans on ``grid`` x ``grid`` regions for ``seq_len`` tokens (prefill: a
    prompt of that length; decode: ``max_num_seqs`` contexts of that length decoded together,
    their KV caches included, filled as ``kv_scheme`` does after prompts of ``prompt_len``
    tokens (None: any length; see :func:`decode_row_slots`), with verification passes of
    ``verify_rows`` tokens)."""
    try:
        if phase == "prefill":
            plan(config, wafer, grid, None, seq_len, dtype, prompt_len=seq_len, layers=layers, suggest=False,
                 weights=weights, prefill_attention=prefill_attention)
        else:
            plan(config, wafer, None, grid, seq_len * max_num_seqs, dtype, layers=layers, suggest=False,
                 weights=weights, max_num_seqs=max_num_seqs, request_len=seq_len, kv_scheme=kv_scheme,
                 prompt_len=prompt_len, verify_rows=verify_rows)
        return True
    except PlacementError:
        return False


def smallest_fitting_grid(config, wafer: WaferSpec, phase: str, seq_len: int, dtype: str = "fp16", lo: int = 1,
                          layers: int | None = None, weights: str = "fp16",
                          prefill_attention: str = "paper", max_num_seqs: int = 1, kv_scheme: str = "shift",
                          prompt_len: int | None = None, verify_rows: int = 1) -> int | None:
    """The smallest grid from ``lo`` up on which ``phase`` plans (see :func:`phase_fits`), or None.

    Grids are scanned in steps of about 1/16 of the grid (a few dozen plans up to a full
    wafer), then the last step is searched grid by grid; the answer is always one that was
    planned."""
    hi = min(wafer.rows, wafer.cols)
    prev, g = lo - 1, max(1, lo)
    scheme = dict(kv_scheme=kv_scheme, prompt_len=prompt_len, verify_rows=verify_rows)
    while g <= hi:
        if phase_fits(config, wafer, g, phase, seq_len, dtype, layers, weights, prefill_attention, max_num_seqs,
                      **scheme):
            for h in range(prev + 1, g):  # the smallest one in the last step
                if phase_fits(config, wafer, h, phase, seq_len, dtype, layers, weights, prefill_attention,
                              max_num_seqs, **scheme):
                    return h
            return g
        prev, g = g, g + max(1, g // 16)
    return None


def _extrapolated_layout(budget: PhaseBudget, slots: list[Region], found, n_layers: int):
    """(regions, vocab, counts, share) for running the first ``n_layers`` of a model.

    They get the whole model's conditions, not a nearly empty wafer's: the vocabulary
    sliced over the regions the whole model uses (all of them if it does not fit), and
    at most the whole model's layer ``share`` of each region, filled in order."""
    n = found[0] if found else len(slots)
    regs = slots[:n]
    vocab = _split(budget.vocab_size, [r.pes for r in regs])
    share = found[1][1] if found else [max(1, x) for x in _split(budget.config.num_layers, [r.pes for r in regs])]
    counts, left = [], n_layers
    for c in share:
        counts.append(min(c, left))
        left -= counts[-1]
    return regs, vocab, counts, list(share)


def _heads_per_pass(budget: PhaseBudget, regs: list[Region], share: list[int], vocab: list[int]) -> int:
    """Prefill: as many kv heads per attention pass as every region's SRAM allows with its
    layer ``share`` (decode: 1). The streaming attention takes the fewest passes that fit,
    each as narrow as that allows (:func:`_streaming_heads_per_pass`)."""
    hpp = 1
    if budget.phase != "prefill":
        return hpp
    if budget.attention == "streaming":
        return _streaming_heads_per_pass(budget, regs, share, vocab)
    num_kv = budget.config.num_kv_heads
    while hpp < num_kv and all(budget.fits(r.rows, p, v, hpp + 1) for r, p, v in zip(regs, share, vocab) if p):
        hpp += 1
    return hpp


def _streaming_heads_per_pass(budget: PhaseBudget, regs: list[Region], share: list[int], vocab: list[int]) -> int:
    """The fewest passes whose heads fit every region beside its layer ``share``, then the
    fewest heads per pass giving that many (a pass's time hangs on its steps, not its heads).

    A pass's score tiles grow only with the heads of its own that a column holds, so heads
    that add no bytes to a one-head pass are taken even where that one does not fit (a plan
    extrapolated from a model the regions cannot hold)."""
    num_kv = budget.config.num_kv_heads
    held = [(r.rows, p, v) for r, p, v in zip(regs, share, vocab) if p]

    def ok(hpp):
        return all(sum(budget.need(g, p, v, hpp).values()) <= max(budget.usable, sum(budget.need(g, p, v, 1).values()))
                   for g, p, v in held)

    for passes in range(1, num_kv + 1):
        narrowest = cdiv(num_kv, passes)
        for hpp in range(narrowest, num_kv + 1):
            if cdiv(num_kv, hpp) < passes:
                break  # wider ones give fewer passes: those did not fit
            if ok(hpp):
                return hpp
    return 1  # never reached: one head per pass is always ok


def _stages(regs: list[Region], counts: list[int], vocab: list[int]) -> list[Stage]:
    """Consecutive runs of layers and vocabulary slices, one per region."""
    stages, lstart, vstart = [], 0, 0
    for r, c, v in zip(regs, counts, vocab):
        stages.append(Stage(r, layers=range(lstart, lstart + c), vocab=range(vstart, vstart + v)))
        lstart += c
        vstart += v
    return stages


def _weigh_passes(budget: PhaseBudget, all_slots: list[Region], n_layers: int, regs: list[Region], vocab: list[int],
                  counts: list[int], hpp: int) -> tuple[list[Region], list[int], list[int], int, list[dict]]:
    """Streaming prefill: fewer layers per region leave more SRAM for wider passes, at the
    price of more regions (more stage transfers, smaller strip squares) or of fewer layers
    on the fullest ones. Beside the fewest regions (``regs``, passes of ``hpp`` heads), every
    narrower pass count is an option: the fewest regions whose layer capacities leave room
    for its heads. Each option's prefill is predicted by running its layers shape-only
    (:func:`waferllm.engine.prefill.predicted_cycles`) and the fastest kept (ties: the
    earlier, fewest regions first). Returns (regions, vocab, counts, heads per pass, every
    option weighed)."""
    num_kv = budget.config.num_kv_heads
    options, seen = [(regs, vocab, counts, hpp)], {(len(regs), tuple(counts), hpp)}
    for passes in range(1, cdiv(num_kv, hpp)):
        sized = budget.sized_for(cdiv(num_kv, passes))
        slots = _drop_idle_slots(sized, all_slots)
        found = _fewest_regions(sized, slots, n_layers)
        if found is None:
            continue
        n, (v_p, c_p) = found
        h_p = _heads_per_pass(budget, slots[:n], c_p, v_p)
        if cdiv(num_kv, h_p) < cdiv(num_kv, hpp) and (n, tuple(c_p), h_p) not in seen:
            seen.add((n, tuple(c_p), h_p))
            options.append((slots[:n], v_p, c_p, h_p))
    if len(options) == 1:
        return regs, vocab, counts, hpp, []
    from waferllm.engine.prefill import predicted_cycles  # the engine's own layer code, shapes only

    cfg, wafer, memo = budget.config, budget.wafer, {}
    seconds = [wafer.cycles_to_seconds(predicted_cycles(cfg, wafer, r, c, budget.seq_len, budget.dtype, budget.weights,
                                                         h, budget.attention, memo=memo))
               for r, _, c, h in options]
    best = min(range(len(options)), key=lambda i: (seconds[i], i))
    weighed = [{"regions": len(r), "layers_per_region": max(c), "heads_per_pass": h, "predicted_s": t}
               for (r, _, c, h), t in zip(options, seconds)]
    return (*options[best], weighed)


def plan_phase(config, wafer: WaferSpec, grid: int, phase: str, seq_len: int, dtype: str = "fp16",
               layers: int | None = None, suggest: bool = True, vocab_size: int | None = None,
               weights: str = "fp16", prefill_attention: str = "paper", rows: int = 1,
               request_len: int | None = None, kv_scheme: str = "shift", prompt_len: int | None = None,
               queries: int = 1) -> PhasePlan:
    """Regions for one phase: the fewest square regions that hold every layer.

    grid x grid regions come first; when they are not enough, smaller squares from the
    strips they leave join (each region has its own tiling). Each region holds a run of
    consecutive layers (as many as its SRAM allows, spread evenly) plus a vocabulary
    slice of the LM head (and of the embedding table when it is not tied) in proportion
    to its PEs, so the LM head runs on all regions at once. ``layers`` < num_layers plans
    only the first ``layers`` (extrapolation) under the whole model's conditions.
    ``vocab_size``: the vocabulary entries these regions hold (default all; a cluster's
    wafer without the vocabulary tables: 0). ``weights``: how the layers' matrices are
    stored (dense in ``dtype``, or int8 / int4 blocks at their stored size).
    ``prefill_attention``: the prefill attention the passes are sized for; with
    ``streaming``, layouts that leave room for wider passes are weighed too
    (:func:`_weigh_passes`). Decode of a batch: ``rows`` tokens per region at once, requests
    of at most ``request_len`` tokens in a KV pool of ``seq_len``. Decode's cache fills the
    rows as ``kv_scheme`` does: with ``concat`` each request's growth is budgeted on the
    bottom row, after its ``prompt_len`` prompt tokens were spread over the rows
    (:func:`decode_row_slots`).
    """
    n_layers = config.num_layers if layers is None else layers
    extrapolating = n_layers < config.num_layers
    budget = PhaseBudget(config, wafer, phase, seq_len, dtype, vocab_size, weights, prefill_attention, rows,
                         request_len, kv_scheme if phase == "decode" else "shift", prompt_len, queries)
    all_slots = region_slots(wafer, grid, phase)
    if not all_slots:
        raise _no_regions(wafer, grid, phase)
    slots = _drop_idle_slots(budget, all_slots)
    found = _fewest_regions(budget, slots, config.num_layers if extrapolating else n_layers)
    if extrapolating:
        regs, vocab, counts, share = _extrapolated_layout(budget, slots, found, n_layers)
    elif found is None:
        raise _does_not_fit(budget, slots, grid, n_layers, suggest, all_slots)
    else:
        n, (vocab, counts) = found
        regs, share = slots[:n], list(counts)
    hpp = _heads_per_pass(budget, regs, share, vocab)
    weighed = []
    if budget.attention == "streaming" and found is not None and not extrapolating:
        regs, vocab, counts, hpp, weighed = _weigh_passes(budget, all_slots, n_layers, regs, vocab, counts, hpp)
        share = list(counts)
    per_region = [budget.need(r.rows, c, v, hpp) for r, c, v in zip(regs, share, vocab)]
    fullest = max(range(len(regs)), key=lambda i: sum(per_region[i].values()))
    b = per_region[fullest] | {"reserved": wafer.reserved_bytes_per_pe, "usable": wafer.usable_sram_bytes_per_pe}
    pp = PhasePlan(phase, grid, _stages(regs, counts, vocab), max(counts), b, len(slots))
    pp.heads_per_pass = hpp
    pp.region_bytes = per_region
    pp.layer_share = share
    pp.whole_model_fits = found is not None
    pp.seq_len, pp.dtype, pp.weights = seq_len, dtype, weights
    pp.attention, pp.weighed = budget.attention, weighed
    pp.rows, pp.request_len, pp.queries = rows, request_len, queries
    pp.kv_scheme, pp.prompt_len = budget.kv_scheme, prompt_len
    return pp


def planned_kv_capacity(config, wafer: WaferSpec, dec: PhasePlan, layers: list[int] | None = None) -> tuple[int, int]:
    """(shift, concat) tokens the planner expects the decode regions' KV caches to hold
    with ``layers`` per region (default: the whole model's share): the cache slots the
    tightest region's PE rows can take beside its weights, vocabulary tables and
    activations (:func:`row_slots_capacity`). The shift-based cache fills every row evenly
    (slots x rows tokens); the concatenation cache grows one row of PEs (slots tokens).
    (What a run really holds comes from its SRAM accounting: ``engine.capacity``.)"""
    caps = [(s, side) for s, side, _ in _slot_capacities(config, wafer, dec, layers)]
    return min(c * side for c, side in caps), min(c for c, _ in caps)


def _decode_budget(config, wafer: WaferSpec, dec: PhasePlan) -> PhaseBudget:
    return PhaseBudget(config, wafer, "decode", dec.seq_len, dec.dtype, weights=dec.weights, rows=dec.rows,
                       request_len=dec.request_len, kv_scheme=dec.kv_scheme, prompt_len=dec.prompt_len,
                       queries=dec.queries)


def _slot_capacities(config, wafer: WaferSpec, dec: PhasePlan, layers: list[int] | None = None):
    """For each decode region holding layers (``layers`` per region, default the whole
    model's share): (cache slots its PE rows can take, its side, slots the plan needs on its
    fullest row)."""
    budget = _decode_budget(config, wafer, dec)
    out = []
    for st, n in zip(dec.stages, dec.layer_share if layers is None else layers):
        if n:
            g = st.region.rows
            out.append((row_slots_capacity(budget, g, n, len(st.vocab)), g, budget.slots(g)[0]))
    return out


def row_slots_capacity(budget: PhaseBudget, g: int, layers: int, vocab: int) -> int:
    """Cache slots per PE row a g x g decode region holding ``layers`` layers and a
    ``vocab``-entry slice of the tables can take within its usable SRAM: each slot costs
    its layers' K/V and, while one request's cache is what attention scans, the score
    tiles over it (:func:`decode_scores_bytes_per_slot`); the requests of a pool each scan
    their own share, so there the score tiles stay the budget's."""
    config = budget.config
    need = budget.need(g, layers, vocab)
    room = budget.wafer.usable_sram_bytes_per_pe - need["weights"] - need["vocab_tables"]
    per = layers * kv_bytes_per_slot(config, g, budget.dtype)
    one_request = (budget.request_len or budget.seq_len) >= budget.seq_len
    scanned = budget.slots(g)[1]

    def fits(s: int) -> bool:
        act = activation_bytes(config, g, "decode", budget.seq_len, budget.dtype, rows=budget.rows,
                               request_len=budget.request_len, slots=s if one_request else scanned,
                               queries=budget.queries)
        return per * s + act <= room

    if not fits(0):
        return 0
    lo, hi = 0, room // per + 1  # fits(lo); not fits(hi): its K/V alone exceed the room
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan(config, wafer: WaferSpec, prefill_grid: int | None, decode_grid: int | None, max_seq_len: int,
         dtype: str = "fp16", prompt_len: int | None = None, layers: int | None = None, suggest: bool = True,
         **options) -> Plan:
    """Plan both phases (or one, when the other grid is None) for sequences up to ``max_seq_len``
    (see :func:`_plan_wafer`). When the whole model does not fit (and ``suggest``), the error
    also says how many wafers of this kind hold it with its layers pipelined over them, each
    wafer's share planned (``error.context["wafers_needed"]``)."""
    try:
        return _plan_wafer(config, wafer, prefill_grid, decode_grid, max_seq_len, dtype, prompt_len, layers, suggest,
                           **options)
    except PlacementError as exc:
        if not suggest or (layers is not None and layers < config.num_layers) or "wafers_needed" in exc.context:
            raise
        if options.get("kv_scheme", "shift") != "shift":
            raise  # a cluster plans the shift-based cache
        from waferllm.engine.cluster import wafers_needed_note

        n, note = wafers_needed_note(config, wafer, prefill_grid, decode_grid, max_seq_len, dtype,
                                     prompt_len or options.get("request_len"), options.get("weights", "fp16"))
        if n is None:
            raise
        raise PlacementError(f"{exc}{note}", **{**exc.context, "wafers_needed": n}) from None


def _plan_wafer(config, wafer: WaferSpec, prefill_grid: int | None, decode_grid: int | None, max_seq_len: int,
                dtype: str = "fp16", prompt_len: int | None = None, layers: int | None = None, suggest: bool = True,
                weights: str = "fp16", prefill_attention: str = "paper", max_num_seqs: int = 1,
                request_len: int | None = None, kv_scheme: str = "shift", verify_rows: int = 1) -> Plan:
    """Plan both phases (or one, when the other grid is None) for sequences up to ``max_seq_len``.

    ``prompt_len``: the requests' prompt tokens (None: any length); prefill is sized for it
    (default ``request_len``, else ``max_seq_len``).
    ``suggest``: a does-not-fit error searches for (and plans) a grid that would fit.
    ``weights``: the layers' matrices dense in ``dtype`` ("fp16") or int8 / int4 blocks.
    ``prefill_attention``: ``paper`` or ``streaming`` (see :func:`plan_phase`).
    ``max_num_seqs``: requests decoded together, each of at most ``request_len`` tokens, in a
    KV pool of ``max_seq_len``: decode first plans one row per region, then again for the
    rows of the largest micro-batch that many regions give (``PhasePlan.rows``; the engine
    never runs more rows on a region at once).
    ``kv_scheme``: how the decode cache fills its rows: ``shift`` evenly, ``concat`` each
    request's prompt spread over the rows, then every generated token on the bottom row,
    which decode's budget then holds (:func:`decode_row_slots`)."""
    if max_seq_len < 1:
        raise PlacementError("max_seq_len must be positive")
    pre = dec = None
    if prefill_grid is not None:
        pre = plan_phase(config, wafer, prefill_grid, "prefill", prompt_len or request_len or max_seq_len, dtype,
                         layers, suggest, weights=weights, prefill_attention=prefill_attention)
    shift_cap = concat_cap = 0
    if decode_grid is not None:
        scheme = dict(kv_scheme=kv_scheme, prompt_len=prompt_len)
        dec = plan_phase(config, wafer, decode_grid, "decode", max_seq_len, dtype, layers, suggest, weights=weights,
                         request_len=request_len, **scheme)
        # a verification pass (speculative decoding) runs its tokens as rows of one micro-batch
        # (and its tokens' score tiles side by side)
        rows = max(cdiv(max_num_seqs, len(dec.stages)), verify_rows)
        if rows > 1:
            dec = plan_phase(config, wafer, decode_grid, "decode", max_seq_len, dtype, layers, suggest,
                             weights=weights, rows=rows, request_len=request_len, queries=verify_rows, **scheme)
        shift_cap, concat_cap = planned_kv_capacity(config, wafer, dec)
        # a model the regions cannot hold is extrapolated from the layers placed: their cache must fit
        placed = None if dec.whole_model_fits else [len(s.layers) for s in dec.stages]
        caps = _slot_capacities(config, wafer, dec, placed)
        short = [(s, side, need) for s, side, need in caps if s < need]
        if short:
            raise _kv_does_not_fit(config, wafer, decode_grid, max_seq_len, min(s * side for s, side, _ in caps), dtype,
                                   layers, suggest, weights, dec, min(short))
    return Plan(config.name, wafer.name, dtype, max_seq_len, pre, dec, int(shift_cap), int(concat_cap), [])


def _kv_does_not_fit(config, wafer: WaferSpec, grid: int, max_seq_len: int, held: int, dtype: str,
                     layers: int | None, suggest: bool, weights: str = "fp16", dec: PhasePlan | None = None,
                     short: tuple[int, int, int] | None = None) -> PlacementError:
    """The error for a decode KV cache the regions cannot hold, with what would (each planned).
    ``short``: (slots a region's rows take, its side, slots needed) of the tightest one."""
    concat = dec is not None and dec.kv_scheme == "concat"
    if concat:
        slots, side, need = short
        detail = (f"the concatenation KV cache for {max_seq_len} tokens does not fit the {grid}x{grid} decode regions: "
                  f"its bottom row needs {need} slots ({_concat_fill(dec, side)}), a {side}x{side} region's rows "
                  f"hold {slots}")
    else:
        detail = (f"the KV cache for {max_seq_len} tokens does not fit the {grid}x{grid} decode regions "
                  f"(capacity {held} tokens with the shift-based cache)")
    fit = longest = None
    if suggest:
        scheme = _scheme_of(dec)
        seq = scheme.pop("request_len", max_seq_len)
        fit = smallest_fitting_grid(config, wafer, "decode", seq, dtype, grid + 1, layers, weights, **scheme)
        if concat:
            longest = _longest_concat(config, wafer, grid, dec, layers)
        elif held >= 1 and phase_fits(config, wafer, grid, "decode", held, dtype, layers, weights):
            longest = held
    fits = f"{longest} tokens fit these regions"
    if concat and longest:
        p = dec.prompt_len
        prompt = f" (the {p}-token prompt and {longest - p} generated)" if p else ""
        fits = f"a request of at most {longest} tokens in all{prompt} fits these regions with it"
    options = ([f"a {fit}x{fit} decode grid holds it"] if fit else []) + ([fits] if longest else [])
    advice = (f"; {' and '.join(options)} (checked by planning them)" if options else "") + (
        ". Other options: a wafer with more SRAM per PE, or shorter sequences.")
    return PlacementError(detail + advice, phase="decode", grid=grid, fit_grid=fit, seq_len=max_seq_len,
                          longest=longest, detail=detail)


def _scheme_of(dec) -> dict:
    """The cache scheme and prompt a decode plan (or budget) was made for, as keywords of
    :func:`phase_fits` (a pool: its requests' length and count)."""
    if dec is None or dec.kv_scheme != "concat":
        return {}
    req = dec.request_len or dec.seq_len
    return dict(kv_scheme="concat", prompt_len=dec.prompt_len, request_len=req, max_num_seqs=cdiv(dec.seq_len, req))


def _concat_fill(dec, g: int) -> str:
    """How a concatenation cache's bottom row fills on a g x g region, in words."""
    req = dec.request_len or dec.seq_len
    each = "" if req >= dec.seq_len else f" for each of {cdiv(dec.seq_len, req)} requests"
    if dec.prompt_len is None:
        return f"the whole {req}-token context on the bottom row{each}, prompts being of any length"
    p = min(dec.prompt_len, req)
    return (f"{cdiv(p, g)} of the {p}-token prompt spread over {g} rows, then {req - p} generated tokens on the "
            f"bottom row{each}")


def _longest_concat(config, wafer: WaferSpec, grid: int, dec, layers: int | None) -> int | None:
    """The longest request (tokens in all, with the same prompt) that plans on ``grid`` with
    the concatenation cache, or None: each length tried is planned."""
    scheme = _scheme_of(dec)
    req, seqs, prompt = scheme.pop("request_len"), scheme.pop("max_num_seqs"), dec.prompt_len

    def fits(n: int) -> bool:
        return phase_fits(config, wafer, grid, "decode", n, dec.dtype, layers, dec.weights, max_num_seqs=seqs,
                          **scheme)

    lo = min(prompt, req - 1) + 1 if prompt else 1  # the prompt and one generated token
    if lo >= req or not fits(lo):
        return None
    hi = req  # does not fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
