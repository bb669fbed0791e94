"""Fused numerics: the values of a layer whose program has already run, as a few dense
array operations, while its cost is replayed.

Simulating a layer primitive by primitive (``numerics="mesh"``) costs about twenty
primitives, each a few numpy calls on tiny tiles plus its routes, SRAM and cost
bookkeeping. The cost of a layer depends only on its program (shapes, layouts, the KV
cache's occupancy), so once a program has run its ledger delta is known and every later
layer with the same program replays it, as dry runs do; with ``numerics="fused"`` (the
default) such a layer's *values* come from the functions here: the same layer, the same
weights as placed (fp16, or the dequantised int8 / int4 blocks), the same datatypes
rounded at the same points (fp16 prefill activations and KV cache, fp32 decode
activations and every accumulation), the same RoPE tables and wafer feature orders, the
KV cache written in place.

What differs is only the order of additions: a dense product sums a dot product in its
BLAS order, the mesh sums per-PE partials along a line; prefill's streaming attention
also rescales its running sums. Logits agree to fp32 rounding (fp16 rounding in prefill)
and greedy tokens are the same but at near-ties (``tests/test_fused_numerics.py``).

A program not yet run: a decode layer runs primitive by primitive (so each run exercises
the mesh's own numerics too); a prefill layer, whose program changes with the prompt's
tile rows, runs shape-only on a twin of its mesh (``PrefillStage.dry_layer``: the same
ledger, a copy of the region's SRAM accounting) and its values are fused.

Shapes: B requests, L prompt tokens, E hidden, n PE columns, r query heads per kv head,
F kv features per column (``HeadLayout.col_features``), G kv heads of D features; kv
features in wafer order are ``[n, F]`` (head-major: head g is positions g*D..g*D+D-1),
query features ``[n, r, F]``.
"""

from __future__ import annotations

import math

import numpy as np

from waferllm.kernels.layer_ops import rms_scale, rotate_pairs, silu_gate
from waferllm.mesh.tensor import DistTensor


def dense_weights(stage, idx: int) -> dict[str, np.ndarray]:
    """Layer ``idx`` of a stage as placed, each tensor its logical float32 values, kept on
    the stage from first use (host memory: one float32 copy of the stage's weights)."""
    cache = stage.dense
    if idx not in cache:
        cache[idx] = {key: t.to_global(np.float32) for key, t in stage.w[idx].items()}
    return cache[idx]


def head_logits(stage, x: DistTensor) -> np.ndarray:
    """The stage's LM head on ``x`` ([E], or rows [T, E]): logits of its vocabulary slice, fp32."""
    cache = stage.dense
    if "lm_head" not in cache:
        cache["lm_head"] = stage.lm.to_global(np.float32)  # [E, vocab slice]
    return x.to_global(np.float32) @ cache["lm_head"]


def round_fp16(a: np.ndarray) -> np.ndarray:
    """float32 ``a`` rounded to the nearest fp16 value (ties to even), as float32: exactly
    ``a.astype(np.float16).astype(np.float32)``, but as a few whole-array integer operations
    (numpy converts to fp16 one element at a time). fp16 keeps 10 of float32's 23 mantissa
    bits; below 2**-14 its values are multiples of 2**-24; from 65520 on it is infinite."""
    a = np.ascontiguousarray(a, np.float32)
    u = a.view(np.uint32)
    r = u >> np.uint32(13)
    r &= np.uint32(1)
    r += np.uint32(0x0FFF)
    r += u
    r &= np.uint32(0xFFFFE000)
    out = r.view(np.float32)
    # the bit rounding is wrong only for rare values, found by two reductions: magnitudes
    # from 65520 (0x477FF000) on, NaN included, and nonzero ones below 2**-14 (less one,
    # zero wraps to the top and so is never the smallest)
    if not u.size:
        return out
    bits = u & np.uint32(0x7FFFFFFF)
    big = bits.max() >= _FP16_TOO_BIG
    bits -= np.uint32(1)
    small = bits.min() < _FP16_SUBNORMAL - np.uint32(1)
    if small or big:
        _round_fp16_rare(a.reshape(-1), out.reshape(-1), bits.reshape(-1), small, big)
    return out


_FP16_TOO_BIG = np.uint32(0x477FF000)  # float32 bits of 65520: rounds to 2**16, infinite in fp16
_FP16_SUBNORMAL = np.uint32(113 << 23)  # float32 bits of 2**-14: fp16's smallest normal value


