"""The prefill -> decode transition and the restore, against brute force.

The brute force finds every element where the program really holds it: weights and K/V
hold unique values, so an element's source PE is the prefill tile that holds its value
and its destination PE the decode tile (or cache slot) that holds it afterwards. Each
element is routed along its XY path (the source's row to the destination's column, then
that column), one link at a time; the move's time is its busiest ramp or directed link
streaming behind the longest path's head, plus the collective's set-up. The cache read
back after the transition equals the dense reference's K and V. A second request pays the
restore (the weights back to the prefill layout) and the first does not; a dry run
charges what a numeric run charges.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waferllm.engine import transition
from waferllm.engine.run_config import RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.hardware import get_wafer
from waferllm.mesh import Region
from waferllm.mesh.move import Placement, move_traffic
from waferllm.models.reference import ReferenceModel
from waferllm.models.testing import random_weights, tiny_config

WSE2 = get_wafer("wse2")
BIG = WSE2.replace(sram_bytes_per_pe=96 * 1024)
PROMPT = [3, 17, 99, 5, 200, 7, 1, 44, 9, 130, 61]
# nothing divides the grids: hidden 60, 6 query heads of 10 over 3 kv heads, FFN 100
ODD = dict(hidden_size=60, num_heads=6, num_kv_heads=3, head_dim=10, intermediate_size=100, vocab_size=263)


# ---------------------------------------------------------------------- brute force


def route(src: tuple[int, int], dst: tuple[int, int]) -> list[tuple]:
    """The directed links of the XY path src -> dst, named by the PE they leave."""
    (r, c), (r2, c2) = src, dst
    links = []
    while c != c2:
        step = 1 if c2 > c else -1
        links.append(("row", r, c, step))
        c += step
    while r != r2:
        step = 1 if r2 > r else -1
        links.append(("col", r, c, step))
        r += step
    return links


def brute_move(flows, nbytes: int) -> dict:
    """flows: (source PE, destination PE) of every element. What a move of them loads."""
    loads, pairs, hops, moved = Counter(), set(), 0, 0
    for s, d in flows:
        if s == d:
            continue
        loads[("inject",) + s] += nbytes
        loads[("eject",) + d] += nbytes
        for link in route(s, d):
            loads[link] += nbytes
        pairs.add((s, d))
        hops = max(hops, abs(s[0] - d[0]) + abs(s[1] - d[1]))
        moved += nbytes
    link_bytes = sum(v for k, v in loads.items() if k[0] in ("row", "col"))
    return {"busiest": max(loads.values(), default=0), "hops": hops, "bytes_moved": moved, "messages": len(pairs),
            "hop_bytes": link_bytes, "loads": loads}


def move_time(w, b: dict) -> float:
    """Cycles of a move with these loads on wafer w (a move that moves nothing is free)."""
    if not b["messages"]:
        return 0.0
    return (2 * w.ramp_cycles + w.alpha_cycles * b["hops"] + math.ceil(b["busiest"] / w.link_bytes_per_cycle)
            + w.collective_overhead_cycles)


def where(held) -> dict:
    """Value -> wafer PE holding it. ``held``: (region, array whose first two axes are its
    PE rows and columns), or tensors (their tiles). Padding zeros are left out; every value
    must be held once."""
    out = {}
    for item in held:
        r, tiles = item if isinstance(item, tuple) else (item.mesh.region, item.tiles)
        for i in range(tiles.shape[0]):
            for j in range(tiles.shape[1]):
                for x in np.asarray(tiles[i, j]).ravel().tolist():
                    if x != 0.0:
                        assert x not in out, "values must be unique to find where each one is"
                        out[x] = (r.row0 + i, r.col0 + j)
    return out


def flows(values, src: dict, dst: dict):
    return [(src[x], dst[x]) for x in values]


# ---------------------------------------------------------------------- runs


class Request:
    """What one request did: its ledger events, the K and V prefill handed the transition,
    every decode cache's slots and logical K/V right after it, and the request's metrics."""

    events: list
    kv: list
    slots: list
    logical: list
    metrics: dict


def unique_weights(cfg, seed: int):
    """Random weights whose matrices hold distinct values (so each element can be found)."""
    w = random_weights(cfg, seed=seed)
    names = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    n = sum(getattr(lw, k).size for lw in w.layers for k in names)
    values = np.random.default_rng(seed).permutation(np.linspace(0.01, 0.1, n, dtype=np.float32))
    values *= np.where(np.arange(n) % 2, 1, -1).astype(np.float32)
    for lw in w.layers:
        for k in names:
            a = getattr(lw, k)
            a[...] = values[: a.size].reshape(a.shape)
            values = values[a.size:]
    return w


def tagged(kv):
    """The same K and V tensors with every element replaced by a distinct value (padding stays 0)."""
    out, tag = [], 1.0
    for pair in kv:
        tensors = []
        for t in pair:
            real = t.tiles != 0
            tiles = np.zeros_like(t.tiles)
            tiles[real] = tag + np.arange(real.sum())
            tag += real.sum()
            tensors.append(t.with_tiles(tiles))
        out.append(tuple(tensors))
    return out


def run_requests(cfg, w, grids, mode="numeric", requests=1, steps=2, tag=False):
    run = RunConfig(*grids, max_seq_len=len(PROMPT) + steps + 4, dtype="fp32")
    wm = WaferModel(cfg, w if mode == "numeric" else None, BIG, run, mode=mode)
    inner, out = wm._transition, []

    def transition_kept(kvs):  # what the transition is handed, and what it leaves
        [(seq, length, kv)] = kvs
        kv = tagged(kv) if tag else kv
        inner([(seq, length, kv)])
        req = out[-1]
        req.kv = kv
        if mode == "numeric":
            req.slots = [(st.cache, [(k.copy(), v.copy()) for k, v in zip(st.cache.k, st.cache.v)])
                         for st in wm.decode_stages]
            req.logical = [st.cache.logical(l) for st in wm.decode_stages for l in range(st.cache.layers)]

    wm._transition = transition_kept
    for _ in range(requests):
        out.append(Request())
        first = len(wm.ledger.events)
        wm.reset()
        wm.prefill(PROMPT if mode == "numeric" else len(PROMPT))
        for _ in range(steps):
            wm.decode(5 if mode == "numeric" else None)
        out[-1].events = wm.ledger.events[first:]
        out[-1].metrics = wm.request_metrics()
    return wm, out


@pytest.fixture(scope="module", params=[(5, 3), (3, 4)], ids=["5to3", "3to4"])
def two_requests(request):
    """Two layers on one prefill and one decode region (on the same PEs of the wafer), two
    requests one after the other."""
    cfg = tiny_config(name="odd", **ODD)
    w = unique_weights(cfg, seed=11)
    wm, reqs = run_requests(cfg, w, request.param, requests=2)
    return cfg, w, wm, reqs, request.param


def charged(req: Request, name: str):
    [e] = [e for e in req.events if e.name == name]
    return e


def assert_charged(e, w, b):
    assert e.cycles == move_time(w, b)
    assert e.counters["bytes_moved"] == b["bytes_moved"]
    assert e.counters["messages"] == b["messages"]
    assert e.counters["hop_bytes"] == b["hop_bytes"]


def weight_flows(wm, w):
    """Every weight element of every layer, from its prefill PE to its decode PE: the
    matrices whose input stays on the rows ([q | k | v] and [gate | up] fused in decode)
    and the ones whose input moves to the columns (W_O, W_down)."""
    [pre], [dec] = wm.prefill_stages, wm.decode_stages

    def by_name(stage, names):
        return where([t for lw in stage.w for k, t in lw.items() if k in names])

    values = [[x for lw in w.layers for a in mats(lw) for x in a.ravel().tolist()]
              for mats in (lambda lw: (lw.wq, lw.wk, lw.wv, lw.w_gate, lw.w_up), lambda lw: (lw.wo, lw.w_down))]
    return {"w_in_y": flows(values[0], by_name(pre, ("q", "k", "v", "gate", "up")), by_name(dec, ("qkv", "gate_up"))),
            "w_in_x": flows(values[1], by_name(pre, ("o", "down")), by_name(dec, ("o", "down")))}


def test_transition_weights_equal_brute_force(two_requests):
    """Every element from the prefill tile that holds it (pre-skewed for MeshGEMM) to the
    decode tile that holds it."""
    cfg, w, wm, reqs, _ = two_requests
    f = weight_flows(wm, w)
    assert len(f["w_in_y"]) == cfg.num_layers * cfg.hidden_size * (
        cfg.q_dim + 2 * cfg.num_kv_heads * cfg.head_dim + 2 * cfg.intermediate_size)
    for name, fl in f.items():
        b = brute_move(fl, 4)
        assert b["messages"] > 0
        for req in reqs:
            assert_charged(charged(req, f"transition.{name}"), wm.wafer, b)


def test_transition_kv_equals_brute_force(two_requests):
    """Each layer's K and V: from the prefill tiles (tokens over rows, prefill HeadLayout
    features over columns) to the cache slots (tokens over rows in balanced counts, decode
    HeadLayout features over columns)."""
    cfg, w, _, _, grids = two_requests
    wm, [req] = run_requests(cfg, w, grids, tag=True)
    src = where([t for pair in req.kv for t in pair])
    [(cache, slots)] = req.slots
    dst = where([(cache.mesh.region, store) for pair in slots for store in pair])
    assert len(src) == len(dst) == cfg.num_layers * 2 * len(PROMPT) * cfg.num_kv_heads * cfg.head_dim
    b = brute_move(flows(src, src, dst), 4)
    assert_charged(charged(req, "transition.kv"), wm.wafer, b)


def test_cache_after_transition_equals_reference(two_requests):
    """The decode cache read back after the transition holds the dense reference's K and V."""
    cfg, w, wm, reqs, _ = two_requests
    ref = ReferenceModel(w, max_seq_len=64)
    ref.prefill(PROMPT)
    [dec] = wm.decode_stages
    n = len(PROMPT)
    for req in reqs:
        for layer, (k, v) in enumerate(req.logical):
            for got, want in ((k, ref.cache.k[layer]), (v, ref.cache.v[layer])):
                want = want[:, :n].transpose(1, 0, 2).reshape(n, -1)  # [tokens, kv heads x head dim]
                np.testing.assert_allclose(dec.hl.to_original_kv(got), want, rtol=1e-5, atol=1e-6)


