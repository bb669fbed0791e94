"""Prefill on the mesh: the whole prompt through a run of layers, every projection a MeshGEMM.

Layout ``B L_y E_x``: tokens split over mesh y, features over mesh x. Weights are
2D-partitioned and pre-skewed for MeshGEMM at placement; Q/K/V share one skew of the
normalised activations, as do gate/up. Attention runs per pass of kv heads (as many as
the SRAM budget allows): Q K^T by the grouped dist-GEMM-T, a causal softmax with its
max and sum allreduced along x, then P V by the grouped MeshGEMM (both activations
skewed on the mesh). With ``attention="streaming"`` each pass instead runs
:func:`~waferllm.kernels.flash_attention.streaming_attention` (K and V blocks in flight, an
online softmax), whose score tiles are small enough for many more heads per pass.
RMSNorm statistics are allreduced along x; RoPE uses each token's true position.

A stage's :meth:`PrefillStage.step` runs the prompt through its layers and returns each
layer's K and V (kept for the decode cache); every layer runs in an SRAM scope, so what
it allocates lives exactly until its last use.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from waferllm.engine import fused
from waferllm.engine.decode import LayerRunner, place_matrices, run_now
from waferllm.engine.layouts import HeadLayout
from waferllm.engine.placement import layer_matrices
from waferllm.errors import MeshError
from waferllm.kernels.attention import grouped_pv, grouped_scores
from waferllm.kernels.flash_attention import streaming_attention
from waferllm.kernels.layer_ops import masked_softmax, rmsnorm, rope, silu_mul
from waferllm.kernels.meshgemm import meshgemm, place_b, skew_blocks
from waferllm.mesh import comm, compute
from waferllm.mesh.ledger import Ledger
from waferllm.mesh.move import Placement
from waferllm.mesh.runtime import Mesh
from waferllm.mesh.tensor import DistTensor

#: the prefill attention algorithms (``RunConfig.prefill_attention``)
ATTENTION = ("paper", "streaming")


class PrefillStage:
    """The prefill program of one region: its layers' weights and its vocabulary slice."""

    def __init__(self, mesh, config, layer_ids: range, layers, vocab: range, lm_head, embed, final_norm,
                 dtype: str = "fp16", heads_per_pass: int = 1, weights: str = "fp16", attention: str = "paper"):
        if attention not in ATTENTION:
            raise MeshError(f"prefill attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        self.mesh = mesh
        self.config = config
        self.layer_ids = layer_ids
        self.vocab = vocab
        self.dtype = dtype
        # how the layers' matrices are stored: dense in ``dtype`` ("fp16"), or int8 / int4 blocks
        self.weights = weights
        self.heads_per_pass = max(1, heads_per_pass)
        # "paper": whole score tiles per pass (dist-GEMM-T, softmax, MeshGEMM); "streaming":
        # key blocks in flight with an online softmax (kernels.flash_attention)
        self.prefill_attention = attention
        n = mesh.rows
        c = config
        self.hl = HeadLayout(c.num_heads, c.num_kv_heads, c.head_dim, n)
        self.w = [self._place_layer(li, lw) for li, lw in zip(layer_ids, layers)]
        E = c.hidden_size
        # vocab slice of the LM head [E, Vc] (y, x), pre-skewed for MeshGEMM; its columns are
        # also the embedding table's when tied, otherwise that table is placed beside it
        self.lm = place_b(mesh, lm_head if lm_head is not None else (E, len(vocab)), dtype, name="lm_head")
        self.embed = None
        if not c.tie_word_embeddings:
            self.embed = mesh.place(embed if embed is not None else (E, len(vocab)), ("y", "x"), dtype,
                                    name="embedding")
        self.final_norm = mesh.place(final_norm[None] if final_norm is not None else (1, E), (None, "x"), "fp32",
                                     name="final_norm")
        self.dense: dict = {}  # fused numerics: a layer's (and the LM head's) float32 values, from first use

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
        # the input-dim (K) index of every placed row of each matrix: where its block scales come from
        k_rows = {key: k for key, (k, _, _) in layer_matrices(c, m.rows, "prefill").items()}
        specs = {key: (shape, ("y", "x"), d, build) for key, (shape, build) in mats.items()}
        specs.update({key: (shape, (None, "x"), "fp32", build) for key, (shape, build) in rows.items()})
        return place_matrices(m, li, lw, specs, k_rows, self.weights, d,
                              place_b=lambda host, dt, name, **kw: place_b(m, host, dt, name=name, **kw))

    # ---- building blocks ---------------------------------------------------------------
    def _mm(self, a, b, name, a_skewed=False):
        with self.mesh.ledger.span(name):
            return meshgemm(a, b, a_skewed=a_skewed, out_dtype=self.dtype, name=name)

    def _add_bias(self, t: DistTensor, bias: DistTensor, name: str) -> DistTensor:
        out = compute.elementwise(lambda a, b: a + b, t, bias, name=name)
        self.mesh.sram.release(t)
        return out

    def rmsnorm(self, h: DistTensor, weight: DistTensor, name: str) -> DistTensor:
        """h [L, E] (y, x): each row's sum of squares allreduced along x, then scaled."""
        return rmsnorm(h, weight, 1, self.config.rms_norm_eps, self.dtype, name=name)

    def rope_tables(self, positions: np.ndarray):
        """cos/sin of every token's true position for this region's feature blocks: (n, n, tl, F)."""
        if not self.mesh.numeric:
            return None, None
        hl, n = self.hl, self.mesh.rows
        L = len(positions)
        tl = -(-L // n)

        def tile(a):  # [L, kv_padded] -> (rows, cols, tl, F): token rows along y, features along x
            a = np.pad(a, ((0, tl * n - L), (0, 0)))
            return a.reshape(n, tl, n, hl.col_features).transpose(0, 2, 1, 3)

        cos, sin = hl.rope_tables(self.config, positions)
        return tile(cos), tile(sin)

    # ---- the prompt -------------------------------------------------------------------
    def step(self, h: DistTensor, length: int, run_layer: LayerRunner = run_now):
        """The prompt (hidden states ``h`` [L, E] (y, x), consumed) through this region's layers.

        Returns the new hidden states and every layer's (K, V) [L, kv_padded] (y, x), kept
        for the decode cache. A layer ``run_layer`` replays still holds its K and V."""
        tables = self.rope_tables(np.arange(length))
        kv = []
        for idx, li in enumerate(self.layer_ids):
            with self.mesh.ledger.span(f"layer{li}"):
                # the program depends on the prompt's tile rows, not its length: prompts that
                # pad to the same tiles cost alike (only their values and masks differ)
                out = run_layer(("prefill", h.tile_shape[0]), lambda: self.layer(idx, h, length, tables),
                                lambda: fused.prefill_layer(self, idx, h, length),
                                dry=lambda: self.dry_layer(idx, h, length))
            if out is None:
                shape = (length, self.hl.kv_padded)
                out = (h, self.mesh.place(shape, ("y", "x"), self.dtype, name="k_prefill"),
                       self.mesh.place(shape, ("y", "x"), self.dtype, name="v_prefill"))
            elif out[0] is not h:
                self.mesh.sram.release(h)  # a layer's input lives until the layer is done
            h, k, v = out
            kv.append((k, v))
        return h, kv

    def dry_layer(self, idx: int, h: DistTensor, length: int):
        """Layer ``idx``'s program shape-only on a twin of this stage's mesh (``Mesh.dry_twin``):
        what executing it here charges, holds and routes, without its values. Returns its SRAM
        footprint and the twin."""
        twin = self.mesh.dry_twin()
        stage = copy.copy(self)
        stage.mesh = twin
        stage.w = {idx: {key: t.shape_on(twin) for key, t in self.w[idx].items()}}
        hidden = h.shape_on(twin)  # held here, as the caller holds h, until the layer is done
        with twin.sram.recording() as footprint:
            stage.layer(idx, hidden, length, (None, None))
        return footprint, twin

    def layer(self, idx: int, h: DistTensor, length: int, tables) -> tuple[DistTensor, DistTensor, DistTensor]:
        """One decoder layer: h [L, E] (y, x) -> the new hidden states, and this layer's K and V."""
        w, sram = self.w[idx], self.mesh.sram
        with sram.scope() as scope:
            x = self.rmsnorm(h, w["attn_norm"], "attn_norm")  # [L, E] (y, x)
            qr = self._mm(x, w["q"], "q_proj")  # [L, q_padded] (y, x)
            skewed = qr.state["a_skewed"]  # Q, K and V share one skew of x
            k = self._mm(skewed, w["k"], "k_proj", a_skewed=True).out  # [L, kv_padded] (y, x)
            v = self._mm(skewed, w["v"], "v_proj", a_skewed=True).out
            q = qr.out
            scope.release(x, skewed)
            if "bq" in w:
                q, k, v = (self._add_bias(t, w[key], f"bias_{key[1]}") for t, key in ((q, "bq"), (k, "bk"), (v, "bv")))
            q_rot = rope(q, *tables, "rope_q")
            scope.release(q)
            k_rot = rope(k, *tables, "rope_k")
            scope.release(k)
            o = self.attention(q_rot, k_rot, v, length)  # [L, q_padded] (y, x)
            scope.release(q_rot)
            a = self._mm(o, w["o"], "o_proj").out  # [L, E] (y, x)
            scope.release(o)
            h = compute.elementwise(lambda p, s: p + s, h, a, name="residual", dtype=self.dtype)
            scope.release(a)
            x = self.rmsnorm(h, w["ffn_norm"], "ffn_norm")
            gr = self._mm(x, w["gate"], "gate_proj")  # [L, F] (y, x)
            u = self._mm(gr.state["a_skewed"], w["up"], "up_proj", a_skewed=True).out
            g = gr.out
            scope.release(x, gr.state["a_skewed"])
            act = silu_mul(g, u, self.dtype)
            scope.release(g, u)
            d = self._mm(act, w["down"], "down_proj").out  # [L, E] (y, x)
            scope.release(act)
            out = compute.elementwise(lambda p, s: p + s, h, d, name="residual", dtype=self.dtype)
            return scope.keep(out, k_rot, v)

    def _passes(self):
        """Each attention pass's kv heads and every feature's head within it (-1: another
        pass's head, or padding)."""
        hl, c = self.hl, self.config
        for g0 in range(0, c.num_kv_heads, self.heads_per_pass):
            heads = range(g0, min(c.num_kv_heads, g0 + self.heads_per_pass))
            yield heads, np.where((hl.head_of_pos >= heads.start) & (hl.head_of_pos < heads.stop),
                                  hl.head_of_pos - heads.start, -1)

    def attention(self, q: DistTensor, k: DistTensor, v: DistTensor, length: int) -> DistTensor:
        """Causal attention of q [L, q_padded] against k, v [L, kv_padded] (all (y, x)), in passes
        of ``heads_per_pass`` kv heads (the score tiles are what limits long prompts)."""
        if self.prefill_attention == "streaming":
            return self._streaming_attention(q, k, v, length)
        hl, c, mesh = self.hl, self.config, self.mesh
        n = mesh.rows
        tq, tk = q.tile_shape[0], k.tile_shape[0]
        scale = 1.0 / math.sqrt(c.head_dim)
        allowed = None
        if mesh.numeric:
            query_index = np.arange(n)[:, None] * tq + np.arange(tq)[None, :]  # (rows, tq): PE row i's queries
            key_index = np.arange(n)[:, None] * tk + np.arange(tk)[None, :]  # (cols, tk): PE column j's keys
            # causal and real keys only: (rows, cols, 1, 1, tq, tk) against the score tiles
            allowed = ((key_index[None, :, None, :] <= query_index[:, None, :, None])
                       & (key_index[None, :, None, :] < length))[:, :, None, None]
        out = None
        with mesh.ledger.span("attention"):
            for heads, pass_head in self._passes():
                # [heads, r, L, L] (None, None, y, x)
                s = grouped_scores(q, k, pass_head, len(heads), hl.group, name="scores").out
                p = masked_softmax(s, allowed, scale, dim=3, out_dtype=self.dtype)
                part = grouped_pv(p, v, pass_head, out_dtype="fp32", name="attn_out").out  # [L, q_padded] (y, x)
                mesh.sram.release(p)
                if out is None:
                    out = part
                    continue
                total = compute.elementwise(lambda a, b: a + b, out, part, name="attn_accumulate", dtype="fp32")
                mesh.sram.release(out, part)
                out = total
        return self._cast(out)

    def _streaming_attention(self, q: DistTensor, k: DistTensor, v: DistTensor, length: int) -> DistTensor:
        """The same attention with key blocks in flight and an online softmax, pass by pass: a
        PE's score tile holds one key block of its own features' heads."""
        scale = 1.0 / math.sqrt(self.config.head_dim)
        out = None
        with self.mesh.ledger.span("attention"):
            for _, pass_head in self._passes():
                # [L, q_padded] (y, x) fp32: each pass normalises its own heads' features
                out = streaming_attention(q, k, v, pass_head, self.hl.group, length, scale, out=out).out
        return self._cast(out)

    def _cast(self, out: DistTensor) -> DistTensor:
        if out.dtype == self.dtype:
            return out
        cast = out.with_tiles(out.tiles, dtype=self.dtype, name="attn_out")
        self.mesh.sram.release(out)
        return cast

    # ---- vocabulary slice ------------------------------------------------------------
    def embedding_source(self, token_ids: np.ndarray) -> Placement:
        """Where the embedding rows of ``token_ids`` (all in this region's vocabulary) are:
        [m, E], each token on the PE column that holds its vocabulary entry, its features
        split over the rows as the table holds them (the tied table is the LM head, whose
        feature blocks are pre-skewed for MeshGEMM)."""
        table = self.embed if self.embed is not None else self.lm
        (te, tv), E, n = table.tile_shape, self.config.hidden_size, self.mesh.rows
        shape = (len(token_ids), E)
        cols = (np.asarray(token_ids) - self.vocab.start) // tv
        if self.embed is not None:
            return Placement(self.mesh.region, shape, y_dim=1, y_of=np.arange(E) // te, x_dim=0, x_of=cols)
        kappa = skew_blocks(n, "interleave", "B")[0]  # PE (i, j) holds feature block kappa[i, j]
        ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        pe_rows, pe_cols = np.empty((n, n), np.int64), np.empty((n, n), np.int64)
        pe_rows[kappa, jj], pe_cols[kappa, jj] = ii, jj  # [feature block, vocab block] -> PE
        return Placement(self.mesh.region, shape, y_dim=1, y_of=np.arange(E) // te, x_dim=0, x_of=cols,
                         pe_rows=pe_rows, pe_cols=pe_cols)

    def lm_head(self, h: DistTensor) -> DistTensor:
        """Logits [rows of h, vocab slice] of normalised hidden states on this mesh."""
        with self.mesh.ledger.span("lm_head"):
            return meshgemm(h, self.lm, out_dtype="fp32", name="logits").out

    def dry_lm_head(self, h: DistTensor):
        """:meth:`lm_head` shape-only on a twin of this stage's mesh, as :meth:`dry_layer`
        runs a layer: returns its SRAM footprint and the twin."""
        twin = self.mesh.dry_twin()
        stage = copy.copy(self)
        stage.mesh, stage.lm = twin, self.lm.shape_on(twin)
        with twin.sram.recording() as footprint:
            stage.lm_head(h.shape_on(twin))
        return footprint, twin


def predicted_cycles(config, wafer, regions, counts, seq_len: int, dtype: str = "fp16", weights: str = "fp16",
                     heads_per_pass: int = 1, attention: str = "paper", memo: dict | None = None) -> float:
    """Predicted cycles of a prompt of ``seq_len`` tokens through layers placed ``counts`` per
    region of ``regions`` (in pipeline order): one layer of each region side executed
    shape-only on its own mesh (identical layers cost alike) times its count, plus the
    hidden states' move from each region holding layers to the next. The planner weighs
    placements with it (``placement._weigh_passes``); ``memo`` keeps layer cycles by
    region side and heads per pass across calls."""
    ledger = Ledger(wafer, keep_events=False)
    per_side = {} if memo is None else memo
    total, prev = 0.0, None
    for region, count in zip(regions, counts):
        if not count:
            continue
        # layers of one side cost alike, unless defective PEs make each square's links its own
        where = (region.row0, region.col0) if wafer.defective_pes else ()
        key = (region.rows, *where, heads_per_pass)
        if key not in per_side:
            mesh = Mesh(region, mode="dry", ledger=ledger)
            stage = PrefillStage(mesh, config, range(1), [None], range(region.cols), None, None, None, dtype,
                                 heads_per_pass, weights, attention)
            h = mesh.place((seq_len, config.hidden_size), ("y", "x"), dtype, name="hidden")
            mark = ledger.mark()
            stage.layer(0, h, seq_len, stage.rope_tables(np.arange(seq_len)))
            per_side[key] = ledger.since(mark)["cycles"]
        total += count * per_side[key]
        mesh = Mesh(region, mode="dry", ledger=ledger)
        if prev is not None:  # [L, E] (y, x) on to this region, as the pipeline moves it
            h = prev.place((seq_len, config.hidden_size), ("y", "x"), dtype, name="hidden")
            mark = ledger.mark()
            comm.relayout(h, mesh, ("y", "x"), name="stage_transfer")
            total += ledger.since(mark)["cycles"]
        prev = mesh
    return total
