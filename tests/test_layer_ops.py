"""The layer kernels (RMSNorm, softmax, SiLU gate, RoPE, decode attention, argmax) and the
grouped products they use, against numpy; their costs against counts from the tile
shapes and the wafer's constants (per-element op counts included: a wafer with other
counts charges other cycles)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from waferllm.engine.layouts import HeadLayout
from waferllm.hardware import get_wafer
from waferllm.kernels.argmax import argmax
from waferllm.kernels.decode_attention import decode_attention
from waferllm.kernels.layer_ops import masked_softmax, rmsnorm, rope, silu_mul, split_fused
from waferllm.mesh import Mesh, compute
from waferllm.models.reference import rmsnorm as ref_rmsnorm
from waferllm.models.reference import softmax as ref_softmax
from waferllm.models.rope import apply_rope, rope_cos_sin
from waferllm.models.testing import tiny_config

#: op counts unlike the presets', so that a cost that ignored them would show
WAFER = get_wafer("wse2").replace(ops_exp=7.0, ops_silu=9.0, ops_rmsnorm_scale=5.0, ops_rope=11.0, ops_div=3.0)


def vector(elems: int, dtype: str, ops: float = 1.0) -> float:
    """Cycles of an elementwise op from the wafer's constants: the SIMD lanes of the dtype
    and the launch overhead."""
    return math.ceil(elems * ops / WAFER.macs_per_cycle(dtype)) + WAFER.op_overhead_cycles


def event(mesh, name):
    [e] = [e for e in mesh.ledger.events if e.name == name]
    return e


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_rmsnorm_both_layouts(rng):
    n, L, E = 3, 7, 10
    h, w = rng.standard_normal((L, E)).astype(np.float32), rng.standard_normal(E).astype(np.float32)
    expect = ref_rmsnorm(h, w, 1e-5)
    mesh = Mesh.square(WAFER, n)
    out = rmsnorm(mesh.place(h, ("y", "x"), "fp32"), mesh.place(w[None], (None, "x"), "fp32"), 1, 1e-5, "fp32")
    np.testing.assert_allclose(out.to_global(), expect, rtol=1e-5)
    scale = event(mesh, "rmsnorm.scale")
    tile = math.ceil(L / n) * math.ceil(E / n)
    assert scale.cycles == vector(tile, "fp32", WAFER.ops_rmsnorm_scale)
    assert scale.counters["flops"] == WAFER.ops_rmsnorm_scale * tile * n * n
    # decode's layout: one vector, features along y
    mesh = Mesh.square(WAFER, n)
    out = rmsnorm(mesh.place(h[0], ("y",), "fp32"), mesh.place(w, ("y",), "fp32"), 0, 1e-5, "fp32")
    np.testing.assert_allclose(out.to_global(), expect[0], rtol=1e-5)
    assert event(mesh, "rmsnorm.scale").cycles == vector(math.ceil(E / n), "fp32", WAFER.ops_rmsnorm_scale)


def test_masked_softmax_matches_numpy_and_releases_its_input(rng):
    n, H, Lq, Lk = 3, 2, 5, 8
    s = rng.standard_normal((H, Lq, Lk)).astype(np.float32)
    mask = rng.random((Lq, Lk)) < 0.7
    mask[:, 0] = True
    expect = ref_softmax(np.where(mask, s * 0.5, -np.inf))
    mesh = Mesh.square(WAFER, n)
    st = mesh.place(s, (None, "y", "x"), "fp32")
    tq, tk = st.tile_shape[1:]
    qi = np.arange(n)[:, None, None, None] * tq + np.arange(tq)[None, None, :, None]  # (rows, 1, tq, 1)
    ki = np.arange(n)[None, :, None, None] * tk + np.arange(tk)[None, None, None, :]  # (1, cols, 1, tk)
    inside = (qi < Lq) & (ki < Lk)
    allowed = np.where(inside, mask[np.minimum(qi, Lq - 1), np.minimum(ki, Lk - 1)], False)[:, :, None]
    before = mesh.sram.used_max()
    p = masked_softmax(st, allowed, 0.5, dim=2, out_dtype="fp32")
    np.testing.assert_allclose(p.to_global(), expect, rtol=1e-5, atol=1e-7)
    # the scores were consumed: only the probabilities are left of what it touched
    assert mesh.sram.used_max() == before - st.bytes_per_pe + p.bytes_per_pe
    elems = H * tq * tk
    assert event(mesh, "softmax.exp").cycles == vector(elems, "fp32", WAFER.ops_exp)
    assert event(mesh, "softmax.div").cycles == vector(elems, "fp32", WAFER.ops_div)
    assert event(mesh, "softmax.scale").cycles == vector(elems, "fp32")


def test_silu_mul_and_split_fused(rng):
    n, F = 4, 10
    g, u = rng.standard_normal(F).astype(np.float32), rng.standard_normal(F).astype(np.float32)
    mesh = Mesh.square(WAFER, n)
    t = math.ceil(F / n)
    fused = np.concatenate([np.pad(g, (0, t * n - F)).reshape(n, t), np.pad(u, (0, t * n - F)).reshape(n, t)], 1)
    gu = mesh.place(fused.reshape(-1), ("x",), "fp32")
    used = mesh.sram.used_max()
    gv, uv = split_fused(gu, [((F,), t), ((F,), t)])
    assert mesh.sram.used_max() == used  # views: no SRAM of their own
    np.testing.assert_array_equal(gv.to_global(), g)
    out = silu_mul(gv, uv, "fp32")
    np.testing.assert_allclose(out.to_global(), g / (1 + np.exp(-g)) * u, rtol=1e-6)
    e = event(mesh, "silu_mul")
    assert e.cycles == vector(t, "fp32", WAFER.ops_silu)
    assert e.counters["sram_read_bytes"] == 2 * t * 4 * n * n  # both parts of every PE's tile


def test_rope_on_pair_ordered_features_matches_the_reference(rng):
    cfg = tiny_config(num_heads=4, num_kv_heads=2, head_dim=8)
    n, T = 3, 5
    hl = HeadLayout(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, n)
    k = rng.standard_normal((T, cfg.num_kv_heads * cfg.head_dim)).astype(np.float32)
    cos, sin = rope_cos_sin(cfg, np.arange(T))
    expect = apply_rope(k.reshape(T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 0, 2), cos, sin)
    expect = expect.transpose(1, 0, 2).reshape(T, -1)
    mesh = Mesh.square(WAFER, n)
    kt = mesh.place(hl.from_original_kv(k), ("y", "x"), "fp32")
    ct, stab = hl.rope_tables(cfg, np.arange(T))
    tl = kt.tile_shape[0]

    def tile(a):  # [T, kv_padded] -> (rows, cols, tl, F)
        return np.pad(a, ((0, tl * n - T), (0, 0))).reshape(n, tl, n, hl.col_features).transpose(0, 2, 1, 3)

    out = rope(kt, tile(ct), tile(stab), "rope_k")
    np.testing.assert_allclose(hl.to_original_kv(out.to_global()), expect, rtol=1e-5, atol=1e-6)
    assert event(mesh, "rope_k").cycles == vector(kt.tile_elems, "fp32", WAFER.ops_rope)


def test_grouped_products_cost_from_tile_shapes_and_group_map(rng):
    """Per PE out[g] = A[:, k in g] @ B[k in g, :], and the expansion back; MACs M*K*N, the
    result written for the groups a PE's positions belong to (counted by brute force)."""
    n, M, K, N, G = 2, 3, 4, 5, 3
    groups = np.array([[0, 0, 1, -1], [1, 2, 2, 2]])  # (cols, K): column 0 holds groups 0, 1; column 1: 1, 2
    mesh = Mesh.square(WAFER, n)
    a = mesh.place(rng.standard_normal(n * M * K).astype(np.float32), ("x",), "fp32")  # tile [M, K]
    b = mesh.place(rng.standard_normal((K * n, N * n)).astype(np.float32), ("x", "y"), "fp16")  # tile [K, N]
    out = compute.grouped_contract(a, b, groups[None], G, shape=(G, M, N * n), layout=(None, None, "y"),
                                   name="contract")
    at = a.tiles.astype(np.float32).reshape(n, n, M, K)
    bt = b.tiles.astype(np.float32)
    for i in range(n):
        for j in range(n):
            for g in range(G):
                sel = groups[j] == g
                np.testing.assert_allclose(out.tiles[i, j, g], at[i, j][:, sel] @ bt[i, j][sel], rtol=1e-5, atol=1e-6)
    present = max(len(set(row[row >= 0])) for row in groups)
    e = event(mesh, "contract")
    assert e.counters["flops"] == 2 * M * K * N * n * n
    assert e.cycles == math.ceil(M * K * N / WAFER.macs_per_cycle("fp16")) + WAFER.op_overhead_cycles
    assert e.counters["sram_write_bytes"] == present * M * N * 4 * n * n
    assert e.counters["sram_read_bytes"] == (M * K * 4 + K * N * 2) * n * n
    # the expansion: out[m, k] = sum_s P[group(k), m, s] B2[s, k]
    p = mesh.place(rng.standard_normal((G, M, N * n)).astype(np.float32), (None, None, "y"), "fp32")
    b2 = mesh.place(rng.standard_normal((N * n, K * n)).astype(np.float32), ("y", "x"), "fp32")
    o = compute.grouped_expand(p, b2, groups[None], shape=(M * K * n,), layout=("x",), name="expand")
    pt, b2t = p.tiles, b2.tiles
    for i in range(n):
        for j in range(n):
            want = np.zeros((M, K), np.float32)
            for kk in range(K):
                if groups[j, kk] >= 0:
                    want[:, kk] = pt[i, j, groups[j, kk]] @ b2t[i, j][:, kk]
            np.testing.assert_allclose(o.tiles[i, j].reshape(M, K), want, rtol=1e-5, atol=1e-6)
    e = event(mesh, "expand")
    assert e.counters["sram_read_bytes"] == (present * M * N * 4 + N * K * 4) * n * n


