"""Kernels equal numpy, and their costs have the shape the SPEC's tables say they have."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waferllm.errors import MeshError, RouteOverflowError
from waferllm.hardware import get_wafer
from waferllm.kernels import allgather_gemm, cannon, dist_gemm_t, gemv, meshgemm, place_b, summa
from waferllm.kernels.meshgemm import meshgemm_rect
from waferllm.mesh import Mesh, Region
from waferllm.mesh.cost import message_cycles

WAFER = get_wafer("wse2")
GEMM_ALGOS = ("meshgemm", "cannon", "summa", "allgather")
NP = {"fp32": np.float32, "fp16": np.float16}
RTOL = {"fp32": 1e-4, "fp16": 2e-3}


def _mesh(rows, cols=None, mode="numeric", wafer=WAFER, **kw):
    cols = rows if cols is None else cols
    return Mesh(Region(wafer, rows, cols, name=f"{rows}x{cols}"), mode=mode, **kw)


def _rand(rng, shape):
    return rng.uniform(-1, 1, shape).astype(np.float32)


def _check(got, a, b, dtype, ref=None):
    """|got - a@b| within the dtype's tolerance, relative to max(|a| @ |b|) (inputs rounded as placed)."""
    a64 = np.asarray(a, NP[dtype]).astype(np.float64)
    b64 = np.asarray(b, NP[dtype]).astype(np.float64)
    ref = a64 @ b64 if ref is None else ref
    scale = (np.abs(a64) @ np.abs(b64)).max() if a64.size and b64.size else 1.0
    err = np.abs(np.asarray(got, np.float64) - ref).max() if ref.size else 0.0
    assert err <= RTOL[dtype] * scale + 1e-30, (err, scale)
    return err


def run_gemm(algo, mesh, a, b, dtype="fp32"):
    """a, b: host arrays (numeric) or shape tuples (dry)."""
    if mesh.rows != mesh.cols:
        return meshgemm_rect(mesh, a, b, dtype=dtype, ring="interleave" if algo == "meshgemm" else "plain")
    at = mesh.place(a, ("y", "x"), dtype, name="A")
    if algo in ("meshgemm", "cannon"):
        bt = place_b(mesh, b, dtype, ring="interleave" if algo == "meshgemm" else "plain")
        return (meshgemm if algo == "meshgemm" else cannon)(at, bt)
    bt = mesh.place(b, ("y", "x"), dtype, name="B")
    return (summa if algo == "summa" else allgather_gemm)(at, bt)


# ------------------------------------------------------------------ GEMM numerics


@pytest.mark.parametrize("algo", GEMM_ALGOS)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_gemm_matches_numpy(algo, n, dtype):
    rng = np.random.default_rng(n)
    m, k, nn = 4 * n + 3, 3 * n + 2, 5 * n + 1  # never divisible by the grid (n > 1)
    a, b = _rand(rng, (m, k)), _rand(rng, (k, nn))
    res = run_gemm(algo, _mesh(n), a, b, dtype)
    assert res.out.shape == (m, nn) and res.out.dtype == dtype
    _check(res.out.to_global(), a, b, dtype)


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(GEMM_ALGOS), st.integers(1, 6), st.integers(1, 20), st.integers(1, 20), st.integers(1, 20),
       st.sampled_from(["fp32", "fp16"]), st.integers(0, 99))
def test_gemm_random_shapes(algo, n, m, k, nn, dtype, seed):
    rng = np.random.default_rng(seed)
    a, b = _rand(rng, (m, k)), _rand(rng, (k, nn))
    res = run_gemm(algo, _mesh(n), a, b, dtype)
    _check(res.out.to_global(), a, b, dtype)