def test_second_request_pays_the_restore(two_requests):
    """The first request finds the weights in the prefill layout; the second finds them in
    the decode layout and moves every element back before its prefill (in its TTFT)."""
    cfg, w, wm, reqs, _ = two_requests
    first, second = reqs
    assert not [e for e in first.events if e.name.startswith("restore")]
    assert first.metrics["restore_s"] == 0.0 and "restore" not in first.metrics["breakdown_s"]
    back = {name: [(d, s) for s, d in fl] for name, fl in weight_flows(wm, w).items()}
    for name, fl in back.items():
        assert_charged(charged(second, f"restore.{name}"), wm.wafer, brute_move(fl, 4))
    [(start, end)] = [(a, b) for path, a, b in wm.ledger.spans if path == ("prefill", "restore")]
    assert second.metrics["restore_s"] > 0
    assert second.metrics["restore_s"] == pytest.approx(wm.wafer.cycles_to_seconds(end - start), rel=1e-12)
    assert second.metrics["ttft_s"] == pytest.approx(first.metrics["ttft_s"] + second.metrics["restore_s"], rel=1e-9)
    assert second.metrics["breakdown_s"]["restore"] > 0


def test_dry_run_charges_what_a_numeric_run_charges(two_requests):
    cfg, w, wm, reqs, grids = two_requests
    dry, dry_reqs = run_requests(cfg, None, grids, mode="dry", requests=2)
    for a, b in zip(reqs, dry_reqs):
        for key in ("restore_s", "transition_s"):
            assert a.metrics[key] == b.metrics[key]
    moved = {k: v for k, v in wm.ledger.by_primitive.items() if k.startswith(("transition.", "restore."))}
    assert moved and moved == {k: v for k, v in dry.ledger.by_primitive.items()
                               if k.startswith(("transition.", "restore."))}


