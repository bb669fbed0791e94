"""Decode on the mesh: one token through a run of layers, every projection a MeshGEMV.

Layout ``B E_y L^x``: the hidden vector is split over mesh y and replicated along x.
GEMVs alternate their reduce axis so nothing is ever transposed:

    x (y) --QKV (W y,x)--> q,k,v (x) ... attention ... o (x) --O (W x,y)--> (y)
    x (y) --gate/up (W y,x)--> (x) --SiLU*up--> (x) --down (W x,y)--> (y)

W_O and W_down therefore get a decode-specific placement (input dim on x). With int8 or
int4 weights every matrix is stored as GGUF-style blocks (integers plus an fp16 scale per
32 values of its input dim) and dequantised by the PEs inside each GEMV. Q, K and V
come out of one fused GEMV: each PE column's weight tile is [q block | k block | v
block] for the same kv feature block (see ``layouts.HeadLayout``), so they land on the
columns that need them. K is cached transposed, so q K^T is one more GEMV-shaped
product reduced along x (within the columns of each head), and p V reduces along y.

A stage's :meth:`DecodeStage.step` runs the token through its layers and owns the KV
cache's append; every layer runs in an SRAM scope, so what it allocates lives exactly
until its last use.

Several requests decode together as a batch: the hidden states are [B, E] (None, y),
every GEMV a skinny MeshGEMM of B rows (``kernels.meshgemv``), and each request keeps
its own KV cache (``caches[seq]``) and runs its own attention over it. Cache 0 is the
single-request API's, sized for the whole context.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Callable

import numpy as np

from waferllm.engine import fused
from waferllm.engine.kvcache import KVCache
from waferllm.engine.layouts import HeadLayout
from waferllm.engine.placement import layer_matrices
from waferllm.kernels import batch
from waferllm.kernels.argmax import argmax
from waferllm.kernels.decode_attention import decode_attention
from waferllm.kernels.layer_ops import rmsnorm, rope, silu_mul, split_fused, under
from waferllm.kernels.meshgemv import gemv
from waferllm.kernels.norm_gemv import norm_gemv
from waferllm.mesh import comm, compute
from waferllm.errors import MeshError
from waferllm.mesh.tensor import QUANT_BITS, DistTensor, QuantTensor, tile_shape_for
from waferllm.models import quant

#: runs one layer's program: ``run_layer(key, fn, fused, pre)`` returns ``fn()``; or, having
#: replayed the cost of an identical program (``key``) instead, None in a dry run and
#: ``fused()`` (the same values as dense array operations, :mod:`waferllm.engine.fused`)
#: in a numeric one. ``pre()`` charges the layer's work that is not part of its program
#: (it runs either way, and counts as the layer's); ``dry()`` runs the program shape-only on
#: a twin of the stage's mesh (what a fused numeric run does with a program it has not run)
LayerRunner = Callable[..., object]


def run_now(key: tuple, fn: Callable, fused: Callable | None = None, pre: Callable | None = None, dry=None):
    if pre is not None:
        pre()
    return fn()


def place_matrices(mesh, li: int, lw, specs: dict, rows: dict, weights: str, dtype: str, place_b=None) -> dict:
    """Place one layer's tensors ``specs`` (key -> (shape, layout, dtype, build)), named
    ``L{li}.{key}``. With ``weights`` int8 or int4 the matrices (the keys of ``rows``, each
    the input-dim index of every placed row) are stored block-quantised: the builds applied
    to the layer's integers and to their scales alike, each tile column keeping the block
    scales its rows touch; they dequantise into ``dtype``. ``place_b`` (prefill) places a
    matrix as a pre-skewed MeshGEMM operand: ``place_b(shape_or_array, dtype, name, **quant)``."""
    quantised = weights in QUANT_BITS
    if lw is not None:
        lw = quant.quantize_layer(lw, weights) if quantised else quant.dequantize_layer(lw)
        ints = dataclasses.replace(lw, **{k: getattr(lw, k).q for k in quant.MATRICES}) if quantised else None
        scales = dataclasses.replace(lw, **{k: getattr(lw, k).scales() for k in quant.MATRICES}) if quantised else None
    out = {}
    for key, (shape, layout, dt, build) in specs.items():
        name = f"L{li}.{key}"
        if not quantised or key not in rows:
            host = build(lw) if lw is not None else shape
            out[key] = (place_b(host, dt, name) if place_b and key in rows
                        else mesh.place(host, layout, dt, name=name))
            continue
        tile_rows = tile_shape_for(shape, layout, mesh.shape)[0]
        kw = dict(scales=None if lw is None else build(scales), compute_dtype=dtype,
                  scale_slots=quant.scale_slots(rows[key], tile_rows))
        host = build(ints) if lw is not None else shape
        out[key] = (place_b(host, weights, name, **kw) if place_b
                    else QuantTensor.from_global(mesh, host, layout, weights, name=name, **kw))
    return out


def _runs(caches: list) -> list[tuple[int, int]]:
    """(first, end) rows of each request in a batch: a request's tokens come in a run."""
    out, lo = [], 0
    for b in range(1, len(caches) + 1):
        if b == len(caches) or caches[b] is not caches[lo]:
            out.append((lo, b))
            lo = b
    if len({id(caches[lo]) for lo, _ in out}) != len(out):
        raise MeshError("a request's tokens in a batch must be consecutive rows")
    return out