@pytest.mark.parametrize("algo", GEMM_ALGOS)
def test_gemm_dry_run_charges_the_same(algo):
    rng = np.random.default_rng(0)
    a, b = _rand(rng, (17, 13)), _rand(rng, (13, 11))
    num = run_gemm(algo, _mesh(4), a, b, "fp16").report
    dry = run_gemm(algo, _mesh(4, mode="dry"), (17, 13), (13, 11), "fp16").report
    # a dry run replays identical steps as one multiplied charge: equal up to float rounding
    for key in ("cycles", "compute_cycles", "comm_cycles", "exposed_comm_cycles", "flops", "bytes_moved",
                "routes_per_pe", "sram_peak_bytes_per_pe"):
        assert getattr(num, key) == pytest.approx(getattr(dry, key), rel=1e-12), key


@pytest.mark.parametrize("n", [3, 4, 7])
def test_dry_cannon_steps_replay_exactly(n):
    """The dry run's replayed steps cost what executing every step costs."""
    mg = importlib.import_module("waferllm.kernels.meshgemm")  # the package exports a function of that name

    reports = []
    for replay in (True, False):
        mesh = _mesh(n, mode="dry")
        a = mesh.place((5 * n, 3 * n), ("y", "x"), "fp16", name="A")
        b = mg.place_b(mesh, (3 * n, 2 * n), "fp16")
        orig = mg.cannon_schedule
        mg.cannon_schedule = lambda *args, **kw: orig(*args, **kw, replay_steps=replay)
        try:
            reports.append(mg.meshgemm(a, b).report)
        finally:
            mg.cannon_schedule = orig
    fast, full = reports
    for key in ("cycles", "compute_cycles", "comm_cycles", "exposed_comm_cycles", "overhead_cycles", "flops",
                "bytes_moved", "routing_stages", "routes_per_pe", "sram_peak_bytes_per_pe"):
        assert getattr(fast, key) == pytest.approx(getattr(full, key), rel=1e-12), key


# ------------------------------------------------------------------ non-square MeshGEMM (lcm folding)


@pytest.mark.parametrize("rows,cols", [(2, 3), (3, 5), (4, 6), (3, 2), (1, 4), (4, 1)])
@pytest.mark.parametrize("algo", ["meshgemm", "cannon"])
def test_meshgemm_rect_matches_numpy(rows, cols, algo):
    rng = np.random.default_rng(rows * 10 + cols)
    for (m, k, n), dtype in (((23, 17, 29), "fp32"), ((8, 31, 5), "fp16")):
        a, b = _rand(rng, (m, k)), _rand(rng, (k, n))
        mesh = _mesh(rows, cols)
        res = run_gemm(algo, mesh, a, b, dtype)
        assert res.out.mesh is mesh and res.out.layout == ("y", "x")
        _check(res.out.to_global(), a, b, dtype)
        dry = run_gemm(algo, _mesh(rows, cols, mode="dry"), (m, k), (k, n), dtype)
        assert dry.report.cycles == pytest.approx(res.report.cycles, rel=1e-12)
        assert dry.report.sram_peak_bytes_per_pe == res.report.sram_peak_bytes_per_pe


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_meshgemm_rect_on_square_equals_meshgemm(n):
    """With no folding the lcm path charges exactly what the square kernel charges."""
    rng = np.random.default_rng(n)
    a, b = _rand(rng, (19, 14)), _rand(rng, (14, 9))
    sq = run_gemm("meshgemm", _mesh(n), a, b)
    rect = meshgemm_rect(_mesh(n), a, b, dtype="fp32")
    np.testing.assert_allclose(rect.out.to_global(), sq.out.to_global(), rtol=1e-6, atol=1e-6)
    for key in ("cycles", "compute_cycles", "comm_cycles", "exposed_comm_cycles", "overhead_cycles", "flops",
                "bytes_moved", "routing_stages"):
        assert getattr(rect.report, key) == getattr(sq.report, key), key