def test_each_pair_of_regions_moves_its_layers():
    """Six layers on the real wse2: two 4x4 prefill regions and four 3x3 decode regions, side
    by side, so one prefill region feeds several decode regions and the other way round.
    Each pair of a prefill and a decode region holding some of the same layers moves those
    layers' weights in one move, equal to routing their elements."""
    cfg = tiny_config(name="deep", num_layers=6)
    w = unique_weights(cfg, seed=5)
    run = RunConfig(4, 3, max_seq_len=len(PROMPT) + 6, dtype="fp32")
    wm = WaferModel(cfg, w, WSE2, run, mode="numeric")
    wm.reset()
    wm.prefill(PROMPT)
    assert len(wm.prefill_stages) == 2 and len(wm.decode_stages) == 4
    expected = []
    for p in wm.prefill_stages:
        for d in wm.decode_stages:
            layers = sorted(set(p.layer_ids) & set(d.layer_ids))
            if not layers:
                continue
            src = where([t for li in layers for k, t in p.w[li - p.layer_ids.start].items()
                         if k in ("q", "k", "v", "gate", "up")])
            dst = where([t for li in layers for k, t in d.w[li - d.layer_ids.start].items() if k in ("qkv", "gate_up")])
            b = brute_move(flows(src, src, dst), 4)
            expected.append((move_time(wm.wafer, b), b["bytes_moved"], b["messages"]))
    assert len(expected) == 5
    got = [(e.cycles, e.counters["bytes_moved"], e.counters["messages"])
           for e in wm.ledger.events if e.name == "transition.w_in_y"]
    assert sorted(got) == sorted(expected)


