"""Decode on the mesh: one token through a run of layers, every projection a MeshGEMV.

Layout ``B E_y L^x``: the hidden vector is split over mesh y and replicated along x.
GEMVs alternate their reduce axis so nothing is ever transposed:

    x (y) --QKV (W y,x)--> q,k,v (x) ... attention ... o (x) --O (W x,y)--> (y)
    x (y) --gate/up (W y,x)--> (x) --SiLU*up--> (x) --down (W x,y)--> (y)

W_O and W_down therefore get a decode-specific placement (input dim on x). Q, K and V
come out of one fused GEMV: each PE column's weight tile is [q block | k block | v
block] for the same kv feature block (see ``layouts.HeadLayout``), so they land on the
columns that need them. K is cached transposed, so q K^T is one more GEMV-shaped
product reduced along x (within the columns of each head), and p V reduces along y.
"""

from __future__ import annotations

import math

import numpy as np

from waferllm.engine.kvcache import KVCache
from waferllm.engine.layouts import HeadLayout, rope_on_mesh
from waferllm.kernels.attention import _onehot
from waferllm.kernels.meshgemv import gemv
from waferllm.mesh import comm, compute
from waferllm.mesh.compute import _charge
from waferllm.mesh.cost import compute_cycles, vector_cycles
from waferllm.mesh.tensor import DistTensor


def _blocks(mats: list[np.ndarray], widths: list[int], parts: int) -> np.ndarray:
    """Concatenate column blocks so PE column j holds [m0 block j | m1 block j | ...]."""
    split = [m.reshape(m.shape[0], parts, w) for m, w in zip(mats, widths)]
    return np.concatenate(split, axis=2).reshape(mats[0].shape[0], -1)