def _round_fp16_rare(a: np.ndarray, out: np.ndarray, less: np.ndarray, small: bool, big: bool) -> None:
    """Mend :func:`round_fp16`'s ``out`` (flat, in place) where ``a`` is rare: subnormal in
    fp16 (``small``: a multiple of 2**-24), too large for it (``big``: infinite) or NaN
    (kept). ``less``: the magnitudes' bits less one."""
    if small:
        i = np.flatnonzero(less < _FP16_SUBNORMAL - np.uint32(1))
        out[i] = np.round(a[i] * np.float32(2.0 ** 24)) * np.float32(2.0 ** -24)
    if big:
        i = np.flatnonzero(less >= _FP16_TOO_BIG - np.uint32(1))
        i = i[less[i] != np.uint32(0xFFFFFFFF)]  # zero wrapped to the top
        out[i] = np.where(less[i] >= np.uint32(0x7F800000), a[i], np.copysign(np.float32(np.inf), a[i]))


def rmsnorm(h: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """The mesh's RMSNorm on rows of features (fp32)."""
    ss = np.sum(np.square(h), axis=-1, keepdims=True)
    return rms_scale(h, ss, weight, h.shape[-1], eps).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Pair-ordered RoPE on [..., blocks, F] with cos/sin [..., 1, F] (fp32)."""
    return rotate_pairs(x, cos, sin).astype(np.float32)


def softmax(z: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the last dim (masked entries: probability 0), as the mesh's steps."""
    if allowed is not None:
        z = np.where(allowed, z, -np.inf)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    if allowed is not None:
        e = np.where(allowed, e, 0.0)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _heads(x: np.ndarray, hl, n: int, features: str) -> np.ndarray:
    """[T, n*r*F] query (``features="q"``) or [T, n*F] kv features in wafer order -> [G, r, T, D]
    (r = 1 for kv): one block per head, padding dropped."""
    G, D = hl.num_kv_heads, hl.head_dim
    r = hl.group if features == "q" else 1
    T = x.shape[0]
    blocks = x.reshape(T, n, r, hl.col_features).transpose(2, 0, 1, 3).reshape(r, T, n * hl.col_features)
    return blocks[:, :, :G * D].reshape(r, T, G, D).transpose(2, 0, 1, 3)


def _unheads(o: np.ndarray, hl, n: int) -> np.ndarray:
    """[G, r, T, D] -> [T, n*r*F] in the query's wafer order (padding features zero)."""
    G, r, T, D = o.shape
    flat = np.zeros((r, T, n * hl.col_features), np.float32)
    flat[:, :, :G * D] = o.transpose(1, 2, 0, 3).reshape(r, T, G * D)
    return flat.reshape(r, T, n, hl.col_features).transpose(1, 2, 0, 3).reshape(T, -1)


# ---------------------------------------------------------------------------- decode


def decode_layer(stage, idx: int, h: DistTensor, positions: tuple[int, ...], caches) -> DistTensor:
    """One decoder layer for a batch, values only: h [B, E] (None, y) -> [B, E] (None, y).
    Appends each request's K and V to its cache (``KVCache.update_values``)."""
    mesh, hl, c = stage.mesh, stage.hl, stage.config
    w = dense_weights(stage, idx)
    n, r, F = mesh.cols, hl.group, hl.col_features
    hg = h.to_global(np.float32)  # [B, E]
    B = hg.shape[0]
    x = rmsnorm(hg, w["attn_norm"], c.rms_norm_eps)
    qkv = x @ w["qkv"]  # [B, n * (r+2) * F]: column j [q_j | k_j | v_j]
    if "qkv_bias" in w:
        qkv = qkv + w["qkv_bias"]
    blocks = qkv.reshape(B, n, r + 2, F)
    cos, sin = stage.rope_tables(positions)  # (1, n, B, F) each
    cos, sin = cos[0].transpose(1, 0, 2)[:, :, None], sin[0].transpose(1, 0, 2)[:, :, None]  # (B, n, 1, F)
    qk = rope(blocks[:, :, :r + 1], cos, sin)  # q's r blocks and k's share a column's table
    q = qk[:, :, :r].reshape(B, -1)  # [B, q_padded]
    k = qk[:, :, r]  # [B, n, F]
    v = blocks[:, :, r + 1]
    scale = 1.0 / math.sqrt(c.head_dim)
    outs = []
    for b, cache in enumerate(caches):  # each request attends over its own cache
        keys, values = cache.update_values(idx, k[b], v[b])  # [T, kv_padded] each, the new token included
        s = _heads(q[b:b + 1], hl, n, "q") @ _heads(keys, hl, n, "kv").transpose(0, 1, 3, 2)  # [G, r, 1, T]
        o = softmax(s * scale) @ _heads(values, hl, n, "kv")  # [G, r, 1, D]
        outs.append(_unheads(o, hl, n))
    h1 = hg + np.concatenate(outs) @ w["o"]  # [B, E]
    x = rmsnorm(h1, w["ffn_norm"], c.rms_norm_eps)
    gu = (x @ w["gate_up"]).reshape(B, n, 2, -1)  # column j [gate_j | up_j]
    act = silu_gate(gu[:, :, 0], gu[:, :, 1]).astype(np.float32).reshape(B, -1)  # [B, ffn_padded]
    out = h1 + act @ w["down"]
    return DistTensor.from_global(mesh, out, (None, "y"), "fp32", name="residual", exact=True)


# ---------------------------------------------------------------------------- prefill


def _prefill_weights(stage, idx: int) -> dict[str, np.ndarray]:
    """A prefill layer's weights as one product each per input: q, k and v side by side in
    column blocks [E, n*(r+2)*F] (column j: [q_j | k_j | v_j], as decode places them), and
    gate beside up [E, 2*ffn]. Fewer, wider products and roundings; the same values."""
    cache = stage.dense
    key = ("prefill", idx)
    if key not in cache:
        w, n, r, F = dense_weights(stage, idx), stage.mesh.cols, stage.hl.group, stage.hl.col_features

        def blocks(*parts):  # [rows, n, r, F], [rows, n, 1, F], ... -> [rows, n * (r+2) * F]
            return np.concatenate([a.reshape(a.shape[0], n, -1, F) for a in parts], axis=2).reshape(parts[0].shape[0], -1)

        joined = {"qkv": blocks(w["q"], w["k"], w["v"]), "gate_up": np.concatenate([w["gate"], w["up"]], axis=1)}
        if "bq" in w:
            joined["qkv_bias"] = blocks(w["bq"], w["bk"], w["bv"])
        joined.update({k: w[k] for k in ("o", "down", "attn_norm", "ffn_norm")})
        del cache[idx]  # the joined copies replace the separate ones
        cache[key] = joined
    return cache[key]


def prefill_layer(stage, idx: int, h: DistTensor, length: int) -> tuple[DistTensor, DistTensor, DistTensor]:
    """One decoder layer over the prompt, values only: h [L, E] (y, x) -> the new hidden
    states and this layer's rotated K and V [L, kv_padded] (y, x), all in the run's dtype."""
    mesh, hl, c, dtype = stage.mesh, stage.hl, stage.config, stage.dtype
    w = _prefill_weights(stage, idx)
    n, r, F = mesh.cols, hl.group, hl.col_features

    def rnd(a):  # stored in the run's dtype, computed on in fp32
        return round_fp16(a) if dtype == "fp16" else a.astype(np.float32, copy=False)

    hg = h.to_global(np.float32)  # [L, E]
    x = rnd(rmsnorm(hg, w["attn_norm"][0], c.rms_norm_eps))
    qkv = rnd(x @ w["qkv"])  # [L, n * (r+2) * F]: q, k and v each rounded as stored
    if "qkv_bias" in w:
        qkv = rnd(qkv + w["qkv_bias"][0])
    blocks = qkv.reshape(length, n, r + 2, F)
    cos, sin = hl.rope_tables(c, np.arange(length))  # [L, kv_padded]
    cos, sin = cos.reshape(length, n, 1, F), sin.reshape(length, n, 1, F)
    qk = rnd(rope(blocks[:, :, :r + 1], cos, sin))  # q's r blocks and k's share a column's table
    q = qk[:, :, :r].reshape(length, -1)  # [L, q_padded]
    k = qk[:, :, r].reshape(length, -1)  # [L, kv_padded]
    v = np.ascontiguousarray(blocks[:, :, r + 1]).reshape(length, -1)
    # causal attention, every head at once: [G, r, L, L] scores in fp32
    s = _heads(q, hl, n, "q") @ _heads(k, hl, n, "kv").transpose(0, 1, 3, 2)
    causal = np.tril(np.ones((length, length), bool))
    p = rnd(softmax(s * (1.0 / math.sqrt(c.head_dim)), causal))
    o = rnd(_unheads(p @ _heads(v, hl, n, "kv"), hl, n))  # [L, q_padded]
    h1 = rnd(hg + rnd(o @ w["o"]))
    x = rnd(rmsnorm(h1, w["ffn_norm"][0], c.rms_norm_eps))
    gu = rnd(x @ w["gate_up"])  # [L, 2 * ffn]: gate, then up
    ffn = gu.shape[1] // 2
    act = rnd(silu_gate(gu[:, :ffn], gu[:, ffn:]))
    out = rnd(h1 + rnd(act @ w["down"]))
    # named as the program names them: the SRAM accounting keeps its high-water marks by name
    place = lambda a, name: DistTensor.from_global(mesh, a, ("y", "x"), dtype, name=name, exact=True)  # noqa: E731
    return place(out, "residual"), place(k, "rope_k"), place(v, "bias_v" if "qkv_bias" in w else "v_proj")