def test_meshgemm_rect_folding_costs():
    """Each physical PE does the compute of all its logical PEs; work per PE is balanced."""
    rep = meshgemm_rect(_mesh(4, 6, mode="dry"), (120, 120), (120, 120), dtype="fp16").report
    assert rep.extra["logical_grid"] == 12 and rep.extra["fold"] == (3, 2)
    assert rep.flops == pytest.approx(2 * 120**3)
    assert rep.routes_per_pe == 8  # send + receive each way, per ring, no pass-through
    # every PE holds 3x2 logical tiles of A (10x10 fp16) + B + fp32 accumulator, at least
    assert rep.sram_peak_bytes_per_pe >= 6 * (200 + 200 + 400)


# ------------------------------------------------------------------ cost shape (SPEC section 2 table)


def _tile_mesh(n, algo, t=4, mode="dry", **kw):
    """An n x n dry GEMM with t x t tiles per PE."""
    return run_gemm(algo, _mesh(n, mode=mode, **kw), (n * t, n * t), (n * t, n * t), "fp16")


def test_routes_per_pe():
    for n in (4, 16, 30):
        assert _tile_mesh(n, "meshgemm").report.routes_per_pe == 6
        assert _tile_mesh(n, "cannon").report.routes_per_pe == 6
        s = _tile_mesh(n, "summa").report
        assert s.routes_per_pe == n
        assert s.relayed == (n > 24)
        assert not _tile_mesh(n, "meshgemm").report.relayed
    with pytest.raises(RouteOverflowError, match="route overflow on region .* needs 25 routes per PE"):
        run_gemm("summa", _mesh(25, mode="dry", route_policy="raise"), (100, 100), (100, 100), "fp16")
    run_gemm("summa", _mesh(24, mode="dry", route_policy="raise"), (96, 96), (96, 96), "fp16")


def _per_event(rep_mesh, name):
    ev = [e.cycles for e in rep_mesh.ledger.events if e.name == name]
    assert ev, name
    return ev


def test_skew_rounds_at_most_half():
    for n in (2, 3, 7, 8, 16):
        mesh = _mesh(n, mode="dry")
        run_gemm("meshgemm", mesh, (4 * n, 4 * n), (4 * n, 4 * n), "fp16")
        (skew,) = _per_event(mesh, "skew_A")
        one_round = message_cycles(WAFER, 4 * 4 * 2, 2 if n > 2 else 1)
        assert skew / one_round == n // 2


def test_critical_path_per_step():
    """MeshGEMM's per-step shift does not grow with N (2 hops); Cannon's wrap-around does."""
    mg, ca = [], []
    for n in (4, 8, 16, 32):
        m1, m2 = _mesh(n, mode="dry"), _mesh(n, mode="dry")
        run_gemm("meshgemm", m1, (4 * n, 4 * n), (4 * n, 4 * n), "fp16")
        run_gemm("cannon", m2, (4 * n, 4 * n), (4 * n, 4 * n), "fp16")
        mg.append(set(_per_event(m1, "meshgemm.shift_A")))
        ca.append(set(_per_event(m2, "cannon.shift_A")))
    assert all(len(s) == 1 for s in mg + ca)
    mg = [s.pop() for s in mg]
    ca = [s.pop() for s in ca]
    assert len(set(mg)) == 1
    assert all(x < y for x, y in zip(ca, ca[1:]))
    assert ca[-1] > mg[-1]


@pytest.mark.parametrize("algo", GEMM_ALGOS)
def test_cost_monotone_in_size(algo):
    cyc = [run_gemm(algo, _mesh(6, mode="dry"), (s, s), (s, s), "fp16").report.cycles for s in (6, 12, 30, 60, 96)]
    assert all(x <= y for x, y in zip(cyc, cyc[1:])), cyc
    cyc = [meshgemm_rect(_mesh(2, 3, mode="dry"), (s, s), (s, s), dtype="fp16").report.cycles for s in (6, 12, 30, 60)]
    assert all(x <= y for x, y in zip(cyc, cyc[1:])), cyc


