"""Decode with fewer collectives: the merging allreduce, flash-style decode attention, RMSNorm
fused into its GEMV, and the K-tree chosen per reduction. Numerics against numpy; costs
against K-tree cycles counted here from the wafer's constants (SPEC section 3), not from
the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from waferllm.engine.layouts import HeadLayout
from waferllm.errors import MeshError
from waferllm.hardware import get_wafer
from waferllm.kernels.decode_attention import decode_attention
from waferllm.kernels.layer_ops import rmsnorm
from waferllm.kernels.meshgemv import gemv
from waferllm.kernels.norm_gemv import norm_gemv
from waferllm.mesh import Mesh, Region, comm
from waferllm.mesh.tensor import DistTensor, QuantTensor
from waferllm.models import quant
from waferllm.models.testing import tiny_config

#: op counts unlike the presets', so that a cost that ignored them would show
WAFER = get_wafer("wse2").replace(ops_exp=7.0, ops_div=3.0)


def _mesh(rows, cols=None, mode="numeric", wafer=WAFER):
    cols = rows if cols is None else cols
    return Mesh(Region(wafer, rows, cols, name=f"{rows}x{cols}"), mode=mode)


def _levels(n, k, g):
    """(relays, spacing) of every level of a K-tree over n PEs in groups of g (the last level
    takes every member left)."""
    out, members, spacing, level = [], n, 1, 1
    while members > 1:
        size = members if level >= k or members <= g else g
        out.append((math.ceil((size - 1) / 2), spacing))
        members, spacing, level = math.ceil(members / size), spacing * size, level + 1
    return out


def ktree_cycles(w, n, k, g, nbytes, allreduce=True):
    """One K-tree (all)reduce: the collective's fixed cost, then per level a message whose head
    crosses relays x spacing hops and the relays, its body streaming behind; the multicast back
    crosses half the line."""
    if n <= 1:
        return 0.0
    body = math.ceil(nbytes / (w.link_bits_per_cycle / 8))

    def msg(hops, relays):
        return 2 * w.ramp_cycles + w.alpha_cycles * hops + w.beta_cycles * relays + body

    total = w.collective_overhead_cycles + sum(msg(s * sp, s) for s, sp in _levels(n, k, g))
    return total + (msg(math.ceil((n - 1) / 2), 0) if allreduce else 0.0)


def default_group(n, k):
    """The group the paper's schedule uses: comm picks it; read it back from the schedule."""
    phases, _ = comm.reduce_schedule(n, "ktree", k)
    return phases[1].spacing if len(phases) > 2 else n


def events(mesh, kind=None):
    return [e for e in mesh.ledger.events if kind is None or e.kind == kind]


# ------------------------------------------------------------------ allreduce_combine


def test_combine_merges_level_by_level_over_the_ktree_groups():
    """With a mean (not associative over uneven groups) the grouping shows: 7 PEs in groups of
    3 are averaged as [0..2], [3..5], [6], then the three results."""
    m = _mesh(7, 2)
    rng = np.random.default_rng(0)
    tiles = rng.standard_normal((7, 2, 3)).astype(np.float32)
    t = DistTensor(m, (2 * 3,), ("x",), "fp32", tiles)
    out = comm.allreduce_combine(t, "y", lambda x, ax: x.mean(axis=ax, keepdims=True), k=2, group=3)
    expect = np.mean([tiles[0:3].mean(0), tiles[3:6].mean(0), tiles[6]], axis=0)
    np.testing.assert_allclose(out.tiles, np.broadcast_to(expect, tiles.shape), rtol=1e-6)
    assert out.partial is None
    # along x: the same over each row's columns (one level: K=1)
    t2 = DistTensor(m, (7 * 3,), ("y",), "fp32", tiles)
    out2 = comm.allreduce_combine(t2, "x", lambda x, ax: x.max(axis=ax, keepdims=True), k=1)
    np.testing.assert_array_equal(out2.tiles, np.broadcast_to(tiles.max(1, keepdims=True), tiles.shape))