def test_decode_attention_matches_per_head_numpy(rng):
    cfg = tiny_config(num_heads=6, num_kv_heads=3, head_dim=10)
    n, S = 4, 5  # 4 rows of up to 5 cached tokens
    hl = HeadLayout(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, n)
    r, D, Hkv = hl.group, cfg.head_dim, cfg.num_kv_heads
    counts = np.array([4, 5, 5, 3])
    valid = np.arange(S)[None, :] < counts[:, None]  # (rows, S)
    q = rng.standard_normal(cfg.num_heads * D).astype(np.float32)
    K = rng.standard_normal((n * S, Hkv * D)).astype(np.float32)
    V = rng.standard_normal((n * S, Hkv * D)).astype(np.float32)
    mesh = Mesh.square(WAFER, n)
    qt = mesh.place(hl.take_cols(q[None], hl.q_cols)[0], ("x",), "fp32")
    kt = mesh.place(hl.from_original_kv(K).T.copy(), ("x", "y"), "fp32")  # K^T [F, rows*S]
    vt = mesh.place(hl.from_original_kv(V), ("y", "x"), "fp32")
    out = decode_attention(qt, kt, vt, valid, hl.head_of_pos, Hkv, 1 / math.sqrt(D))
    got = np.zeros(cfg.num_heads * D, np.float32)
    got[hl.q_cols[hl.q_cols >= 0]] = out.to_global()[hl.q_cols >= 0]
    held = valid.reshape(-1)  # slot (row i, j) is token i*S + j
    for h in range(cfg.num_heads):
        g = h // r
        s = K[held][:, g * D:(g + 1) * D] @ q[h * D:(h + 1) * D] / math.sqrt(D)
        want = ref_softmax(s) @ V[held][:, g * D:(g + 1) * D]
        np.testing.assert_allclose(got[h * D:(h + 1) * D], want, rtol=1e-5, atol=1e-6)
    # q K^T: every PE its q block [r, F] times its K^T block [F, S]
    assert event(mesh, "qk_gemv").counters["flops"] == 2 * r * hl.col_features * S * n * n


