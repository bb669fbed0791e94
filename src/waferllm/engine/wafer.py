"""The wafer backend: a model placed on the simulated wafer, run phase by phase.

``WaferModel`` builds the placement plan, places every weight on its region (numeric:
real tiles; dry run: shapes only), and exposes the backend protocol the generation loop
drives: ``reset()``, ``prefill(ids)``, ``decode(token)``. The same execution yields
the logits and, in its ledger, the predicted wafer time, energy and breakdown.

Per request: prefill runs the prompt through the prefill pipeline; the transition
re-places weights and KV cache into the decode layout (costed, once per request); each
decode step runs one token through the decode pipeline. The LM head's vocabulary is
sliced over all regions of a phase, whose slices run at the same time.

Dry runs do not repeat identical work: a layer whose program (shapes, layouts,
constants, cache occupancy) equals one already executed has that execution's cost
replayed (``Ledger.replay``). Numeric runs execute everything.
"""

from __future__ import annotations

import time

import numpy as np

from waferllm.engine.decode import DecodeStage
from waferllm.engine.placement import plan as make_plan
from waferllm.engine.prefill import PrefillStage
from waferllm.errors import RequestError
from waferllm.hardware import get_wafer
from waferllm.hardware.plmr import WaferSpec
from waferllm.mesh import comm
from waferllm.mesh.ledger import Ledger
from waferllm.mesh.runtime import Mesh
from waferllm.mesh.tensor import DistTensor