def test_skew_reuse():
    """Q, K, V share one skew of A: the second GEMM gives the same numbers for fewer cycles."""
    rng = np.random.default_rng(3)
    mesh = _mesh(5)
    a_h, b1_h, b2_h = _rand(rng, (23, 17)), _rand(rng, (17, 12)), _rand(rng, (17, 14))
    a = mesh.place(a_h, ("y", "x"), "fp32", name="A")
    r1 = meshgemm(a, place_b(mesh, b1_h, "fp32"))
    b2 = place_b(mesh, b2_h, "fp32")
    fresh = meshgemm(a, b2)
    reused = meshgemm(r1.state["a_skewed"], b2, a_skewed=True)
    np.testing.assert_array_equal(reused.out.to_global(), fresh.out.to_global())
    _check(reused.out.to_global(), a_h, b2_h, "fp32")
    assert reused.report.cycles < fresh.report.cycles
    # the skewed A comes home after N steps: reusable again
    again = meshgemm(reused.state["a_skewed"], b2, a_skewed=True)
    np.testing.assert_array_equal(again.out.to_global(), fresh.out.to_global())


def test_gemm_errors():
    mesh = _mesh(3)
    a = mesh.place(np.ones((6, 4), np.float32), ("y", "x"), "fp32")
    b = place_b(mesh, np.ones((5, 6), np.float32), "fp32")
    with pytest.raises(MeshError, match="inner dims"):
        meshgemm(a, b)
    with pytest.raises(MeshError, match="square"):
        meshgemm(_mesh(2, 3).place(np.ones((4, 4), np.float32), ("y", "x"), "fp32"), b)
    with pytest.raises(MeshError, match="with equal K"):
        meshgemm_rect(_mesh(2, 3), np.ones((4, 5)), np.ones((4, 5)))
    with pytest.raises(MeshError, match="numeric mesh needs host arrays"):
        meshgemm_rect(_mesh(2, 3), (4, 5), (5, 4))  # shapes on a numeric mesh


@pytest.mark.parametrize("budget,relayed", [(24, False), (3, True)])
def test_allgather_stages_follow_the_routes(budget, relayed):
    """Each of the N-1 ring steps moves A's and B's tiles 2 hops at once; on hardware routes
    nothing is relayed, past the router's budget (N routes) every hop is a software relay."""
    n, t = 4, 3
    wafer = WAFER.replace(routable_routes_per_pe=budget)
    rep = run_gemm("allgather", _mesh(n, mode="dry", wafer=wafer), (n * t, n * t), (n * t, n * t), "fp16").report
    assert rep.relayed == relayed
    stages = 2 if relayed else 0
    tile = t * t * 2
    step = (2 * wafer.ramp_cycles + 2 * wafer.alpha_cycles + stages * wafer.beta_cycles
            + np.ceil(tile / wafer.link_bytes_per_cycle))
    assert rep.comm_cycles == (n - 1) * step
    assert rep.routing_stages == 2 * (n - 1) * stages  # A's and B's transfers
    assert rep.bytes_moved == 2 * tile * (n - 1) * n * n


# ------------------------------------------------------------------ dist-GEMM-T


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("heads", [(), (3,)])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_dist_gemm_t(n, heads, dtype):
    rng = np.random.default_rng(n)
    lq, lk, d = 3 * n + 1, 2 * n + 3, 4 * n + 1
    qh, kh = _rand(rng, (*heads, lq, d)), _rand(rng, (*heads, lk, d))
    lay = (*(None,) * len(heads), "y", "x")
    mesh = _mesh(n)
    res = dist_gemm_t(mesh.place(qh, lay, dtype, name="Q"), mesh.place(kh, lay, dtype, name="K"))
    assert res.out.shape == (*heads, lq, lk) and res.out.layout == lay
    got = res.out.to_global()
    q64, k64 = qh.astype(NP[dtype]).astype(np.float64), kh.astype(NP[dtype]).astype(np.float64)
    ref = q64 @ np.swapaxes(k64, -1, -2)
    scale = (np.abs(q64) @ np.abs(np.swapaxes(k64, -1, -2))).max()
    assert np.abs(got - ref).max() <= RTOL["fp32"] * scale  # the scores stay fp32
    dry = _mesh(n, mode="dry")
    rd = dist_gemm_t(dry.place((*heads, lq, d), lay, dtype), dry.place((*heads, lk, d), lay, dtype))
    # a dry run replays identical steps: the same cost, summed in another order
    assert rd.report.cycles == pytest.approx(res.report.cycles, rel=1e-12)


