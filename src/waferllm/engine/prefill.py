"""Prefill on the mesh: the whole prompt through a run of layers, every projection a MeshGEMM.

Layout ``B L_y E_x``: tokens split over mesh y, features over mesh x. Weights are
2D-partitioned and pre-skewed for MeshGEMM at placement; Q/K/V share one skew of the
normalised activations, as do gate/up. Attention runs per pass of kv heads (as many as
the SRAM budget allows): Q K^T by the grouped dist-GEMM-T, a causal softmax with its
max and sum allreduced along x, then P V by the grouped MeshGEMM (both activations
skewed on the mesh). RMSNorm statistics are allreduced along x; RoPE uses each token's
true position.
"""

from __future__ import annotations

import math

import numpy as np

from waferllm.engine.layouts import HeadLayout, rope_on_mesh
from waferllm.kernels.attention import grouped_pv, grouped_scores
from waferllm.kernels.meshgemm import meshgemm, place_b
from waferllm.mesh import comm, compute
from waferllm.mesh.tensor import DistTensor


class PrefillStage:
    def __init__(self, mesh, config, layer_ids: range, layers, vocab: range, lm_head, final_norm,
                 dtype: str = "fp16", heads_per_pass: int = 1):
        self.mesh = mesh
        self.config = config
        self.layer_ids = layer_ids
        self.vocab = vocab
        self.dtype = dtype
        self.heads_per_pass = max(1, heads_per_pass)
        n = mesh.rows
        c = config
        self.hl = HeadLayout(c.num_heads, c.num_kv_heads, c.head_dim, n)
        self.w = [self._place_layer(li, lw) for li, lw in zip(layer_ids, layers)]
        E = c.hidden_size
        self.lm = place_b(mesh, lm_head if lm_head is not None else (E, len(vocab)), dtype, name="lm_head")
        self.final_norm = mesh.place(final_norm[None] if final_norm is not None else (1, E), (None, "x"), "fp32",
                                     name="final_norm")

    def _place_layer(self, li, lw) -> dict:
        """One layer's weights, pre-skewed for MeshGEMM (``lw`` None: shapes only, dry run)."""
        m, hl, d, c = self.mesh, self.hl, self.dtype, self.config
        E, F = c.hidden_size, c.intermediate_size
        # key: (logical shape, host array from the layer's weights)
        mats = {
            "q": ((E, hl.q_padded), lambda w: hl.take_cols(w.wq, hl.q_cols)),
            "k": ((E, hl.kv_padded), lambda w: hl.take_cols(w.wk, hl.kv_cols)),
            "v": ((E, hl.kv_padded), lambda w: hl.take_cols(w.wv, hl.kv_cols)),
            "o": ((hl.q_padded, E), lambda w: hl.take_rows(w.wo, hl.q_cols)),
            "gate": ((E, F), lambda w: w.w_gate),
            "up": ((E, F), lambda w: w.w_up),
            "down": ((F, E), lambda w: w.w_down),
        }
        rows = {"attn_norm": ((1, E), lambda w: w.attn_norm[None]), "ffn_norm": ((1, E), lambda w: w.ffn_norm[None])}
        if c.qkv_bias:
            rows.update(bq=((1, hl.q_padded), lambda w: hl.take_cols(w.bq[None], hl.q_cols)),
                        bk=((1, hl.kv_padded), lambda w: hl.take_cols(w.bk[None], hl.kv_cols)),
                        bv=((1, hl.kv_padded), lambda w: hl.take_cols(w.bv[None], hl.kv_cols)))
        out = {key: place_b(m, build(lw) if lw is not None else shape, d, name=f"L{li}.{key}")
               for key, (shape, build) in mats.items()}
        out.update({key: m.place(build(lw) if lw is not None else shape, (None, "x"), "fp32", name=f"L{li}.{key}")
                    for key, (shape, build) in rows.items()})
        return out

    # ---- building blocks ---------------------------------------------------------------
    def _mm(self, a, b, name, a_skewed=False):
        with self.mesh.ledger.span(name):
            return meshgemm(a, b, a_skewed=a_skewed, out_dtype=self.dtype, name=name)

    def rmsnorm(self, h: DistTensor, weight: DistTensor, name: str) -> DistTensor:
        eps, E = self.config.rms_norm_eps, self.config.hidden_size
        with self.mesh.ledger.span(name):
            ss = compute.tile_reduce(h, 1, "sumsq", name=f"{name}.sumsq")
            ss = comm.allreduce(ss, "x", "sum", name=f"{name}.allreduce")
            return compute.elementwise(lambda x, s, w: x / np.sqrt(s / E + eps) * w, h, ss, weight,
                                       ops_per_elem=3, name=f"{name}.scale", dtype=self.dtype)

    def rope_tables(self, positions: np.ndarray):
        """cos/sin of every token's true position for this region's feature blocks: (n, n, tl, tf)."""
        if not self.mesh.numeric:
            return None, None
        hl, n = self.hl, self.mesh.rows
        L = len(positions)
        tl = -(-L // n)

        def tile(a):
            a = np.pad(a, ((0, tl * n - L), (0, 0)))
            return a.reshape(n, tl, n, hl.tf).transpose(0, 2, 1, 3)

        cos, sin = hl.rope_tables(self.config, positions)
        return tile(cos), tile(sin)

    # ---- one layer -------------------------------------------------------------------
    def layer(self, idx: int, h: DistTensor, length: int, tables) -> tuple[DistTensor, DistTensor, DistTensor]:
        """Returns the new hidden states and this layer's K and V (kept for the decode cache)."""
        w = self.w[idx]
        x = self.rmsnorm(h, w["attn_norm"], "attn_norm")
        qr = self._mm(x, w["q"], "q_proj")
        kr = self._mm(qr.state["a_skewed"], w["k"], "k_proj", a_skewed=True)
        vr = self._mm(qr.state["a_skewed"], w["v"], "v_proj", a_skewed=True)
        q, k, v = qr.out, kr.out, vr.out
        del qr, kr, vr, x
        if "bq" in w:
            q = compute.elementwise(lambda a, b: a + b, q, w["bq"], name="bias_q")
            k = compute.elementwise(lambda a, b: a + b, k, w["bk"], name="bias_k")
            v = compute.elementwise(lambda a, b: a + b, v, w["bv"], name="bias_v")
        q = rope_on_mesh(q, *tables, "rope_q")
        k = rope_on_mesh(k, *tables, "rope_k")
        o = self.attention(q, k, v, length)
        del q
        a = self._mm(o, w["o"], "o_proj").out
        h = compute.elementwise(lambda p, s: p + s, h, a, name="residual", dtype=self.dtype)
        del a, o
        x = self.rmsnorm(h, w["ffn_norm"], "ffn_norm")
        gr = self._mm(x, w["gate"], "gate_proj")
        ur = self._mm(gr.state["a_skewed"], w["up"], "up_proj", a_skewed=True)
        g, u = gr.out, ur.out
        del gr, ur, x
        act = compute.elementwise(lambda g_, u_: g_ / (1 + np.exp(-g_)) * u_, g, u, ops_per_elem=5, name="silu_mul",
                                  dtype=self.dtype)
        del g, u
        d = self._mm(act, w["down"], "down_proj").out
        del act
        h = compute.elementwise(lambda p, s: p + s, h, d, name="residual", dtype=self.dtype)
        return h, k, v

    def attention(self, q: DistTensor, k: DistTensor, v: DistTensor, length: int) -> DistTensor:
        hl, c, mesh = self.hl, self.config, self.mesh
        n = mesh.rows
        tq = q.tile_shape[0]
        scale = 1.0 / math.sqrt(c.head_dim)
        qi = (np.arange(n)[:, None] * tq + np.arange(tq)[None, :])  # (rows, tq) query index
        ki = (np.arange(n)[:, None] * tq + np.arange(tq)[None, :])  # (cols, tk) key index
        allowed = None
        if mesh.numeric:
            # causal and real keys only: (n, n, 1, 1, tq, tk)
            allowed = ((ki[None, :, None, :] <= qi[:, None, :, None]) & (ki[None, :, None, :] < length))[:, :, None, None]
        out = None
        with mesh.ledger.span("attention"):
            for g0 in range(0, c.num_kv_heads, self.heads_per_pass):
                chunk = range(g0, min(c.num_kv_heads, g0 + self.heads_per_pass))
                hop = np.where((hl.head_of_pos >= chunk.start) & (hl.head_of_pos < chunk.stop),
                               hl.head_of_pos - chunk.start, -1)
                s = grouped_scores(q, k, hop, len(chunk), hl.group, name="scores").out
                with mesh.ledger.span("softmax"):
                    z = compute.elementwise(lambda x: np.where(allowed, x * scale, -np.inf), s, name="softmax.mask",
                                            dtype="fp32")
                    del s
                    mx = compute.tile_reduce(z, 3, "max", name="softmax.max")
                    mx = comm.allreduce(mx, "x", "max", name="softmax.allreduce_max")
                    e = compute.elementwise(lambda x, m: np.where(allowed, np.exp(x - m), 0.0), z, mx, ops_per_elem=4,
                                            name="softmax.exp", dtype="fp32")
                    del z
                    tot = compute.tile_reduce(e, 3, "sum", name="softmax.sum")
                    tot = comm.allreduce(tot, "x", "sum", name="softmax.allreduce_sum")
                    p = compute.elementwise(lambda a, b: a / b, e, tot, name="softmax.div", dtype=self.dtype)
                    del e
                part = grouped_pv(p, v, hop, out_dtype="fp32", name="attn_out").out
                del p
                out = part if out is None else compute.elementwise(lambda a, b: a + b, out, part, name="attn_accumulate",
                                                                   dtype="fp32")
        return out.with_tiles(out.tiles, dtype=self.dtype, name="attn_out") if out.dtype != self.dtype else out

    # ---- vocabulary slice ------------------------------------------------------------
    def lm_head(self, h: DistTensor) -> DistTensor:
        """Logits [rows of h, vocab slice] of normalised hidden states on this mesh."""
        with self.mesh.ledger.span("lm_head"):
            return meshgemm(h, self.lm, out_dtype="fp32", name="logits").out