class DecodeStage:
    """The decode program of one region: its layers' weights, KV cache, and vocab slice."""

    def __init__(self, mesh, config, layer_ids: range, layers, vocab: range, lm_head, embed, final_norm,
                 capacity_tokens: int, dtype: str = "fp16", kv_scheme: str = "shift", gemv_k: int = 2):
        self.mesh = mesh
        self.config = config
        self.layer_ids = layer_ids
        self.vocab = vocab
        self.dtype = dtype
        self.gemv_k = gemv_k
        q = mesh.rows
        c = config
        self.hl = hl = HeadLayout(c.num_heads, c.num_kv_heads, c.head_dim, q)
        self.tff = -(-c.intermediate_size // q)
        self.fpad = self.tff * q
        self.heads_per_column = hl.max_heads_per_column()
        # columns a head's features span: the segment its score reduction runs over
        self.head_span = hl.max_columns_per_head()
        E = c.hidden_size
        self.w = []
        for li, lw in zip(layer_ids, layers):
            self.w.append(self._place_layer(li, lw))
        # vocab slice of the LM head [E, Vc] (y, x); also the embedding table when tied
        vc = len(vocab)
        self.lm = mesh.place(lm_head if lm_head is not None else (E, vc), ("y", "x"), dtype, name="lm_head")
        self.embed = None
        if not c.tie_word_embeddings:
            self.embed = mesh.place(embed if embed is not None else (E, vc), ("y", "x"), dtype, name="embedding")
        self.final_norm = mesh.place(final_norm if final_norm is not None else (E,), ("y",), "fp32", name="final_norm")
        self.cache = KVCache(mesh, hl, len(layer_ids), capacity_tokens, kv_scheme, dtype,
                             name=f"kv[{layer_ids.start}:{layer_ids.stop}]")
        self._onehot = _onehot(hl.head_of_pos, c.num_kv_heads) if mesh.numeric else None
        self._rope = None

    # ---- placement -------------------------------------------------------------------
    def _place_layer(self, li: int, lw) -> dict:
        """One layer's weights in the decode placement (``lw`` None: shapes only, dry run)."""
        m, c, hl, d = self.mesh, self.config, self.hl, self.dtype
        E, q = c.hidden_size, m.rows
        r, tf, tff, fpad = hl.group, hl.tf, self.tff, self.fpad
        fcols = np.where(np.arange(fpad) < c.intermediate_size, np.arange(fpad), -1)
        # key: (logical shape, layout, dtype, host array from the layer's weights)
        specs = {
            "qkv": ((E, q * (r + 2) * tf), ("y", "x"), d, lambda w: _blocks(
                [hl.take_cols(w.wq, hl.q_cols), hl.take_cols(w.wk, hl.kv_cols), hl.take_cols(w.wv, hl.kv_cols)],
                [r * tf, tf, tf], q)),
            "o": ((hl.q_padded, E), ("x", "y"), d, lambda w: hl.take_rows(w.wo, hl.q_cols)),
            "gate_up": ((E, 2 * fpad), ("y", "x"), d, lambda w: _blocks(
                [hl.take_cols(w.w_gate, fcols), hl.take_cols(w.w_up, fcols)], [tff, tff], q)),
            "down": ((fpad, E), ("x", "y"), d, lambda w: hl.take_rows(w.w_down, fcols)),
            "attn_norm": ((E,), ("y",), "fp32", lambda w: w.attn_norm),
            "ffn_norm": ((E,), ("y",), "fp32", lambda w: w.ffn_norm),
        }
        if c.qkv_bias:
            specs["qkv_bias"] = ((q * (r + 2) * tf,), ("x",), "fp32", lambda w: _blocks(
                [hl.take_cols(w.bq[None], hl.q_cols), hl.take_cols(w.bk[None], hl.kv_cols),
                 hl.take_cols(w.bv[None], hl.kv_cols)], [r * tf, tf, tf], q)[0])
        return {key: m.place(build(lw) if lw is not None else shape, layout, dt, name=f"L{li}.{key}")
                for key, (shape, layout, dt, build) in specs.items()}

    # ---- building blocks ---------------------------------------------------------------
    def _gemv(self, x, w, name):
        with self.mesh.ledger.span(name):
            return gemv(x, w, algo="meshgemv", k=self.gemv_k, out_dtype="fp32", name=name).out

    def rmsnorm(self, h: DistTensor, weight: DistTensor, name: str) -> DistTensor:
        """h [E] (y): sum of squares allreduced along y, then scaled on every PE."""
        eps, E = self.config.rms_norm_eps, self.config.hidden_size
        with self.mesh.ledger.span(name):
            ss = compute.tile_reduce(h, 0, "sumsq", name=f"{name}.sumsq")
            ss = comm.allreduce(ss, "y", "sum", k=self.gemv_k, name=f"{name}.allreduce")
            return compute.elementwise(lambda x, s, w: x / np.sqrt(s / E + eps) * w, h, ss, weight,
                                       ops_per_elem=3, name=f"{name}.scale", dtype="fp32")

    def rope_tables(self, pos: int):
        """Per-column cos/sin for this token's position, computed once per token."""
        if not self.mesh.numeric:
            return None, None
        if self._rope is None or self._rope[0] != pos:
            cos, sin = self.hl.rope_tables(self.config, [pos])
            self._rope = (pos, cos[0].reshape(1, self.mesh.cols, self.hl.tf),
                          sin[0].reshape(1, self.mesh.cols, self.hl.tf))
        return self._rope[1:]

    # ---- one layer -------------------------------------------------------------------
    def layer(self, idx: int, h: DistTensor, pos: int, movers: np.ndarray) -> DistTensor:
        hl, mesh, w = self.hl, self.mesh, self.w[idx]
        r, tf = hl.group, hl.tf
        x = self.rmsnorm(h, w["attn_norm"], "attn_norm")
        qkv = self._gemv(x, w["qkv"], "qkv_gemv")
        if "qkv_bias" in w:
            qkv = compute.elementwise(lambda a, b: a + b, qkv, w["qkv_bias"], name="qkv_bias", dtype="fp32")
        # the fused tile is [q (r*tf) | k (tf) | v (tf)]: slicing it is free (an address offset)
        tiles = qkv.tiles
        qt = None if tiles is None else tiles[..., : r * tf]
        kt = None if tiles is None else tiles[..., r * tf: (r + 1) * tf]
        vt = None if tiles is None else tiles[..., (r + 1) * tf:]
        qv = DistTensor(mesh, (hl.q_padded,), ("x",), "fp32", qt, name="q")
        kv = DistTensor(mesh, (hl.kv_padded,), ("x",), "fp32", kt, name="k")
        vv = DistTensor(mesh, (hl.kv_padded,), ("x",), self.dtype, vt, name="v")
        del qkv
        cos, sin = self.rope_tables(pos)
        qv = rope_on_mesh(qv, cos, sin, "rope_q")
        kv = rope_on_mesh(kv, cos, sin, "rope_k")
        self.cache.write(idx, kv, vv, movers)
        o = self.attention(idx, qv, movers)
        attn = self._gemv(o, w["o"], "o_gemv")
        h = compute.elementwise(lambda a, b: a + b, h, attn, name="residual", dtype="fp32")
        x = self.rmsnorm(h, w["ffn_norm"], "ffn_norm")
        gu = self._gemv(x, w["gate_up"], "gate_up_gemv")
        tff = self.tff
        act_tiles = None
        if gu.tiles is not None:
            g, u = gu.tiles[..., :tff].astype(np.float32, copy=False), gu.tiles[..., tff:].astype(np.float32, copy=False)
            act_tiles = g / (1 + np.exp(-g)) * u
        _charge(mesh, "silu_mul", vector_cycles(mesh.wafer, tff, "fp32", 5), 5 * tff, gu.bytes_per_pe, 4 * tff)
        act = DistTensor(mesh, (self.fpad,), ("x",), "fp32", act_tiles, name="act")
        del gu
        down = self._gemv(act, w["down"], "down_gemv")
        return compute.elementwise(lambda a, b: a + b, h, down, name="residual", dtype="fp32")

    def attention(self, idx: int, q: DistTensor, movers: np.ndarray) -> DistTensor:
        """softmax(q K^T / sqrt(D)) V for one new token against the cached ones."""
        c, hl, mesh, cache = self.config, self.hl, self.mesh, self.cache
        n, r, tf, hkv = mesh.rows, hl.group, hl.tf, c.num_kv_heads
        valid = cache.valid(movers)  # (n, cap), the new token included
        occ = int(valid.sum(axis=1).max())
        # slots to scan: a shift-based row is a ring buffer (all its slots); a concat row
        # fills from slot 0, so only the occupied prefix is read
        cap = cache.cap if cache.scheme == "shift" else max(occ, 1)
        valid = valid[:, :cap]
        hpc = self.heads_per_column
        led = mesh.ledger
        with led.span("attention"):
            # scores: each column multiplies its q features by its K^T block, per head
            s_tiles = None
            if mesh.numeric:
                qt = q.tiles.astype(np.float32, copy=False).reshape(n, n, r, tf)
                kt = cache.k[idx][..., :cap].astype(np.float32, copy=False)  # (n, n, tf, cap)
                prod = qt[..., :, :, None] * kt[:, :, None, :, :]  # (n,n,r,tf,cap)
                # sum each head's features: (n,n,r,cap,tf) @ (1,n,1,tf,Hkv)
                s_tiles = np.matmul(prod.transpose(0, 1, 2, 4, 3), self._onehot[None, :, None]).transpose(0, 1, 4, 2, 3)
            _charge(mesh, "qk_gemv", compute_cycles(mesh.wafer, r * tf * occ, self.dtype), 2 * r * tf * occ,
                    4 * r * tf + tf * occ * 2, 4 * hpc * r * occ)
            scores = DistTensor(mesh, (hkv, r, n * cap), (None, None, "y"), "fp32", s_tiles, name="scores",
                                partial=("x", "sum"))
            # each head's partials sum over the columns holding its features, all heads at once
            scores = comm.allreduce_segments(scores, "x", self.head_span, hpc * r * occ * 4, self.gemv_k,
                                             name="qk_allreduce")
            # softmax over tokens (split along y); empty slots are masked
            scale = 1.0 / math.sqrt(c.head_dim)
            vm = valid[:, None, None, None, :] if mesh.numeric else None
            with led.span("softmax"):
                z = compute.elementwise(lambda s: np.where(vm, s * scale, -np.inf), scores, ops_per_elem=1,
                                        name="softmax.scale", dtype="fp32")
                mx = compute.tile_reduce(z, 2, "max", name="softmax.max")
                mx = comm.allreduce(mx, "y", "max", k=self.gemv_k, name="softmax.allreduce_max")
                e = compute.elementwise(lambda s, m: np.where(vm, np.exp(s - m), 0.0) if vm is not None else s, z, mx,
                                        ops_per_elem=4, name="softmax.exp", dtype="fp32")
                tot = compute.tile_reduce(e, 2, "sum", name="softmax.sum")
                tot = comm.allreduce(tot, "y", "sum", k=self.gemv_k, name="softmax.allreduce_sum")
                p = compute.elementwise(lambda a, b: a / b, e, tot, ops_per_elem=1, name="softmax.div", dtype="fp32")
            # p V: each PE weights its V block by its heads' probabilities, then sum along y
            o_tiles = None
            if mesh.numeric:
                pt = p.tiles  # (n,n,Hkv,r,cap)
                vt = cache.v[idx][:, :, :cap].astype(np.float32, copy=False)  # (n,n,cap,tf)
                allh = np.matmul(pt, vt[:, :, None])  # (n,n,Hkv,r,tf): every head x feature
                sel = self._onehot.transpose(0, 2, 1)[None, :, :, None, :]  # (1,n,Hkv,1,tf): the feature's head
                o_tiles = (allh * sel).sum(axis=2).reshape(n, n, r * tf)
            _charge(mesh, "pv_gemv", compute_cycles(mesh.wafer, r * occ * tf, self.dtype), 2 * r * occ * tf,
                    4 * hpc * r * occ + 2 * occ * tf, 4 * r * tf)
            o = DistTensor(mesh, (hl.q_padded,), ("x",), "fp32", o_tiles, name="attn_out", partial=("y", "sum"))
            return comm.allreduce(o, "y", "sum", k=self.gemv_k, name="pv_allreduce")

    # ---- vocabulary slice ---------------------------------------------------------------
    def embed_lookup(self, token: int) -> DistTensor:
        """Broadcast the token's embedding column along x from the PE column that holds it."""
        table = self.embed if self.embed is not None else self.lm
        local = token - self.vocab.start
        tv = table.tile_shape[1]
        col, off = divmod(local, tv)
        with self.mesh.ledger.span("embedding"):
            # the root column's PEs hold the token's features (split along y) as one tile column
            tiles = None
            if table.tiles is not None:
                tiles = np.zeros(table.tiles.shape[:3], np.float32)
                tiles[:, col] = table.tiles[:, col, :, off]
            row = DistTensor(self.mesh, (self.config.hidden_size,), ("y",), "fp32", tiles, name="embedding_row")
            return comm.broadcast(row, "x", col, name="embedding.broadcast")

    def lm_head(self, x: DistTensor) -> tuple[np.ndarray | None, DistTensor]:
        """Logits of this region's vocabulary slice (x is already normalised, on this mesh)."""
        with self.mesh.ledger.span("lm_head"):
            out = gemv(x, self.lm, algo="meshgemv", k=self.gemv_k, broadcast=False, out_dtype="fp32",
                       name="logits").out
            # the slice's best token: a local max over the tile, then a max-allreduce of
            # (value, index) along the root row (what greedy sampling needs on the wafer)
            tv = out.tile_shape[0]
            _charge(self.mesh, "argmax.local", vector_cycles(self.mesh.wafer, tv, "fp32"), tv, 4 * tv, 8)
            pair = DistTensor(self.mesh, (2,), (None,), "fp32",
                              np.zeros((self.mesh.rows, self.mesh.cols, 2), np.float32) if self.mesh.numeric else None,
                              name="argmax")
            comm.allreduce(pair, "x", "max", k=self.gemv_k, name="argmax.allreduce")
        return (out.to_global() if out.tiles is not None else None), out