@pytest.mark.parametrize("n,k,g", [(7, 2, 3), (12, 3, 2), (5, 1, None), (30, 2, None)])
def test_combine_costs_the_ktree_allreduce_plus_its_merges(n, k, g):
    m = _mesh(n, 3)
    t = DistTensor(m, (3 * 5,), ("x",), "fp32", np.ones((n, 3, 5), np.float32))
    out = comm.allreduce_combine(t, "y", lambda x, ax: x.sum(axis=ax, keepdims=True), k=k, group=g,
                                 bytes_per_pe=12, merge_ops=10.0, name="c")
    np.testing.assert_array_equal(out.tiles, np.full((n, 3, 5), float(n)))
    g = g or default_group(n, k)
    [comm_ev] = events(m, "comm")
    assert comm_ev.cycles == pytest.approx(ktree_cycles(WAFER, n, k, g, 12))
    # a level of r relays ends at a root merging both sides: r + 1 merges one after another
    merges = sum(r + 1 for r, _ in _levels(n, k, g))
    [merge] = [e for e in events(m) if e.name == "c.merge"]
    assert merge.kind == "compute" and merge.cycles == merges * math.ceil(10 / WAFER.fp32_macs_per_cycle)
    assert merge.counters["flops"] == 10 * (n - 1) * 3  # every non-root state merged once, on every line
    # the same schedule and price as the plain sum-allreduce of that many bytes
    m2 = _mesh(n, 3)
    comm.allreduce(DistTensor(m2, (3 * 3,), ("x",), "fp32", np.ones((n, 3, 3), np.float32)), "y", k=k, group=g)
    assert events(m2, "comm")[0].cycles == comm_ev.cycles
    dry = _mesh(n, 3, mode="dry")
    comm.allreduce_combine(DistTensor(dry, (15,), ("x",), "fp32"), "y", None, k=k, group=g, bytes_per_pe=12,
                           merge_ops=10.0)
    assert dry.ledger.cycles == m.ledger.cycles


def test_combine_refuses_a_split_axis():
    m = _mesh(3)
    t = m.place(np.ones((3, 3), np.float32), ("y", "x"))
    with pytest.raises(MeshError, match="a logical dim is split along it"):
        comm.allreduce_combine(t, "y", lambda x, ax: x)


# ------------------------------------------------------------------ fused decode attention