def test_rounds_serialise_pairs_that_share_a_region_or_links():
    a, b = Region(WSE2, 4, 4), Region(WSE2, 4, 4, col0=4)
    far, far2 = Region(WSE2, 4, 4, row0=20), Region(WSE2, 4, 4, row0=20, col0=4)

    def sizes(*pairs):
        return [len(r) for r in transition.rounds([transition.Pair(s, d, []) for s, d in pairs])]

    assert sizes((a, a), (far, far2)) == [2]  # other rows, other columns: together
    assert sizes((a, a), (a, b)) == [1, 1]  # the same source PEs: one after the other
    # b -> far2 runs along b's rows on b's columns, then down columns 4..7: none of a's links
    assert sizes((a, a), (b, far2)) == [2]
    # a -> far2 runs along rows 0..3 across columns 0..7, through b's row links
    assert sizes((b, b), (a, far2)) == [1, 1]


# ---------------------------------------------------------------------- the skewed-source path


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.booleans(), st.integers(1, 3))
def test_skewed_source_move_equals_brute_force(seed, transposed, rest):
    """A source whose blocks sit by a table that permutes row blocks within each column (as
    MeshGEMM's pre-skewed weights do) to a plain destination, its dims either way round:
    every load equals routing each element."""
    rng = np.random.default_rng(seed)
    n, m = (int(v) for v in rng.integers(1, 5, 2))
    src_region = Region(WSE2, n, m, int(rng.integers(0, 4)), int(rng.integers(0, 4)))
    dst_region = Region(WSE2, *(int(v) for v in rng.integers(1, 5, 2)), *(int(v) for v in rng.integers(0, 5, 2)))
    shape = (int(rng.integers(1, 9)), int(rng.integers(1, 9)), rest)
    y_of = rng.integers(0, n, shape[0])
    x_of = rng.integers(0, m, shape[1])
    pe_rows = np.stack([rng.permutation(n) for _ in range(m)], axis=1)  # [row block, column block] -> row
    pe_cols = np.broadcast_to(rng.permutation(m), (n, m)).copy()
    src = Placement(src_region, shape, 0, y_of, 1, x_of, pe_rows, pe_cols)
    a_of = rng.integers(0, dst_region.cols if transposed else dst_region.rows, shape[0])
    b_of = rng.integers(0, dst_region.rows if transposed else dst_region.cols, shape[1])
    dst = (Placement(dst_region, shape, 1, b_of, 0, a_of) if transposed
           else Placement(dst_region, shape, 0, a_of, 1, b_of))

    def at(region, r, c):
        return (region.row0 + int(r), region.col0 + int(c))

    fl = []
    for i, j, _ in np.ndindex(shape):
        s = at(src_region, pe_rows[y_of[i], x_of[j]], pe_cols[y_of[i], x_of[j]])
        fl.append((s, at(dst_region, b_of[j], a_of[i]) if transposed else at(dst_region, a_of[i], b_of[j])))
    b = brute_move(fl, 2)
    tr = move_traffic(src, dst, 2)
    top, left = tr.origin
    arrays = {k: np.zeros_like(getattr(tr, k)) for k in ("inject", "eject", "east", "west", "south", "north")}
    for key, v in b["loads"].items():
        if key[0] in ("inject", "eject"):
            arrays[key[0]][key[1] - top, key[2] - left] += v
        else:
            kind, r, c, step = key
            r, c = r - top, c - left
            name = {("row", 1): "east", ("row", -1): "west", ("col", 1): "south", ("col", -1): "north"}[kind, step]
            r, c = (r, c) if step == 1 else ((r, c - 1) if kind == "row" else (r - 1, c))
            arrays[name][r, c] += v
    for k, arr in arrays.items():
        np.testing.assert_array_equal(getattr(tr, k), arr, err_msg=k)
    assert (tr.max_hops, tr.bytes_moved, tr.messages) == (b["hops"], b["bytes_moved"], b["messages"])


