"""The prefill <-> decode transition: what moves where, priced from block maps.

After a request's prefill, every layer's weights move from their prefill placement (the
MeshGEMM operands, pre-skewed: each column's row blocks permuted) to their decode
placement (the fused ``[q | k | v]`` and ``[gate | up]`` column blocks, W_O and W_down
input-on-x), and every layer's K and V from the prefill layout (tokens over the rows,
prefill HeadLayout features over the columns) into the decode cache (tokens over the rows
in balanced counts, decode HeadLayout features over the columns). A later request moves
the weights back (the restore); the cache is not needed again.

Every moved tensor is described as a logical tensor in the model's own index order, so the
feature permutation between two HeadLayouts (different padding and blocks on the two
grids) shows in the coordinate maps: a layer's weights travel as two tensors, the
matrices whose input is split over the rows in prefill and decode alike
(``[E, q | k | v | gate | up]``) and the ones whose input moves from the rows to the
columns (``[q feats ; ffn feats, E]``, a transpose), plus the norms (and biases, fp32).
K and V travel as ``[tokens, K | V]``.

The layers a prefill region hands to one decode region all sit on the same PEs at both
ends: their messages share every link, so they stream as one move of a tensor with a
leading layer dim (one set-up, the bodies queue on the busiest link).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from waferllm.hardware.plmr import DTYPE_BYTES
from waferllm.mesh.move import Placement, blocks_key, charge_priced, price_move
from waferllm.mesh.region import Region
from waferllm.mesh.tensor import QBLOCK, QUANT_BITS, SCALE_BYTES

NORM_BYTES = DTYPE_BYTES["fp32"]  # norms and biases are held in fp32 in both phases


# ------------------------------------------------------------------ placement algebra


def positions(cols: np.ndarray, n: int) -> np.ndarray:
    """The inverse of a HeadLayout column order: the position of each of the ``n`` model features."""
    out = np.empty(n, np.int64)
    ok = cols >= 0
    out[cols[ok]] = np.flatnonzero(ok)
    return out


def take(p: Placement, index: dict[int, np.ndarray]) -> Placement:
    """The tensor whose element i along dim d is ``p``'s element ``index[d][i]`` (every
    spread dim needs an index; the others keep their sizes)."""
    shape = tuple(len(index[d]) if d in index else s for d, s in enumerate(p.shape))
    kw = {f"{ax}_of": getattr(p, f"{ax}_of")[index[d]] for ax in ("y", "x")
          if (d := getattr(p, f"{ax}_dim")) is not None}
    return Placement(p.region, shape, y_dim=p.y_dim, x_dim=p.x_dim, pe_rows=p.pe_rows, pe_cols=p.pe_cols,
                     partial=p.partial, **kw)


def concat(parts: list[Placement], dim: int) -> Placement:
    """Tensors of one region, the same maps along every other dim (and the same block
    tables, if any), joined along ``dim``."""
    p = parts[0]
    shape = list(p.shape)
    shape[dim] = sum(q.shape[dim] for q in parts)
    kw = {}
    for ax in ("y", "x"):
        d = getattr(p, f"{ax}_dim")
        if d is not None:
            kw[f"{ax}_of"] = (np.concatenate([getattr(q, f"{ax}_of") for q in parts]) if d == dim
                              else getattr(p, f"{ax}_of"))
    return Placement(p.region, tuple(shape), y_dim=p.y_dim, x_dim=p.x_dim, pe_rows=p.pe_rows, pe_cols=p.pe_cols, **kw)


def stacked(p: Placement, layers: int) -> Placement:
    """``layers`` copies of the tensor on the same PEs: a leading dim spread over no axis."""
    shift = {f"{ax}_dim": None if getattr(p, f"{ax}_dim") is None else getattr(p, f"{ax}_dim") + 1
             for ax in ("y", "x")}
    return Placement(p.region, (layers,) + p.shape, y_of=p.y_of, x_of=p.x_of, pe_rows=p.pe_rows,
                     pe_cols=p.pe_cols, partial=p.partial, **shift)


def _like(t, ref: Placement, ref_blocks: dict | None) -> Placement:
    """Where ``t`` is, reusing the block tables of ``ref`` (a tensor of the same region with
    the same block maps: a stage's pre-skewed weights) instead of rebuilding them."""
    blocks = t.blocks
    same = ref_blocks is not None and blocks is not None and blocks.keys() == ref_blocks.keys() and all(
        blocks[d] is ref_blocks[d] or np.array_equal(blocks[d], ref_blocks[d]) for d in blocks)
    if not same:
        return Placement.of(t)
    p = Placement.blocked(t.mesh.region, t.shape, t.layout, t.tile_shape)
    return Placement(p.region, p.shape, p.y_dim, p.y_of, p.x_dim, p.x_of, ref.pe_rows, ref.pe_cols)


# ------------------------------------------------------------------ what one layer moves


def _heads(config, hl) -> tuple[np.ndarray, np.ndarray]:
    """Wafer positions of the model's q and kv features in HeadLayout ``hl``."""
    return (positions(hl.q_cols, config.num_heads * config.head_dim), positions(hl.kv_cols, hl.kv_dim))


def weight_itemsize(stage) -> float:
    """Bytes a layer matrix's element takes as it moves: its dtype's, or for int8 / int4
    blocks the packed value plus its share of the block's fp16 scale."""
    w = getattr(stage, "weights", "fp16")
    if w in QUANT_BITS:
        return QUANT_BITS[w] / 8 + SCALE_BYTES / QBLOCK
    return DTYPE_BYTES[stage.dtype]


def prefill_weights(stage, config) -> dict[str, tuple[Placement, int]]:
    """One layer's weights on a prefill region as the logical tensors of the transition:
    name -> (placement, bytes per element). The matrices are MeshGEMM B operands, placed
    pre-skewed: their block tables come from the tensors."""
    return _alike(stage, config, _prefill_weights)


def _prefill_weights(stage, config) -> dict[str, tuple[Placement, int]]:
    w, c = stage.w[0], config
    q_index, kv_index = _heads(c, stage.hl)
    e, f = np.arange(c.hidden_size), np.arange(c.intermediate_size)
    ref = Placement.of(w["q"])
    P = {k: ref if k == "q" else _like(w[k], ref, w["q"].blocks) for k in ("q", "k", "v", "o", "gate", "up", "down")}
    out = {
        "w_in_y": concat([take(P["q"], {0: e, 1: q_index}), take(P["k"], {0: e, 1: kv_index}), take(P["v"], {0: e, 1: kv_index}),
                          take(P["gate"], {0: e, 1: f}), take(P["up"], {0: e, 1: f})], 1),
        "w_in_x": concat([take(P["o"], {0: q_index, 1: e}), take(P["down"], {0: f, 1: e})], 0),
        "norms": concat([Placement.of(w["attn_norm"]), Placement.of(w["ffn_norm"])], 0),  # [2, E]
    }
    if "bq" in w:
        out["bias"] = concat([take(Placement.of(w["bq"]), {1: q_index}), take(Placement.of(w["bk"]), {1: kv_index}),
                              take(Placement.of(w["bv"]), {1: kv_index})], 1)
    item = weight_itemsize(stage)
    return {k: (p, NORM_BYTES if k in ("norms", "bias") else item) for k, p in out.items()}


def decode_weights(stage, config) -> dict[str, tuple[Placement, int]]:
    """One layer's weights on a decode region, as :func:`prefill_weights`: the fused column
    blocks hold [q | k | v] and [gate | up] of one feature block, W_O and W_down have their
    input on x, the norms are split over the rows and copied along them."""
    return _alike(stage, config, _decode_weights)


def _decode_weights(stage, config) -> dict[str, tuple[Placement, int]]:
    w, c, hl = stage.w[0], config, stage.hl
    q_index, kv_index = _heads(c, hl)
    e, f = np.arange(c.hidden_size), np.arange(c.intermediate_size)
    r, width, ffn = hl.group, hl.col_features, stage.ffn_per_column
    # positions in the fused tiles: column j holds [q block j | k block j | v block j] and [gate j | up j]
    block = (r + 2) * width
    fq = (q_index // (r * width)) * block + q_index % (r * width)
    fk = (kv_index // width) * block + r * width + kv_index % width
    fg = (f // ffn) * 2 * ffn + f % ffn
    qkv, gate_up = Placement.of(w["qkv"]), Placement.of(w["gate_up"])
    norm = Placement.of(w["attn_norm"])  # [E] (y)
    out = {
        "w_in_y": concat([take(qkv, {0: e, 1: fq}), take(qkv, {0: e, 1: fk}), take(qkv, {0: e, 1: fk + width}),
                          take(gate_up, {0: e, 1: fg}), take(gate_up, {0: e, 1: fg + ffn})], 1),
        "w_in_x": concat([take(Placement.of(w["o"]), {0: q_index, 1: e}), take(Placement.of(w["down"]), {0: f, 1: e})], 0),
        "norms": Placement(norm.region, (2, c.hidden_size), y_dim=1, y_of=norm.y_of),
    }
    if "qkv_bias" in w:
        b = Placement.of(w["qkv_bias"])  # [fused] (x)
        out["bias"] = Placement(b.region, (1, fq.size + 2 * fk.size), x_dim=1,
                                x_of=b.x_of[np.concatenate((fq, fk, fk + width))])
    item = weight_itemsize(stage)
    return {k: (p, NORM_BYTES if k in ("norms", "bias") else item) for k, p in out.items()}


#: a layer's transition tensors by what they depend on besides the region's place (every
#: region of one size and stage shape places its layers alike: the stages of a pipeline,
#: and every candidate of a cluster search), placed on the first such region
_ALIKE: dict = {}


def _alike(stage, config, build) -> dict[str, tuple[Placement, int]]:
    """``build(stage, config)``, from a region of the same size and stage shape when one was
    built: its placements moved to this region (the maps are the same; they are read-only)."""
    key = _shape_key(stage, config, build)
    if key is None:
        return build(stage, config)
    held = _ALIKE.get(key)
    if held is None:
        out = {k: (_fixed(p), item) for k, (p, item) in build(stage, config).items()}
        if len(_ALIKE) > 256:
            _ALIKE.clear()
        held = _ALIKE[key] = (out, [t.blocks for t in stage.w[0].values()])  # (block maps keyed by identity live on)
    region = stage.mesh.region
    return {k: (p.on(region), item) for k, (p, item) in held[0].items()}


def _shape_key(stage, config, build) -> tuple | None:
    """What one layer's weight placements depend on, apart from where the region is: its
    size, head layout, dtypes and every tensor's shape, layout, tiles and block maps (None:
    a block map with no key)."""
    tensors = []
    for name, t in stage.w[0].items():
        blocks = t.blocks
        bk = None if not blocks else tuple((d, blocks_key(b)) for d, b in sorted(blocks.items()))
        if bk is not None and any(k is None for _, k in bk):
            return None
        tensors.append((name, t.shape, tuple(t.layout), t.tile_shape, bk, t.partial))
    r, c = stage.mesh.region, config
    return (build.__name__, r.rows, r.cols, stage.hl, getattr(stage, "ffn_per_column", None), weight_itemsize(stage),
            c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size, tuple(tensors))


def kv_source(k, v, hl, config) -> Placement:
    """Where a prefill layer's K and V [tokens, kv_padded] (y, x) are, as one logical
    [tokens, K | V] in the model's feature order (built once per region size and tensor
    shape, as :func:`_alike`)."""
    if k.blocks or v.blocks or k.partial is not None or v.partial is not None or k.mesh.region is not v.mesh.region:
        return _kv_source(k, v, hl, config)
    r = k.mesh.region
    key = ("kv", r.rows, r.cols, hl, config.num_heads, config.head_dim) + tuple(
        (t.shape, tuple(t.layout), t.tile_shape) for t in (k, v))
    held = _ALIKE.get(key)
    if held is None:
        held = _ALIKE[key] = _fixed(_kv_source(k, v, hl, config))
    return held.on(r)


def kv_destination(cache, length: int) -> Placement:
    """``cache.placement(length)``: where the decode cache puts a layer's prompt K and V,
    built once per region size, head layout and length (as :func:`_alike`): every decode
    region of a size, in every option of a cluster search, receives alike."""
    r = cache.mesh.region
    key = ("kv_dst", r.rows, r.cols, cache.hl, cache.q, length)
    held = _ALIKE.get(key)
    if held is None:
        if len(_ALIKE) > 256:
            _ALIKE.clear()
        held = _ALIKE[key] = _fixed(cache.placement(length))
    return held.on(r)


def _kv_source(k, v, hl, config) -> Placement:
    _, kv_index = _heads(config, hl)
    tokens = np.arange(k.shape[0])
    return concat([take(Placement.of(k), {0: tokens, 1: kv_index}), take(Placement.of(v), {0: tokens, 1: kv_index})], 1)


def _fixed(p: Placement) -> Placement:
    """``p`` with read-only maps (it is shared)."""
    for a in (p.y_of, p.x_of):
        if a is not None:
            a.setflags(write=False)
    return p


# ------------------------------------------------------------------ moves and their order


@dataclass
class Pair:
    """The moves between one prefill region and one decode region (the layers both hold):
    (name, source, destination, bytes per element), in either direction."""

    src: Region
    dst: Region
    moves: list[tuple[str, Placement, Placement, int]]


def _rect(r: Region) -> tuple[int, int, int, int]:
    return (r.row0, r.row0 + r.rows, r.col0, r.col0 + r.cols)


def footprint(src: Region, dst: Region) -> dict[str, tuple[int, int, int, int]]:
    """The fabric resources a move from ``src`` to ``dst`` may load under XY routing, as
    rectangles (row0, row1, col0, col1), ends exclusive: the source PEs' injection ramps,
    the destination PEs' ejection ramps, the row links of the source's rows across both
    regions' columns, and the column links of the destination's columns across both
    regions' rows."""
    rows = (min(src.row0, dst.row0), max(src.row0 + src.rows, dst.row0 + dst.rows))
    cols = (min(src.col0, dst.col0), max(src.col0 + src.cols, dst.col0 + dst.cols))
    return {"inject": _rect(src), "eject": _rect(dst), "row_links": (src.row0, src.row0 + src.rows) + cols,
            "col_links": rows + (dst.col0, dst.col0 + dst.cols)}


def _overlap(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def rounds(pairs: list[Pair]) -> list[list[Pair]]:
    """Pairs grouped into rounds that run at the same time.

    Two pairs whose footprints (:func:`footprint`) overlap in any resource may share a
    ramp or a link: their messages would queue behind each other there, so they go in
    different rounds, one after the other. Pairs with disjoint footprints use disjoint
    links and ramps and run together. Greedy: each pair joins the first round it fits."""
    out: list[list[Pair]] = []
    prints: list[list[dict]] = []
    for p in pairs:
        fp = footprint(p.src, p.dst)
        for rnd, fps in zip(out, prints):
            if not any(_overlap(fp[k], other[k]) for other in fps for k in fp):
                rnd.append(p)
                fps.append(fp)
                break
        else:
            out.append([p])
            prints.append([fp])
    return out


def charge(ledger, pairs: list[Pair], prefix: str) -> None:
    """Charge the moves: rounds one after another (``ledger.parallel``: the pairs of a round
    start together and the round lasts as long as its slowest); a pair's own moves share its
    links and ramps, so they follow one another."""
    charge_priced_rounds(ledger, price(ledger.wafer, pairs, prefix))


def price(wafer, pairs: list[Pair], prefix: str) -> list[list[list[tuple]]]:
    """The moves :func:`charge` charges, priced once (:func:`price_move`): for each round,
    for each of its pairs, its moves' (name, price) in order. Kept by a caller whose moves
    recur (every request of a length moves the same weights and K/V the same way)."""
    return [[[(f"{prefix}.{name}", price_move(wafer, src, dst, item)) for name, src, dst, item in pair.moves]
             for pair in rnd] for rnd in rounds(pairs)]


def charge_priced_rounds(ledger, priced: list[list[list[tuple]]]) -> None:
    """Charge what :func:`price` priced, as :func:`charge` would: the same events in the
    same order with the same values."""
    for rnd in priced:
        with ledger.parallel() as par:
            for moves in rnd:
                with par.branch():
                    for name, cost in moves:
                        charge_priced(ledger, cost, name)