def _attention_case(rng, heads, kv_heads, head_dim, n, slots, counts):
    cfg = tiny_config(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
    hl = HeadLayout(heads, kv_heads, head_dim, n)
    valid = np.arange(slots)[None, :] < np.asarray(counts)[:, None]
    q = rng.standard_normal(heads * head_dim).astype(np.float32)
    K = rng.standard_normal((n * slots, kv_heads * head_dim)).astype(np.float32)
    V = rng.standard_normal((n * slots, kv_heads * head_dim)).astype(np.float32)
    return cfg, hl, valid, q, K, V


def _run_attention(mesh, hl, valid, q, K, V, cfg, **kw):
    qt = mesh.place(hl.take_cols(q[None], hl.q_cols)[0], ("x",), "fp32")
    kt = mesh.place(hl.from_original_kv(K).T.copy(), ("x", "y"), "fp32")
    vt = mesh.place(hl.from_original_kv(V), ("y", "x"), "fp32")
    return decode_attention(qt, kt, vt, valid, hl.head_of_pos, cfg.num_kv_heads, 1 / math.sqrt(cfg.head_dim), **kw)


@pytest.mark.parametrize("heads,kv_heads,head_dim,n,slots,counts", [
    (6, 3, 10, 4, 5, [4, 5, 5, 3]),  # GQA
    (4, 4, 8, 3, 3, [3, 0, 2]),  # MHA, one row without a token yet
    (8, 1, 6, 5, 2, [0, 1, 2, 0, 2]),  # MQA, several empty rows
    (6, 3, 10, 7, 4, [1, 0, 0, 0, 0, 0, 0]),  # a single token
])
@pytest.mark.parametrize("k", [2, "tuned"])
def test_fused_attention_matches_per_head_numpy(heads, kv_heads, head_dim, n, slots, counts, k):
    rng = np.random.default_rng(n * heads)
    cfg, hl, valid, q, K, V = _attention_case(rng, heads, kv_heads, head_dim, n, slots, counts)
    mesh = _mesh(n)
    out = _run_attention(mesh, hl, valid, q, K, V, cfg, k=k, fused=True)
    got = np.zeros(heads * head_dim, np.float32)
    real = hl.q_cols >= 0
    got[hl.q_cols[real]] = out.to_global()[real]
    held = valid.reshape(-1)
    r, D = heads // kv_heads, head_dim
    for h in range(heads):
        g = h // r
        s = K[held][:, g * D:(g + 1) * D].astype(np.float64) @ q[h * D:(h + 1) * D] / math.sqrt(D)
        p = np.exp(s - s.max())
        want = (p / p.sum()) @ V[held][:, g * D:(g + 1) * D]
        np.testing.assert_allclose(got[h * D:(h + 1) * D], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.to_global()[~real], 0.0)  # padding features stay zero
    dry = _mesh(n, mode="dry")
    dq = dry.place((hl.q_padded,), ("x",), "fp32")
    dk = dry.place((hl.kv_padded, n * slots), ("x", "y"), "fp32")
    dv = dry.place((n * slots, hl.kv_padded), ("y", "x"), "fp32")
    decode_attention(dq, dk, dv, None, hl.head_of_pos, kv_heads, 1 / math.sqrt(D), k=k, fused=True)
    assert dry.ledger.cycles == mesh.ledger.cycles


def test_fused_attention_issues_one_collective_along_y_carrying_two_words_per_head_row():
    rng = np.random.default_rng(1)
    n, slots = 4, 5
    cfg, hl, valid, q, K, V = _attention_case(rng, 6, 3, 10, n, slots, [4, 5, 5, 3])
    paper, fused = _mesh(n), _mesh(n)
    _run_attention(paper, hl, valid, q, K, V, cfg)
    _run_attention(fused, hl, valid, q, K, V, cfg, fused=True)
    assert [e.name for e in events(paper, "comm")] == ["qk_allreduce", "softmax.allreduce_max",
                                                       "softmax.allreduce_sum", "pv_allreduce"]
    assert [e.name for e in events(fused, "comm")] == ["qk_allreduce", "softmax_pv_allreduce"]
    r, F = hl.group, hl.col_features
    held = max(len(set(col[col >= 0])) for col in hl.head_of_pos)  # kv heads among a column's features
    nbytes = 4 * (r * F + 2 * held * r)
    [ar] = [e for e in events(fused) if e.name == "softmax_pv_allreduce"]
    assert ar.cycles == pytest.approx(ktree_cycles(WAFER, n, 2, default_group(n, 2), nbytes))
    # a merge per head row: difference, |.|, one exp, max, one multiply-add, before forwarding
    [merge] = [e for e in events(fused) if e.name == "softmax_pv_allreduce.merge"]
    merges = sum(s + 1 for s, _ in _levels(n, 2, default_group(n, 2)))
    assert merge.cycles == merges * held * r * (4 + WAFER.ops_exp)
    # the final division: one per output value of the tile at the wafer's division cost
    [div] = [e for e in events(fused) if e.name == "softmax_pv.div"]
    assert div.cycles == math.ceil(r * F * WAFER.ops_div / WAFER.fp32_macs_per_cycle) + WAFER.op_overhead_cycles


def test_fused_attention_is_cheaper_on_a_decode_grid():
    """LLaMA3-8B's heads on 360 x 360 PEs with a 4K cache: one collective instead of three along y."""
    cfg = tiny_config(num_heads=32, num_kv_heads=8, head_dim=128)
    n, slots = 360, 12
    hl = HeadLayout(32, 8, 128, n)
    cycles = {}
    for fused in (False, True):
        m = _mesh(n, mode="dry", wafer=get_wafer("wse2"))
        o = decode_attention(m.place((hl.q_padded,), ("x",), "fp32"), m.place((hl.kv_padded, n * slots), ("x", "y"),
                             "fp16"), m.place((n * slots, hl.kv_padded), ("y", "x"), "fp16"), None, hl.head_of_pos,
                             cfg.num_kv_heads, 0.1, fused=fused)
        assert o.shape == (hl.q_padded,) and o.layout == ("x",)
        cycles[fused] = m.ledger.cycles
    assert cycles[True] < cycles[False] - 500


# ------------------------------------------------------------------ RMSNorm fused into the GEMV


def _norm_ref(h, g, w, eps):
    h64 = h.astype(np.float64)
    return (h64 / np.sqrt((h64 * h64).mean(-1, keepdims=True) + eps) * g) @ w


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 4), (5, 2)])
@pytest.mark.parametrize("layout", ["yx", "xy"])
@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_norm_gemv_matches_numpy(rows, cols, layout, batch, dtype):
    rng = np.random.default_rng(rows * 10 + cols)
    K, N, eps = 4 * rows + 3, 3 * cols + 2, 1e-5
    h = rng.standard_normal((batch, K) if batch else (K,)).astype(np.float32)
    g = rng.uniform(0.5, 1.5, K).astype(np.float32)
    w = rng.uniform(-1, 1, (K, N)).astype(np.float32)
    wl = ("y", "x") if layout == "yx" else ("x", "y")
    m = _mesh(rows, cols)
    ht = m.place(h, (wl[0],) if batch is None else (None, wl[0]), "fp32")
    res = norm_gemv(ht, m.place(g, (wl[0],), "fp32"), m.place(w, wl, dtype), eps)
    assert res.out.shape == ((N,) if batch is None else (batch, N))
    assert res.out.layout == ((wl[1],) if batch is None else (None, wl[1]))
    ref = _norm_ref(h, g, w.astype(np.float16 if dtype == "fp16" else np.float32), eps)
    np.testing.assert_allclose(res.out.to_global(), ref, rtol=1e-5, atol=1e-5)
    dry = _mesh(rows, cols, mode="dry")
    norm_gemv(dry.place(h.shape, ht.layout, "fp32"), dry.place((K,), (wl[0],), "fp32"), dry.place((K, N), wl, dtype),
              eps)
    assert dry.ledger.cycles == m.ledger.cycles


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_norm_gemv_with_quantised_weights(fmt):
    rng = np.random.default_rng(7)
    n, K, N, eps = 3, 96, 20, 1e-6
    h, g = rng.standard_normal(K).astype(np.float32), rng.uniform(0.5, 1.5, K).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    qm = quant.quantize(w, fmt)
    m = _mesh(n)
    tk = -(-K // n)
    wt = QuantTensor.from_global(m, qm.q, ("y", "x"), fmt, scales=qm.scales(), compute_dtype="fp16",
                                 scale_slots=quant.scale_slots(np.arange(K), tk))
    res = norm_gemv(m.place(h, ("y",), "fp32"), m.place(g, ("y",), "fp32"), wt, eps)
    deq = (qm.q.astype(np.float32) * qm.scales().astype(np.float32)).astype(np.float16)  # rounded as the PEs hold it
    np.testing.assert_allclose(res.out.to_global(), _norm_ref(h, g, deq, eps), rtol=1e-5, atol=1e-5)
    [local] = [e for e in events(m) if e.name == "norm_gemv.local_gemv"]
    tn = -(-N // n)
    ops = tk * tn * WAFER.dequant_ops(fmt)  # every stored value dequantised in the SIMD unit
    lanes = WAFER.macs_per_cycle("fp16")
    assert local.cycles == math.ceil(tk * tn / lanes) + WAFER.op_overhead_cycles + math.ceil(ops / lanes)


def test_norm_gemv_issues_one_collective_one_word_per_token_larger():
    n, K, N, B = 6, 50, 40, 2
    m = _mesh(n, mode="dry")
    norm_gemv(m.place((B, K), (None, "y"), "fp32"), m.place((K,), ("y",), "fp32"), m.place((K, N), ("y", "x"), "fp16"),
              1e-5, k=3)
    [ar] = events(m, "comm")
    tn = -(-N // n)
    assert ar.cycles == pytest.approx(ktree_cycles(WAFER, n, 3, default_group(n, 3), 4 * B * (tn + 1)))
    [local] = [e for e in events(m) if e.name == "norm_gemv.local_gemv"]
    assert local.cycles == math.ceil(B * -(-K // n) * tn / WAFER.macs_per_cycle("fp16")) + WAFER.op_overhead_cycles
    assert sum(e.kind == "overhead" for e in events(m)) == 1  # one task: one switch


def test_norm_gemv_beats_rmsnorm_then_gemv_on_a_decode_grid():
    wafer, n, E, N = get_wafer("wse2"), 360, 4096, 6144
    paper, fused = _mesh(n, mode="dry", wafer=wafer), _mesh(n, mode="dry", wafer=wafer)
    x = rmsnorm(paper.place((E,), ("y",), "fp32"), paper.place((E,), ("y",), "fp32"), 0, 1e-5, "fp32")
    gemv(x, paper.place((E, N), ("y", "x"), "fp16"), out_dtype="fp32")
    norm_gemv(fused.place((E,), ("y",), "fp32"), fused.place((E,), ("y",), "fp32"),
              fused.place((E, N), ("y", "x"), "fp16"), 1e-5)
    assert len(events(paper, "comm")) == 2 and len(events(fused, "comm")) == 1
    assert fused.ledger.cycles < paper.ledger.cycles - 400


def test_norm_gemv_errors():
    m = _mesh(2)
    g = m.place(np.ones(4, np.float32), ("y",), "fp32")
    w = m.place(np.ones((4, 3), np.float32), ("y", "x"), "fp32")
    with pytest.raises(MeshError, match=r"needs h \('y',\) and its norm weight"):
        norm_gemv(m.place(np.ones(4, np.float32), ("x",), "fp32"), g, w, 1e-5)
    with pytest.raises(MeshError, match="h has 5 features"):
        norm_gemv(m.place(np.ones(5, np.float32), ("y",), "fp32"), g, m.place(np.ones((5, 3), np.float32), ("y", "x")),
                  1e-5)
    with pytest.raises(MeshError, match=r"needs h \[K\] \(or a batch"):
        norm_gemv(m.place(np.ones((2, 2, 4), np.float32), (None, None, "y"), "fp32"), g, w, 1e-5)


# ------------------------------------------------------------------ K chosen per reduction


def _brute_force(w, n, nbytes, allreduce=True):
    """(cycles, k, g) of the fastest K-tree over K 1..4 and every group size, priced here."""
    return min((ktree_cycles(w, n, k, g, nbytes, allreduce), k, g)
               for k in (1, 2, 3, 4) for g in ([n] if k == 1 else range(2, max(n, 3))))


@pytest.mark.parametrize("n", [2, 3, 8, 24, 60, 120, 360])
@pytest.mark.parametrize("nbytes", [4, 96, 1024, 16384])
def test_best_ktree_is_the_fastest_and_never_slower_than_k2(n, nbytes):
    wafer = get_wafer("wse2")
    m = _mesh(n, mode="dry", wafer=wafer)
    k, g = comm.best_ktree(m, "y", nbytes)
    assert (k, g) == comm.best_ktree(_mesh(n, mode="dry", wafer=wafer), "y", nbytes)  # deterministic
    chosen = ktree_cycles(wafer, n, k, g, nbytes)
    assert chosen == pytest.approx(_brute_force(wafer, n, nbytes)[0])
    assert chosen <= ktree_cycles(wafer, n, 2, default_group(n, 2), nbytes) + 1e-9
    # and what the ledger charges for the allreduce itself
    led = {}
    for kk, gg in ((k, g), (2, None)):
        mm = _mesh(n, mode="dry", wafer=wafer)
        comm.allreduce(mm.place((n * max(nbytes // 4, 1),), ("x",), "fp32"), "y", k=kk, group=gg)
        led[(kk, gg)] = mm.ledger.cycles
    assert led[(k, g)] <= led[(2, None)]


def test_best_ktree_leaves_k2_where_the_model_says_so():
    """On a 360-PE line a one-word payload is cheapest with more levels (fewer relays) and a
    16 KB one with a single level (each level streams the payload once more)."""
    wafer = get_wafer("wse2")
    m = _mesh(360, mode="dry", wafer=wafer)
    for nbytes in (4, 16384):
        best = _brute_force(wafer, 360, nbytes)
        k2 = ktree_cycles(wafer, 360, 2, default_group(360, 2), nbytes)
        assert best[1] != 2 and best[0] < k2  # the model's own verdict, priced here
        k, g = comm.best_ktree(m, "y", nbytes)
        assert k == best[1] and ktree_cycles(wafer, 360, k, g, nbytes) == pytest.approx(best[0])
    assert comm.best_ktree(m, "y", 4)[0] > 2 and comm.best_ktree(m, "y", 16384)[0] == 1
    # a reduce to a root (no multicast back) is priced without it
    assert ktree_cycles(wafer, 360, *comm.best_ktree(m, "y", 4, allreduce=False), 4, False) == pytest.approx(
        _brute_force(wafer, 360, 4, allreduce=False)[0])
    assert comm.ktree_for(m, "y", 4, 2, None) == (2, None)
    assert comm.ktree_for(m, "y", 4, "tuned") == comm.best_ktree(m, "y", 4)