def test_moves_priced_once_charge_what_routing_them_again_charges():
    """The transition and restore price each move once (the weights for good, K and V per
    prompt length) and charge the prices again later. Requests of lengths 7, 4, 7 on six
    layers over two prefill and four decode regions: every request's transition and restore
    events equal ``transition.charge`` of the same moves on a fresh ledger, which routes
    every move anew."""
    from waferllm.mesh.ledger import Ledger

    cfg = tiny_config(name="deep", num_layers=6)
    run = RunConfig(4, 3, max_seq_len=16, dtype="fp32")
    wm = WaferModel(cfg, None, WSE2, run, mode="dry")
    wm.ledger.keep_events = True
    seen = []
    inner = wm._transition

    def kept(kvs):
        seen.append([(seq, length, list(kv)) for seq, length, kv in kvs])
        inner(kvs)

    wm._transition = kept
    for length in (7, 4, 7):
        first = len(wm.ledger.events)
        wm.reset()
        wm.prefill(length)
        wm.decode(None)
        got = [(e.name, e.cycles, e.counters) for e in wm.ledger.events[first:]
               if {"transition", "restore"} & set(e.span)]
        fresh = Ledger(wm.wafer)
        if len(seen) > 1:  # the weights come back from the decode layout first
            transition.charge(fresh, wm._pairs(), "restore")
        transition.charge(fresh, wm._pairs(seen[-1]), "transition")
        want = [(e.name, e.cycles, e.counters) for e in fresh.events]
        assert len(want) > 10 and got == want
    assert [key[0] for key in wm._prices].count("kv") == 2 * len(wm._region_pairs())  # two lengths priced