# ------------------------------------------------------------------ GEMV


def _gemv(mesh, x, w, dtype, algo, layout="yx", **kw):
    wl = ("y", "x") if layout == "yx" else ("x", "y")
    return gemv(mesh.place(x, (wl[0],), dtype, name="x"), mesh.place(w, wl, dtype, name="W"), algo=algo, **kw)


@pytest.mark.parametrize("algo,kk", [("meshgemv", 1), ("meshgemv", 2), ("meshgemv", 3), ("pipeline", 2), ("ring", 2)])
@pytest.mark.parametrize("layout", ["yx", "xy"])
@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 2), (3, 3), (5, 4), (7, 7)])
def test_gemv_matches_numpy(algo, kk, layout, rows, cols):
    rng = np.random.default_rng(rows * cols)
    k, n = 4 * rows + 3, 3 * cols + 2
    x, w = _rand(rng, (k,)), _rand(rng, (k, n))
    for dtype in ("fp32", "fp16"):
        res = _gemv(_mesh(rows, cols), x, w, dtype, algo, layout, k=kk)
        assert res.out.layout == (("x",) if layout == "yx" else ("y",))
        _check(res.out.to_global()[None, :], x[None, :], w, dtype)
        dry = _gemv(_mesh(rows, cols, mode="dry"), (k,), (k, n), dtype, algo, layout, k=kk)
        assert dry.report.cycles == res.report.cycles


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(["meshgemv", "pipeline", "ring"]), st.integers(1, 3), st.integers(1, 8), st.integers(1, 8),
       st.integers(1, 40), st.integers(1, 40), st.sampled_from(["yx", "xy"]), st.integers(0, 99))
def test_gemv_random(algo, kk, rows, cols, k, n, layout, seed):
    rng = np.random.default_rng(seed)
    x, w = _rand(rng, (k,)), _rand(rng, (k, n))
    res = _gemv(_mesh(rows, cols), x, w, "fp32", algo, layout, k=kk)
    _check(res.out.to_global()[None, :], x[None, :], w, "fp32")


def test_gemv_allreduce_scaling():
    """At wafer scale the K-tree beats the pipeline and the ring, and needs O(K) routes."""
    def t(algo, g, size=8192):
        return _gemv(_mesh(g, mode="dry"), (size,), (size, size), "fp16", algo).report
    for g in (240, 720):
        mg, pipe, ring = t("meshgemv", g), t("pipeline", g), t("ring", g)
        assert mg.cycles < pipe.cycles and mg.cycles < ring.cycles
        assert mg.routes_per_pe <= 4
    # the pipeline's routing stages grow with N, the K-tree's with ~sqrt(N): its
    # communication grows more slowly (whatever the calibrated beta, as long as it is > 0)
    grow_pipe = t("pipeline", 720).comm_cycles / t("pipeline", 240).comm_cycles
    grow_tree = t("meshgemv", 720).comm_cycles / t("meshgemv", 240).comm_cycles
    assert grow_pipe > 2 and grow_tree < grow_pipe
    assert t("pipeline", 720).routing_stages > 10 * t("meshgemv", 720).routing_stages


def test_gemv_errors():
    mesh = _mesh(2)
    x = mesh.place(np.ones(4, np.float32), ("y",), "fp32")
    w = mesh.place(np.ones((4, 3), np.float32), ("y", "x"), "fp32")
    with pytest.raises(MeshError, match="unknown GEMV"):
        gemv(x, w, algo="tree")
    with pytest.raises(MeshError, match=r"GEMV needs W \(y, x\) with x \(y,\)"):
        gemv(mesh.place(np.ones(4, np.float32), ("x",), "fp32"), w)