def _blocks(mats: list[np.ndarray], widths: list[int], parts: int) -> np.ndarray:
    """Concatenate column blocks so PE column j holds [m0 block j | m1 block j | ...]."""
    split = [m.reshape(m.shape[0], parts, w) for m, w in zip(mats, widths)]
    return np.concatenate(split, axis=2).reshape(mats[0].shape[0], -1)


class DecodeStage:
    """The decode program of one region: its layers' weights, KV cache, and vocab slice."""

    def __init__(self, mesh, config, layer_ids: range, layers, vocab: range, lm_head, embed, final_norm,
                 capacity_tokens: int, dtype: str = "fp16", kv_scheme: str = "shift", gemv_k: int = 2,
                 gemv_group: int | None = None, weights: str = "fp16", collectives: str = "paper",
                 ktree: str = "paper", overlap: str = "paper"):
        self.mesh = mesh
        self.config = config
        self.layer_ids = layer_ids
        self.vocab = vocab
        self.dtype = dtype
        # how the layers' matrices are stored: dense in ``dtype`` ("fp16"), or int8 / int4 blocks
        self.weights = weights
        # the K-tree of every allreduce: K levels, groups of about n^(1/K) PEs unless given;
        # "tuned": K and group chosen per reduction by the cost model (comm.best_ktree)
        self.ktree = {"k": "tuned", "group": None} if ktree == "tuned" else {"k": gemv_k, "group": gemv_group}
        # "fused": RMSNorm statistics ride with the following GEMV's reduce (kernels.norm_gemv) and
        # attention's softmax statistics with its P V reduce (one collective instead of three)
        self.fused = collectives == "fused"
        # "segmented": every layer GEMV streams its reduce in segments of output columns, the
        # product of the next chunk overlapping it, as many as the cost model finds fastest
        self.segments = "tuned" if overlap == "segmented" else 1
        q = mesh.rows
        c = config
        self.hl = hl = HeadLayout(c.num_heads, c.num_kv_heads, c.head_dim, q)
        self.ffn_per_column = -(-c.intermediate_size // q)
        self.ffn_padded = self.ffn_per_column * q
        E = c.hidden_size
        self.w = [self._place_layer(li, lw) for li, lw in zip(layer_ids, layers)]
        # vocab slice of the LM head [E, Vc] (y, x); also the embedding table when tied
        vc = len(vocab)
        self.lm = mesh.place(lm_head if lm_head is not None else (E, vc), ("y", "x"), dtype, name="lm_head")
        self.embed = None
        if not c.tie_word_embeddings:
            self.embed = mesh.place(embed if embed is not None else (E, vc), ("y", "x"), dtype, name="embedding")
        self.final_norm = mesh.place(final_norm if final_norm is not None else (E,), ("y",), "fp32", name="final_norm")
        self.kv_scheme = kv_scheme
        self.caches: dict[int, KVCache] = {}  # request slot -> its KV cache
        self.dense: dict = {}  # fused numerics: a layer's (and the LM head's) float32 values, from first use
        self.open_cache(0, capacity_tokens)
        self._rope = None

    # ---- per-request caches -------------------------------------------------------------
    @property
    def cache(self) -> KVCache:
        """The single-request API's cache (slot 0)."""
        return self.caches[0]

    def open_cache(self, seq: int, capacity_tokens: int) -> KVCache:
        """A KV cache for the request in slot ``seq``, holding up to ``capacity_tokens``."""
        if seq in self.caches:
            raise MeshError(f"request slot {seq} already has a KV cache")
        ids = self.layer_ids
        self.caches[seq] = KVCache(self.mesh, self.hl, len(ids), capacity_tokens, self.kv_scheme, self.dtype,
                                   name=f"kv{seq or ''}[{ids.start}:{ids.stop}]")
        return self.caches[seq]

    def close_cache(self, seq: int) -> None:
        """The request in slot ``seq`` is done: its cache's SRAM is free."""
        cache = self.caches.pop(seq, None)
        if cache is not None:
            cache.free()

    # ---- placement -------------------------------------------------------------------
    def _place_layer(self, li: int, lw) -> dict:
        """One layer's weights in the decode placement (``lw`` None: shapes only, dry run)."""
        m, c, hl, d = self.mesh, self.config, self.hl, self.dtype
        E, q = c.hidden_size, m.rows
        r, width = hl.group, hl.col_features
        ffn, ffn_padded = self.ffn_per_column, self.ffn_padded
        fcols = np.where(np.arange(ffn_padded) < c.intermediate_size, np.arange(ffn_padded), -1)
        # key: (logical shape, layout, dtype, host array from the layer's weights)
        specs = {
            "qkv": ((E, q * (r + 2) * width), ("y", "x"), d, lambda w: _blocks(
                [hl.take_cols(w.wq, hl.q_cols), hl.take_cols(w.wk, hl.kv_cols), hl.take_cols(w.wv, hl.kv_cols)],
                [r * width, width, width], q)),
            "o": ((hl.q_padded, E), ("x", "y"), d, lambda w: hl.take_rows(w.wo, hl.q_cols)),
            "gate_up": ((E, 2 * ffn_padded), ("y", "x"), d, lambda w: _blocks(
                [hl.take_cols(w.w_gate, fcols), hl.take_cols(w.w_up, fcols)], [ffn, ffn], q)),
            "down": ((ffn_padded, E), ("x", "y"), d, lambda w: hl.take_rows(w.w_down, fcols)),
            "attn_norm": ((E,), ("y",), "fp32", lambda w: w.attn_norm),
            "ffn_norm": ((E,), ("y",), "fp32", lambda w: w.ffn_norm),
        }
        # the input-dim (K) index of every placed row of each matrix: where its block scales come from
        rows = {key: k_rows for key, (k_rows, _, _) in layer_matrices(c, q, "decode").items()}
        if c.qkv_bias:
            specs["qkv_bias"] = ((q * (r + 2) * width,), ("x",), "fp32", lambda w: _blocks(
                [hl.take_cols(w.bq[None], hl.q_cols), hl.take_cols(w.bk[None], hl.kv_cols),
                 hl.take_cols(w.bv[None], hl.kv_cols)], [r * width, width, width], q)[0])
        return place_matrices(m, li, lw, specs, rows, self.weights, d)

    # ---- building blocks ---------------------------------------------------------------
    def _gemv(self, x, w, name):
        with self.mesh.ledger.span(name):
            return gemv(x, w, algo="meshgemv", **self.ktree, out_dtype="fp32", name=name, segments=self.segments).out

    def rmsnorm(self, h: DistTensor, weight: DistTensor, name: str) -> DistTensor:
        """h [E] (y) or [B, E] (None, y): sum of squares allreduced along y, then scaled on every PE."""
        rows = h.shape[0] if len(h.shape) == 2 else 1  # one fp32 statistic per token
        k, group = comm.ktree_for(self.mesh, "y", rows * 4, self.ktree["k"], self.ktree["group"])
        return rmsnorm(h, weight, len(h.shape) - 1, self.config.rms_norm_eps, "fp32", k=k, group=group, name=name)

    def norm_gemv(self, h: DistTensor, weight: DistTensor, w: DistTensor, name: str) -> DistTensor:
        """RMSNorm(h) @ W: with fused collectives one reduce carries the GEMV's partials and
        the norm's statistic; else the paper's RMSNorm, then its MeshGEMV."""
        norm_name, gemv_name = name.split("+")
        if not self.fused:
            x = self.rmsnorm(h, weight, norm_name)
            out = self._gemv(x, w, gemv_name)
            self.mesh.sram.release(x)
            return out
        with self.mesh.ledger.span(name):
            return norm_gemv(h, weight, w, self.config.rms_norm_eps, **self.ktree, out_dtype="fp32", name=name,
                             segments=self.segments).out

    def rope_tables(self, positions: tuple[int, ...]):
        """Per-column cos/sin for the batch's positions, computed once per step: (1, cols, B, F)."""
        if not self.mesh.numeric:
            return None, None
        if self._rope is None or self._rope[0] != positions:
            cos, sin = self.hl.rope_tables(self.config, list(positions))  # [B, cols * F]
            shape = (len(positions), self.mesh.cols, self.hl.col_features)
            self._rope = (positions, cos.reshape(shape).transpose(1, 0, 2)[None],
                          sin.reshape(shape).transpose(1, 0, 2)[None])
        return self._rope[1:]

    # ---- one step ---------------------------------------------------------------------
    def step(self, h: DistTensor, pos, run_layer: LayerRunner = run_now, seqs: tuple[int, ...] = (0,)) -> DistTensor:
        """The tokens of the requests in slots ``seqs`` (hidden states ``h`` [B, E] (None, y),
        consumed; at positions ``pos``) through this region's layers, appending their K and V
        to their caches. One request may come as ``h`` [E] (y) with ``pos`` an int (slot 0).
        A layer ``run_layer`` replays still advances the caches' bookkeeping."""
        single = len(h.shape) == 1
        if single:
            h, pos = batch.as_batch(h), (pos,)
        caches = [self.caches[s] for s in seqs]
        positions = tuple(int(p) for p in pos)
        # a request may come with several tokens, in order (a verification pass): each layer
        # appends them one after another, each token attending over the cache up to itself
        tokens = Counter(seqs)
        for s, n in tokens.items():
            self.caches[s].begin(n)
        # the layer's program: the batch and each cache's state (each cache charges its append
        # itself); in a numeric run with concat caches also whether the layer is the last,
        # whose append grows them (its SRAM high-water mark differs)
        key = ("decode", len(caches)) + tuple(self.caches[s].program_key(n) for s, n in tokens.items())
        appending = [self.caches[s] for s in tokens]
        grows = self.mesh.numeric and caches[0].scheme == "concat"
        for idx, li in enumerate(self.layer_ids):
            # (the growth is a slot of every layer the region holds: their count keys it too)
            last = (idx == len(self.layer_ids) - 1, len(self.layer_ids)) if grows else ()
            with self.mesh.ledger.span(f"layer{li}"):
                out = run_layer(key + last, lambda: self.layer(idx, h, positions, caches),
                                lambda: fused.decode_layer(self, idx, h, positions, caches),
                                lambda: [c.charge_append() for c in appending])
            if out is None:
                for c in caches:
                    c.update(idx)
            else:
                self.mesh.sram.release(h)  # a layer's input lives until the layer is done
                h = out
        return batch.unbatch(h) if single else h

    def skip_step(self, seqs: tuple[int, ...] = (0,)) -> None:
        """A step whose whole cost was replayed: advance the caches as the step would."""
        for s in seqs:
            self.caches[s].advance()

    def layer(self, idx: int, h: DistTensor, positions: tuple[int, ...], caches: list[KVCache]) -> DistTensor:
        """One decoder layer for a batch: h [B, E] (None, y) -> [B, E] (None, y)."""
        w, hl, sram = self.w[idx], self.hl, self.mesh.sram
        r, width, B = hl.group, hl.col_features, len(caches)
        with sram.scope() as scope:
            # [B, E] (None, y) -> [B, cols * (r+2) * F] (None, x): column j [q_j | k_j | v_j]
            qkv = self.norm_gemv(h, w["attn_norm"], w["qkv"], "attn_norm+qkv_gemv")
            if "qkv_bias" in w:
                biased = compute.elementwise(lambda a, b: a + under(b, a), qkv, w["qkv_bias"], name="qkv_bias",
                                             dtype="fp32")
                scope.release(qkv)
                qkv = biased
            # [B, q_padded] [B, kv_padded] [B, kv_padded] (None, x): address ranges of the fused tile
            q, k, v = split_fused(qkv, [((hl.q_padded,), r * width), ((hl.kv_padded,), width),
                                        ((hl.kv_padded,), width)])
            cos, sin = self.rope_tables(positions)
            q = rope(q, cos, sin, "rope_q")
            k = rope(k, cos, sin, "rope_k")
            outs = []
            for lo, hi in _runs(caches):  # each request attends over its own cache
                cache = caches[lo]
                for b in range(lo, hi):  # a verification pass appends its tokens in order
                    kv = cache.update(idx, batch.row(k, b), batch.row(v, b))
                if hi - lo == 1:
                    query, valid = batch.row(q, lo), kv.valid  # [q_padded] (x)
                else:  # its tokens' queries at once: [T * q_padded] (x), T*r heads per kv head
                    query, valid = batch.rows_as_heads(q, lo, hi), kv.causal(hi - lo)
                o = decode_attention(query, kv.k_t, kv.v, valid, hl.head_of_pos, self.config.num_kv_heads,
                                     1.0 / math.sqrt(self.config.head_dim), **self.ktree, fused=self.fused)
                outs += [o] if hi - lo == 1 else batch.heads_as_rows(o, hi - lo)  # [q_padded] (x) each
            scope.release(qkv, k, q)
            o = batch.stack(outs, name="attention")  # [B, q_padded] (None, x)
            attn = self._gemv(o, w["o"], "o_gemv")  # [B, E] (None, y)
            scope.release(o)
            h = compute.elementwise(lambda a, b: a + b, h, attn, name="residual", dtype="fp32")
            scope.release(attn)
            gu = self.norm_gemv(h, w["ffn_norm"], w["gate_up"], "ffn_norm+gate_up_gemv")  # [B, 2 * ffn_padded] (None, x)
            g, u = split_fused(gu, [((self.ffn_padded,), self.ffn_per_column)] * 2)
            act = silu_mul(g, u, "fp32")  # [B, ffn_padded] (None, x)
            scope.release(gu)
            down = self._gemv(act, w["down"], "down_gemv")  # [B, E] (None, y)
            scope.release(act)
            return scope.keep(compute.elementwise(lambda a, b: a + b, h, down, name="residual", dtype="fp32"))

    # ---- vocabulary slice ---------------------------------------------------------------
    def embed_lookup(self, token: int) -> DistTensor:
        """Broadcast the token's embedding column along x from the PE column that holds it."""
        table = self.embed if self.embed is not None else self.lm
        local = token - self.vocab.start
        col, off = divmod(local, table.tile_shape[1])
        with self.mesh.ledger.span("embedding"):
            # the root column's PEs hold the token's features (split along y) as one tile column
            tiles = None
            if table.tiles is not None:
                tiles = np.zeros(table.tiles.shape[:3], np.float32)
                tiles[:, col] = table.tiles[:, col, :, off]
            row = DistTensor(self.mesh, (self.config.hidden_size,), ("y",), "fp32", tiles, name="embedding_row")
            out = comm.broadcast(row, "x", col, name="embedding.broadcast")  # [E] (y)
            self.mesh.sram.release(row)
            return out

    def lm_head(self, x: DistTensor) -> tuple[np.ndarray | None, DistTensor | list[DistTensor]]:
        """Logits of this region's vocabulary slice (x [E] or a batch [B, E], already
        normalised, on this mesh) and each row's best (value, index): what greedy sampling
        needs on the wafer."""
        with self.mesh.ledger.span("lm_head"):
            # [Vc] (x) or [B, Vc] (None, x), reduced to a root row (no broadcast back)
            out = gemv(x, self.lm, algo="meshgemv", **self.ktree, broadcast=False, out_dtype="fp32",
                       name="logits").out
            if len(out.shape) == 1:
                best = argmax(out, k=self.ktree["k"])
            else:  # each request's row
                best = [argmax(batch.row(out, b), k=self.ktree["k"]) for b in range(out.shape[0])]
        return (out.to_global() if out.tiles is not None else None), best