def test_argmax_carries_value_and_lowest_index_like_numpy(rng):
    n, V = 4, 37
    logits = rng.integers(0, 5, V).astype(np.float32)  # many ties
    mesh = Mesh.square(WAFER, n)
    best = argmax(mesh.place(logits, ("x",), "fp32"))
    np.testing.assert_array_equal(best.tiles[..., 0], logits.max())
    np.testing.assert_array_equal(best.tiles[..., 1], np.argmax(logits))  # numpy: the first of the ties
    local = event(mesh, "argmax.local")
    assert local.cycles == vector(math.ceil(V / n), "fp32")
    assert local.counters["sram_write_bytes"] == 8 * n * n  # one (value, index) pair per PE
    # a GEMV's output reduced to a root row (a partial sum): read where it is complete
    part = np.zeros((n, n, math.ceil(V / n)), np.float32)
    part[n // 2] = np.pad(logits, (0, n * part.shape[-1] - V)).reshape(n, -1)
    mesh2 = Mesh.square(WAFER, n)
    from waferllm.mesh.tensor import DistTensor

    t = DistTensor(mesh2, (V,), ("x",), "fp32", part, partial=("y", "sum"))
    np.testing.assert_array_equal(argmax(t).tiles[..., 1], np.argmax(logits))


@pytest.mark.parametrize("index", [[0, 1, 2, 3, -1, -1], [0, 1, 2, 3], [1, 2, 3, -1], [0, 2, 1, -1], [0, -1, 1, -1],
                                   [-1, -1], [3, 0, -1, 2]])
def test_take_cols_gathers_columns_and_zero_pads(index):
    """Columns in wafer order: column i is w's column index[i], or zeros where index[i] is -1
    (the in-order prefix that FFN padding gives is copied as one slice)."""
    hl = HeadLayout(2, 1, 4, 2)
    w = np.arange(20, dtype=np.float32).reshape(5, 4) + 1
    want = np.stack([w[:, i] if i >= 0 else np.zeros(5, np.float32) for i in index], axis=1)
    np.testing.assert_array_equal(hl.take_cols(w, np.array(index)), want)