# ------------------------------------------------------------------ grouped attention (GQA before the products)


def _head_map(n, tf, hkv, seed):
    """(n, tf) kv head of every feature slot of every PE column; -1 marks padding."""
    rng = np.random.default_rng(seed)
    hop = rng.integers(0, hkv, (n, tf))
    hop[rng.random((n, tf)) < 0.2] = -1
    return hop


@pytest.mark.parametrize("n,hkv,r", [(1, 1, 1), (2, 2, 2), (3, 1, 3), (4, 3, 2)])
def test_grouped_scores_and_pv_match_numpy(n, hkv, r):
    from waferllm.kernels.attention import grouped_pv, grouped_scores

    rng = np.random.default_rng(n * 7 + hkv)
    tf, lq, lk = 3, 2 * n + 1, 3 * n - 1 if n > 1 else 2
    hop = _head_map(n, tf, hkv, n)
    fpad = n * tf
    q, k, v = _rand(rng, (lq, r * fpad)), _rand(rng, (lk, fpad)), _rand(rng, (lk, fpad))
    head = hop.reshape(-1)  # kv feature j*tf + p -> head
    # Q feature j*r*tf + g*tf + p is query head g of the kv head of slot (j, p)
    qg = q.reshape(lq, n, r, tf).transpose(0, 2, 1, 3).reshape(lq, r, fpad)  # [t, g, j*tf+p]
    s_ref = np.zeros((hkv, r, lq, lk))
    for h in range(hkv):
        sel = head == h
        s_ref[h] = np.einsum("tgf,kf->gtk", qg[:, :, sel].astype(np.float64), k[:, sel].astype(np.float64))
    mesh = _mesh(n)
    qt, kt = mesh.place(q, ("y", "x"), "fp32", name="Q"), mesh.place(k, ("y", "x"), "fp32", name="K")
    sres = grouped_scores(qt, kt, hop, hkv, r)
    assert sres.out.layout == (None, None, "y", "x")
    np.testing.assert_allclose(sres.out.to_global(), s_ref, rtol=1e-5, atol=1e-5)
    p = _rand(rng, (hkv, r, lq, lk))
    o_ref = np.zeros((lq, n, r, tf))
    for j in range(n):
        for pp in range(tf):
            if hop[j, pp] >= 0:
                o_ref[:, j, :, pp] = p[hop[j, pp]].astype(np.float64).transpose(1, 0, 2) @ v[:, j * tf + pp]
    pt = mesh.place(p, (None, None, "y", "x"), "fp32", name="P")
    ores = grouped_pv(pt, mesh.place(v, ("y", "x"), "fp32", name="V"), hop)
    np.testing.assert_allclose(ores.out.to_global(), o_ref.reshape(lq, r * fpad), rtol=1e-5, atol=1e-5)
    dry = _mesh(n, mode="dry")
    ds = grouped_scores(dry.place((lq, r * fpad), ("y", "x"), "fp32"), dry.place((lk, fpad), ("y", "x"), "fp32"),
                        hop, hkv, r)
    dp = grouped_pv(dry.place((hkv, r, lq, lk), (None, None, "y", "x"), "fp32"),
                    dry.place((lk, fpad), ("y", "x"), "fp32"), hop)
    # dry runs replay identical steps: the same costs, summed in another order
    assert (ds.report.cycles, dp.report.cycles) == pytest.approx((sres.report.cycles, ores.report.cycles), rel=1e-12)
    # every PE, at each of the n steps, multiplies r query heads' tiles with its own features only;
    # the scores also add each row's n partial tiles (all heads) at every step
    tq, tk = -(-lq // n), -(-lk // n)
    adds = hkv * r * tq * tk * (n - 1) * n * n
    assert ds.report.flops == sres.report.flops == 2 * r * tq * tf * tk * n ** 3 + adds
    assert dp.report.flops == ores.report.flops == 2 * r * tq * tk * tf * n ** 3