class WaferModel:
    def __init__(self, config, weights=None, wafer: str | WaferSpec = "wse2", prefill_grid: int = 32,
                 decode_grid: int = 32, max_seq_len: int = 2048, prompt_len: int | None = None, mode: str = "numeric",
                 dtype: str = "fp16", kv_scheme: str = "shift", layers: int | None = None, progress=None,
                 route_policy: str = "relay"):
        self.config = config
        self.wafer = wafer if isinstance(wafer, WaferSpec) else get_wafer(wafer)
        self.mode = mode
        self.dtype = dtype
        self.kv_scheme = kv_scheme
        self.max_seq_len = int(max_seq_len)
        self.layers = config.num_layers if layers is None else int(layers)
        if not 1 <= self.layers <= config.num_layers:
            raise RequestError(f"layers must be in 1..{config.num_layers}, got {layers}")
        if mode == "numeric" and weights is None:
            raise RequestError("a numeric run needs weights; use mode='dry' for shape-only prediction")
        self.plan = make_plan(config, self.wafer, prefill_grid, decode_grid, self.max_seq_len, dtype,
                              prompt_len=prompt_len, layers=self.layers)
        self.ledger = Ledger(self.wafer, keep_events=(mode == "numeric"))
        self.weights = weights
        t0 = time.perf_counter()
        total = 2 * self.layers
        done = [0]

        def tick(desc):
            done[0] += 1
            if progress:
                progress(done[0], total, desc)

        pre, dec = self.plan.prefill, self.plan.decode
        self.prefill_stages = [self._prefill_stage(st, tick) for st in pre.stages] if pre else []
        self.decode_stages = [self._decode_stage(st, tick) for st in dec.stages] if dec else []
        self.placement_wall_s = time.perf_counter() - t0
        self._memo: dict = {}
        self.position = 0
        self.layer_cycles = {"prefill": 0.0, "decode": 0.0}
        self.want_prompt_logits = False
        self.step_cycles: list[float] = []
        self.phase_cycles = {"prefill": 0.0, "transition": 0.0, "decode": 0.0}

    # ---- placement ---------------------------------------------------------------------
    def _host(self, what: str, sl=None):
        w = self.weights
        if w is None:
            return None
        if what == "lm":
            return np.asarray(w.lm_head[:, sl], np.float32)
        if what == "embed":
            return np.asarray(w.embed[sl].T, np.float32)
        if what == "final_norm":
            return np.asarray(w.final_norm, np.float32)
        raise KeyError(what)

    def _layers(self, ids, tick, phase):
        out = []
        for i in ids:
            out.append(self.weights.layers[i] if self.weights is not None else None)
            tick(f"placing {phase} layer {i}")
        return out

    def _prefill_stage(self, st, tick):
        mesh = Mesh(st.region, mode=self.mode, ledger=self.ledger)
        vs = slice(st.vocab.start, st.vocab.stop)
        return PrefillStage(mesh, self.config, st.layers, self._layers(st.layers, tick, "prefill"), st.vocab,
                            self._host("lm", vs), self._host("final_norm"), self.dtype, self.plan.prefill.heads_per_pass)

    def _decode_stage(self, st, tick):
        mesh = Mesh(st.region, mode=self.mode, ledger=self.ledger)
        vs = slice(st.vocab.start, st.vocab.stop)
        embed = None if self.config.tie_word_embeddings else self._host("embed", vs)
        return DecodeStage(mesh, self.config, st.layers, self._layers(st.layers, tick, "decode"), st.vocab,
                           self._host("lm", vs), embed, self._host("final_norm"), self.max_seq_len, self.dtype,
                           self.kv_scheme)

    # ---- backend protocol ------------------------------------------------------------------
    def start_decode(self, prompt_len: int) -> None:
        """Decode-only runs (dry): put ``prompt_len`` tokens in the cache as the transition would."""
        for st in self.decode_stages:
            st.cache.load(prompt_len)
        self.position = prompt_len

    def reset(self) -> None:
        self.position = 0
        for st in self.decode_stages:
            st.cache.reset()
        self.step_cycles = []
        self.layer_cycles = {"prefill": 0.0, "decode": 0.0}
        self.phase_cycles = {"prefill": 0.0, "transition": 0.0, "decode": 0.0}
        self._request_mark = self.ledger.mark(per_primitive=True)

    def _run_layer(self, phase, key, fn):
        """Run one layer (or replay an identical one in dry mode); returns fn's result or None."""
        led = self.ledger
        if self.mode == "dry" and key in self._memo:
            led.replay(self._memo[key], "layer (replayed)")
            self.layer_cycles[phase] += self._memo[key]["cycles"]
            return None
        m = led.mark(per_primitive=self.mode == "dry")
        out = fn()
        d = led.since(m)
        self.layer_cycles[phase] += d["cycles"]
        if self.mode == "dry":
            self._memo[key] = d
        return out

    def prefill(self, token_ids) -> np.ndarray | None:
        """Run the prompt (ids, or just a length in dry mode); returns logits [1 or T, V]."""
        c, led = self.config, self.ledger
        if isinstance(token_ids, (int, np.integer)):
            length, ids = int(token_ids), None
        else:
            ids = np.asarray(token_ids, np.int64).reshape(-1)
            length = ids.size
        if length < 1:
            raise RequestError("prefill needs at least one token")
        if length >= self.max_seq_len:
            raise RequestError(f"prompt of {length} tokens leaves no room in the planned {self.max_seq_len}-token context")
        if ids is not None and (ids.min() < 0 or ids.max() >= c.vocab_size):
            raise RequestError(f"token id out of range [0, {c.vocab_size})")
        if not hasattr(self, "_request_mark"):
            self.reset()
        start = led.mark()
        positions = np.arange(length)
        ks, vs = [], []
        with led.span("prefill"):
            st0 = self.prefill_stages[0]
            emb = (np.asarray(self.weights.embed[ids], np.float32) if self.mode == "numeric" else (length, c.hidden_size))
            h = st0.mesh.place(emb, ("y", "x"), self.dtype, name="embedding_rows")
            # rows come from the PE columns holding their vocabulary entries
            h = comm.replace(h, st0.mesh, ("y", "x"), name="embedding.gather")
            for si, st in enumerate(self.prefill_stages):
                if si:
                    h = comm.replace(h, st.mesh, ("y", "x"), name="stage_transfer")
                tables = st.rope_tables(positions)
                for idx, li in enumerate(st.layer_ids):
                    key = ("prefill", si, length)
                    with led.span(f"layer{li}"):
                        res = self._run_layer("prefill", key, lambda: st.layer(idx, h, length, tables))
                    if res is None:  # replayed: keep the layer's K/V allocation all the same
                        ks.append(st.mesh.place((length, st.hl.kv_padded), ("y", "x"), self.dtype, name="k_prefill"))
                        vs.append(st.mesh.place((length, st.hl.kv_padded), ("y", "x"), self.dtype, name="v_prefill"))
                    else:
                        h, k, v = res
                        ks.append(k)
                        vs.append(v)
            logits = self._prefill_logits(h, length)
        self.phase_cycles["prefill"] += led.since(start)["cycles"]
        if self.decode_stages:
            self._transition(length, ks, vs)
        self.position = length
        return logits

    def _prefill_logits(self, h: DistTensor, length: int):
        last = self.prefill_stages[-1]
        led = self.ledger
        hn = last.rmsnorm(h, last.final_norm, "final_norm")
        if not self.want_prompt_logits:
            # only the last token's logits: its row leaves the others behind
            row = hn.to_global()[length - 1: length] if hn.tiles is not None else (1, self.config.hidden_size)
            hn = last.mesh.place(row, ("y", "x"), self.dtype, name="last_hidden")
        chunks = []
        with led.span("lm_head"), led.parallel() as par:
            for st in self.prefill_stages:
                with par.branch():
                    x = comm.replace(hn, st.mesh, ("y", "x"), name="lm_head.transfer")
                    out = st.lm_head(x)
                    chunks.append(out.to_global() if out.tiles is not None else None)
        if self.mode != "numeric":
            return None
        return np.concatenate(chunks, axis=1)

    def _transition(self, length: int, ks, vs) -> None:
        """Re-place weights and the KV cache from the prefill layout to the decode layout."""
        led = self.ledger
        start = led.mark()
        with led.span("transition"):
            # cost: each prefill region's weights and K/V move to the decode regions of the same layers
            item = 2 if self.dtype == "fp16" else 4
            for pst in self.prefill_stages:
                n = pst.mesh.rows
                per_pe = sum(t.tile_elems for w in pst.w for t in w.values()) + 2 * len(pst.w) * (-(-length // n)) * pst.hl.tf
                for dst_st in self.decode_stages:
                    share = len(set(pst.layer_ids) & set(dst_st.layer_ids)) / max(len(pst.layer_ids), 1)
                    if share:
                        src_b = share * per_pe * item
                        total = src_b * pst.mesh.region.pes
                        comm.charge_move(led, pst.mesh.region, dst_st.mesh.region, total, src_b,
                                         total / dst_st.mesh.region.pes, name="transition.replace")
            # numerics: the cache rows of each decode region
            for dst_st in self.decode_stages:
                if self.mode == "numeric":
                    kk, vv = [], []
                    for k, v, pst in self._kv_sources(ks, vs, dst_st):
                        kk.append(dst_st.hl.from_original_kv(pst.hl.to_original_kv(k.to_global(np.float32))))
                        vv.append(dst_st.hl.from_original_kv(pst.hl.to_original_kv(v.to_global(np.float32))))
                    dst_st.cache.load(length, kk, vv)
                else:
                    dst_st.cache.load(length)
        self.phase_cycles["transition"] += led.since(start)["cycles"]

    def _kv_sources(self, ks, vs, dst_st):
        for li in dst_st.layer_ids:
            pst = next(p for p in self.prefill_stages if li in p.layer_ids)
            yield ks[li], vs[li], pst

    def decode(self, token_id) -> np.ndarray | None:
        c, led = self.config, self.ledger
        tok = None if token_id is None else int(token_id)
        if tok is not None and not 0 <= tok < c.vocab_size:
            raise RequestError(f"token id {tok} out of range [0, {c.vocab_size})")
        if self.position + 1 > self.max_seq_len:
            raise RequestError(f"context of {self.max_seq_len} tokens is full")
        pos = self.position
        start = led.mark(per_primitive=self.mode == "dry")
        if self.mode == "dry":
            # the step's program: every stage's cache occupancy and whether its rows shift
            # (stages of different grids change occupancy at different tokens)
            step_key = ("step",) + tuple((st.cache.occupied, bool(st.cache.plan_append().size))
                                         for st in self.decode_stages)
            if step_key in self._memo:
                d = self._memo[step_key]
                led.replay(d, "decode step (replayed)")
                for st in self.decode_stages:
                    st.cache.commit(st.cache.plan_append())
                self.layer_cycles["decode"] += d["layer_cycles"]
                self.phase_cycles["decode"] += d["cycles"]
                self.step_cycles.append(d["cycles"])
                self.position += 1
                return None
            layer_before = self.layer_cycles["decode"]
        with led.span("decode"):
            estage = next((s for s in self.decode_stages if tok is not None and tok in s.vocab), self.decode_stages[0])
            local_tok = tok if tok is not None else estage.vocab.start
            h = estage.embed_lookup(local_tok)
            first = self.decode_stages[0]
            if estage is not first:
                h = comm.replace(h, first.mesh, ("y",), name="embedding.transfer")
            for si, st in enumerate(self.decode_stages):
                if si:
                    h = comm.replace(h, st.mesh, ("y",), name="stage_transfer")
                movers = st.cache.plan_append()
                key = ("decode", si, st.cache.occupied, bool(movers.size))
                for idx, li in enumerate(st.layer_ids):
                    with led.span(f"layer{li}"):
                        res = self._run_layer("decode", key, lambda: st.layer(idx, h, pos, movers))
                    if res is not None:
                        h = res
                st.cache.commit(movers)
            logits = self._decode_logits(h)
        delta = led.since(start)
        d = delta["cycles"]
        if self.mode == "dry":
            delta["layer_cycles"] = self.layer_cycles["decode"] - layer_before
            self._memo[step_key] = delta
        self.phase_cycles["decode"] += d
        self.step_cycles.append(d)
        self.position += 1
        return logits

    def _decode_logits(self, h):
        last = self.decode_stages[-1]
        led = self.ledger
        hn = last.rmsnorm(h, last.final_norm, "final_norm")
        chunks = []
        with led.span("lm_head"), led.parallel() as par:
            for st in self.decode_stages:
                with par.branch():
                    x = comm.replace(hn, st.mesh, ("y",), name="lm_head.transfer")
                    logits, _ = st.lm_head(x)
                    chunks.append(logits)
        if self.mode != "numeric":
            return None
        return np.concatenate(chunks)

    # ---- reporting ---------------------------------------------------------------------------
    def request_metrics(self) -> dict:
        """Predicted wafer figures of the request run since the last reset()."""
        w = self.wafer
        sec = w.cycles_to_seconds
        scale = self.config.num_layers / self.layers
        pre = self.phase_cycles["prefill"] + self.layer_cycles["prefill"] * (scale - 1)
        trans = self.phase_cycles["transition"] * scale
        n_dec = len(self.step_cycles)
        dec = self.phase_cycles["decode"] + self.layer_cycles["decode"] * (scale - 1)
        prompt = self.position - n_dec
        out_tokens = n_dec + 1  # the first token comes from the prefill logits
        tpot = sec(dec / n_dec) if n_dec else None
        total = sec(pre + trans + dec)
        d = self.ledger.since(self._request_mark) if hasattr(self, "_request_mark") else self.ledger.summary()
        energy = w.power_w * total
        return {
            "wafer": w.name,
            "extrapolated_from_layers": self.layers if self.layers != self.config.num_layers else None,
            "prefill_grid": self.plan.prefill.grid if self.plan.prefill else None,
            "decode_grid": self.plan.decode.grid if self.plan.decode else None,
            "ttft_s": sec(pre),
            "transition_s": sec(trans),
            "tpot_s": tpot,
            "prefill_tokens_per_s": prompt / sec(pre) if pre else None,
            "decode_tokens_per_s": 1.0 / tpot if tpot else None,
            "e2e_tokens_per_s": out_tokens / total if total else None,
            "energy_j": energy,
            "kv_capacity_tokens": self.plan.kv_capacity_tokens,
            "kv_capacity_tokens_concat": self.plan.kv_capacity_tokens_concat,
            "flops": d.get("flops", 0.0) * scale,
            "bytes_moved": d.get("bytes_moved", 0.0) * scale,
            "routing_stages": d.get("routing_stages", 0.0) * scale,
            "sram_peak_bytes_per_pe": {
                "prefill": max((s.mesh.sram.peak_bytes for s in self.prefill_stages), default=0),
                "decode": max((s.mesh.sram.peak_bytes for s in self.decode_stages), default=0),
                "usable": w.usable_sram_bytes_per_pe,
            },
            "routes_peak_per_pe": max((s.mesh.routes.peak for s in self.prefill_stages + self.decode_stages), default=0),
            "kv_shift_moves": sum(s.cache.shift_moves for s in self.decode_stages),
            "breakdown_s": {k: sec(v) for k, v in self.phase_breakdown().items()},
        }

    def phase_breakdown(self) -> dict[str, float]:
        """Busy cycles per op (primitive names before the first dot) in this request.

        Work that overlapped other work is counted in full, so the shares show where
        the PEs are busy, not a partition of the critical path."""
        out: dict[str, float] = {}
        prims = (self.ledger.since(self._request_mark)["by_primitive"] if hasattr(self, "_request_mark")
                 else self.ledger.by_primitive)
        for name, cyc in prims.items():
            key = name.split(".")[0]
            out[key] = out.get(key, 0.0) + cyc
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))
