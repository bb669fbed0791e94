"""The wafer backend: a model placed on the simulated wafer, run phase by phase.

``WaferModel`` builds the placement plan of a :class:`RunConfig`, places every weight
on its region (numeric: real tiles; dry run: shapes only), and exposes the backend
protocol the generation loop drives: ``reset()``, ``prefill(ids, prompt_logits)``,
``decode(token)``. The same execution yields the logits and, in its ledger, the
predicted wafer time, energy and breakdown (see :mod:`waferllm.engine.metrics`).

Per request: the prompt's embedding rows move from the table columns that hold them to
the activation layout; prefill runs them through the prefill pipeline; the transition
re-places weights and KV cache into the decode layout (:mod:`waferllm.engine.transition`:
every weight and the prompt's K and V, moved on the mesh and priced from their block
maps); each decode step runs one token through the decode pipeline. A request that finds
the weights in the decode layout (the previous request decoded) first moves them back:
the restore, part of its prefill phase and so of its TTFT (``restore_s`` alone). The LM
head's vocabulary is sliced over all regions of a phase, whose slices run at the same time.

Dry runs do not repeat identical work: a layer whose program (shapes, layouts,
constants, cache occupancy) equals one already executed has that execution's cost
replayed (``Ledger.replay``), and so has a decode step. Numeric runs execute everything.

On a cluster (``wafer`` a :class:`ClusterSpec` using two or more wafers) the stages of a
phase run on several wafers, planned by :mod:`waferllm.engine.cluster`: the hidden states
cross from wafer to wafer with :func:`waferllm.mesh.interwafer.transfer`, the vocabulary
tables sit on the first wafer of each phase, the wafers re-place their own weights and K/V
at the same time in the transition (``shared`` layout) or send the prompt's K/V to the
decode wafers (``split`` layout: no weights move, no restore). Stages of different wafers
that hold the same program (the same region, layers and tables) replay one another's layers.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import numpy as np

from waferllm.engine import fused, transition
from waferllm.engine.cluster import plan_cluster
from waferllm.engine.decode import DecodeStage
from waferllm.engine.metrics import RequestCycles, request_metrics
from waferllm.engine.prefill import PrefillStage
from waferllm.engine.run_config import RunConfig
from waferllm.errors import RequestError
from waferllm.hardware import get_wafer
from waferllm.hardware.cluster import ClusterSpec
from waferllm.hardware.plmr import DTYPE_BYTES, WaferSpec
from waferllm.kernels import batch
from waferllm.mesh import comm, interwafer
from waferllm.mesh.ledger import Ledger
from waferllm.mesh.move import Placement, charge_move, charge_priced, plain_key, price_move
from waferllm.mesh.runtime import Mesh
from waferllm.mesh.tensor import DistTensor


class WaferModel:
    """A model on a wafer. ``run``: a :class:`RunConfig`; or, as keywords, its fields (the
    grids may come positionally: ``WaferModel(cfg, weights, "wse2", 32, 32, max_seq_len=64)``).
    ``wafer``: a wafer (preset, file or spec) or a :class:`ClusterSpec` (its wafers in use)."""

    def __init__(self, config, weights=None, wafer: str | WaferSpec | ClusterSpec = "wse2",
                 run: RunConfig | int | None = None,
                 decode_grid: int | None = None, *, mode: str = "numeric", progress=None, plan=None, **run_fields):
        if not isinstance(run, RunConfig):
            run = RunConfig(prefill_grid=run, decode_grid=decode_grid, **run_fields)
        elif decode_grid is not None or run_fields:
            raise RequestError("pass either a RunConfig or its fields, not both")
        self.config = config
        self.run = run
        # a cluster of one wafer is that wafer
        self.cluster = wafer if isinstance(wafer, ClusterSpec) and wafer.wafers > 1 else None
        if isinstance(wafer, ClusterSpec):
            wafer = wafer.wafer
        self.wafer = wafer if isinstance(wafer, WaferSpec) else get_wafer(wafer)
        self.mode = mode
        self.layers = run.layer_count(config)
        if mode == "numeric" and weights is None:
            raise RequestError("a numeric run needs weights; use mode='dry' for shape-only prediction")
        if self.cluster is not None and self.layers != config.num_layers:
            raise RequestError("a cluster places the whole model: extrapolating from some layers "
                               "(--extrapolate-from-layers) is for one wafer")
        # ``plan``: one already made for this run (the tuner plans its candidates without advice)
        self.plan = (plan or run.plan(config, self.wafer)) if self.cluster is None else plan_cluster(
            config, self.cluster, run.prefill_grid, run.decode_grid, run.kv_pool_tokens, run.dtype,
            run.prompt_len or run.max_seq_len, run.weights, run.prefill_attention)
        self.ledger = Ledger(self.wafer, keep_events=(mode == "numeric"))
        self.weights = weights
        t0 = time.perf_counter()
        self.prefill_stages, self.decode_stages = self._place(progress)
        self.placement_wall_s = time.perf_counter() - t0
        # per phase, for each stage the first stage holding the same program (itself on one wafer)
        self.twins = {ph: _twins(pp.stages if pp else []) for ph, pp in (("prefill", self.plan.prefill),
                                                                          ("decode", self.plan.decode))}
        self._memo: dict = {}  # program key -> its cost (a ledger delta), for replays
        self._prices: dict = {}  # moves priced once (see _charge_moves, _move_last_row)
        self._kinds: dict = {}  # request slot -> (its caches, one per kind): see _alike_caches
        self._weights: dict = {}  # (phase, stage) -> one layer's weights as the transition moves them
        self.weights_layout = "prefill"  # where the layers' weights are: "prefill" or "decode"
        self.positions: dict[int, int] = {0: 0}  # request slot -> tokens in its cache (slot 0: the single API)
        self._next_seq = 1
        self.token_cycles: dict[int, float] = {}  # request slot -> ledger time its last token was picked
        self.prefill_began: dict[int, float] = {}  # request slot -> ledger time its prefill began
        self.cycles = RequestCycles()
        self.request_mark = self.ledger.mark(per_primitive=True)

    @property
    def max_seq_len(self) -> int:
        return self.run.max_seq_len

    @property
    def dtype(self) -> str:
        return self.run.dtype

    # ---- placement ---------------------------------------------------------------------
    def _place(self, progress) -> tuple[list[PrefillStage], list[DecodeStage]]:
        """Every stage of both phases, weights placed (a layer at a time, reported to ``progress``)."""
        placed, total = [0], 2 * self.layers

        def layers(ids, phase):
            out = []
            for i in ids:
                out.append(self.weights.layers[i] if self.weights is not None else None)
                placed[0] += 1
                if progress:
                    progress(placed[0], total, f"placing {phase} layer {i}")
            return out

        pre, dec, c, run = self.plan.prefill, self.plan.decode, self.config, self.run
        embed = (lambda vs: None) if c.tie_word_embeddings else (lambda vs: self._host("embed", vs))
        prefill = [PrefillStage(self._mesh(st), c, st.layers, layers(st.layers, "prefill"), st.vocab,
                                self._host("lm", st.vocab), embed(st.vocab), self._host("final_norm"), run.dtype,
                                st.heads_per_pass or pre.heads_per_pass, weights=run.weights,
                                attention=run.prefill_attention)
                   for st in (pre.stages if pre else [])]
        decode = [DecodeStage(self._mesh(st), c, st.layers, layers(st.layers, "decode"), st.vocab,
                              self._host("lm", st.vocab), embed(st.vocab), self._host("final_norm"), run.max_seq_len,
                              run.dtype, run.kv_scheme, weights=run.weights, collectives=run.decode_collectives,
                              ktree=run.gemv_ktree, overlap=run.gemv_overlap) for st in (dec.stages if dec else [])]
        return prefill, decode

    def _mesh(self, stage) -> Mesh:
        return Mesh(stage.region, mode=self.mode, ledger=self.ledger, route_policy=self.run.route_policy)

    def _host(self, what: str, vocab: range | None = None):
        """A host array of the weights (None in a dry run): the LM head's or the embedding
        table's vocabulary slice as [E, Vc], or the final norm."""
        w = self.weights
        if w is None:
            return None
        sl = None if vocab is None else slice(vocab.start, vocab.stop)
        if what == "lm":  # in the tables' own dtype (fp16 once for an fp16 run: see quant.weights_for_run)
            return np.asarray(w.lm_head[:, sl])
        if what == "embed":
            return np.asarray(w.embed[sl].T)
        if what == "final_norm":
            return np.asarray(w.final_norm, np.float32)
        raise KeyError(what)

    @property
    def position(self) -> int:
        """Tokens in the single-request API's cache (slot 0)."""
        return self.positions[0]

    @position.setter
    def position(self, value: int) -> None:
        self.positions[0] = value

    # ---- requests in flight ---------------------------------------------------------------
    def open_seq(self, capacity_tokens: int) -> int:
        """A slot for one more request in flight, with its own KV cache of ``capacity_tokens``
        on every decode region (SRAM is charged now; it overflows if the regions are full)."""
        seq = self._next_seq
        opened = []
        try:
            for st in self.decode_stages:
                opened.append(st)
                st.open_cache(seq, capacity_tokens)
        except Exception:
            for st in opened:
                st.close_cache(seq)
            raise
        self._next_seq += 1
        self.positions[seq] = 0
        return seq

    def close_seq(self, seq: int) -> None:
        """The request in ``seq`` is done (or the single API's slot 0 is not needed): free its caches."""
        for st in self.decode_stages:
            st.close_cache(seq)
        self.positions.pop(seq, None)
        self.token_cycles.pop(seq, None)
        self.prefill_began.pop(seq, None)

    # ---- backend protocol ------------------------------------------------------------------
    def reset(self, weights_in: str | None = None) -> None:
        """Start a new request: empty caches, zeroed counters. The weights stay where the
        previous request left them, or ``weights_in`` says where the request finds them
        ("prefill", or "decode": it pays the restore first), as another model's request did."""
        if weights_in is not None:
            if weights_in not in ("prefill", "decode"):
                raise RequestError(f"weights_in must be 'prefill' or 'decode', got {weights_in!r}")
            if weights_in == "decode" and self.cluster is not None and self.cluster.layout == "split":
                raise RequestError("a split cluster's weights never leave their prefill or decode wafers: "
                                   "weights_in='decode' does not apply; use 'prefill'")
            self.weights_layout = weights_in
        if 0 not in self.positions:  # slot 0 was handed to the batch pool: take it back
            for st in self.decode_stages:
                st.open_cache(0, self.max_seq_len)
        self.position = 0
        for st in self.decode_stages:
            st.cache.reset()
        self.cycles = RequestCycles()
        self.request_mark = self.ledger.mark(per_primitive=True)

    def start_decode(self, prompt_len: int) -> None:
        """Decode-only runs (dry): put ``prompt_len`` tokens in the cache as the transition would."""
        for st in self.decode_stages:
            st.cache.load(prompt_len)
        self.position = prompt_len

    def _run_layer(self, phase: str, stage: int, key: tuple, fn, fused=None, pre=None, dry=None):
        """Run one layer's program ``fn``; or, when an identical program (``key``) has run,
        replay its cost and return None (dry) or ``fused()``, its values computed as dense
        array operations (numeric, ``numerics="fused"``; see :mod:`waferllm.engine.fused`).
        ``pre`` charges the layer's work outside its program; ``dry`` runs a program not yet
        run shape-only (see :class:`waferllm.engine.decode.LayerRunner`)."""
        st = (self.prefill_stages if phase == "prefill" else self.decode_stages)[stage]
        if pre is not None:  # the layer's own work outside its program (see decode.LayerRunner)
            mark = self.ledger.mark()
            pre()
            self.cycles.add_layers(phase, self.ledger.since(mark))
        out, delta = self._run_program(self._program_of(phase, stage) + key, fn, fused, st.mesh, dry=dry)
        self.cycles.add_layers(phase, delta)
        return out

    def _program_of(self, phase: str, stage: int) -> tuple:
        """What a stage's layer program depends on besides its inputs. On a perfect wafer a
        layer costs the same on any region of the same size (and attention passes), so runs
        share programs among them (the SRAM each region holds differs; a replay starts from
        it: :meth:`SRAM.replay`). With defective PEs each region's links are its own: each
        stage keeps its own programs (its twin's on another wafer)."""
        if self.wafer.defective_pes:
            return (self.twins[phase][stage],)
        st = (self.plan.prefill if phase == "prefill" else self.plan.decode).stages[stage]
        return ("side", st.region.rows, st.region.cols, st.heads_per_pass)

    def _run_program(self, key: tuple, fn, fused=None, mesh=None, name: str = "layer (replayed)", dry=None):
        """(result, cost) of the program ``fn`` run on ``mesh``, or of its replay once ``key``
        has run (see :meth:`_run_layer`); a replay also replays the program's SRAM high-water
        marks. With fused numerics a program not yet run may run shape-only instead (``dry()``:
        on a twin of its mesh, returning its SRAM footprint and the twin), its values fused."""
        led = self.ledger
        known = self._memo.get(key)
        fast = fused is not None and self.mode == "numeric" and self.run.numerics == "fused"
        if known is not None and (self.mode == "dry" or fast):
            led.replay(known, name)
            mesh.sram.replay(known["sram"])
            return (None if self.mode == "dry" else fused()), known
        mark = led.mark(per_primitive=True)
        if fast and dry is not None:
            footprint, twin = dry()
            mesh.sram.replay(footprint)  # what it would have held here (the twin's accounting began as this one)
            mesh.routes.absorb(twin.routes)
            out = fused()
        else:
            with mesh.sram.recording() as footprint:
                out = fn()
        delta = led.since(mark)
        self._memo[key] = delta | {"sram": footprint}
        return out, delta

    def _head_logits(self, phase: str, index: int, st, x: DistTensor) -> np.ndarray | None:
        """Logits of stage ``st``'s vocabulary slice for ``x`` (None in a dry run). In a
        numeric run with fused numerics, once this head's program has run its cost is
        replayed and its values are one product (:func:`fused.head_logits`)."""
        if phase == "prefill":
            def run():
                out = st.lm_head(x)
                return None if out.tiles is None else out.to_global()
        else:
            def run():
                return st.lm_head(x)[0]
        if self.mode != "numeric":
            return run()
        # a prompt's head not yet run runs shape-only, as its layers do (a MeshGEMM over the
        # vocabulary slice, primitive by primitive, is the slowest step to simulate)
        dry = (lambda: st.dry_lm_head(x)) if phase == "prefill" else None
        return self._run_program(("lm_head", phase, index, x.shape), run, lambda: fused.head_logits(st, x),
                                 st.mesh, name="lm_head (replayed)", dry=dry)[0]

    def prefill(self, token_ids, prompt_logits: bool = False, seq: int = 0) -> np.ndarray | None:
        """Run the prompt (ids, or just a length in dry mode) of the request in slot ``seq``;
        returns the logits of every prompt token [T, V] with ``prompt_logits``, else of the
        last one [1, V] (numeric)."""
        return self.prefill_many([(seq, token_ids, prompt_logits)])[0]

    def prefill_many(self, requests: list[tuple[int, object, bool]]) -> list[np.ndarray | None]:
        """Prefill several requests ((slot, ids, prompt_logits) each) one after another, with
        one restore before and one transition after: the weights move once for them all.
        ``prefill_began[slot]`` is when work on each began (the first: with the restore) and
        ``token_cycles[slot]`` when its first token was picked."""
        checked = [(seq, *self._check_prompt(ids), pl) for seq, ids, pl in requests]
        led = self.ledger
        start = led.mark()
        outs, kvs = [], []
        with led.span("prefill"):
            began = led.cycles  # the first request's work starts with the restore
            restore = self._restore()
            for i, (seq, ids, length, prompt_logits) in enumerate(checked):
                self.prefill_began[seq] = led.cycles if i else began
                h = self._embed_prompt(ids if ids is not None else self.typical_prompt(length))
                kv = []
                for si, st in enumerate(self.prefill_stages):
                    if si:
                        h = self._to_region(h, st, ("y", "x"))  # [L, E] (y, x)
                    h, stage_kv = st.step(h, length, partial(self._run_layer, "prefill", si))
                    kv += stage_kv
                outs.append(self._prefill_logits(h, length, prompt_logits))
                self.token_cycles[seq] = led.cycles
                kvs.append((seq, length, kv))
        self.cycles.phase["prefill"] += led.since(start)["cycles"] - restore
        if self.decode_stages:
            self._transition(kvs)
        for seq, length, kv in kvs:
            for k, v in kv:  # the prompt's K and V have moved to the decode cache
                k.mesh.sram.release(k, v)
            self.positions[seq] = length
        return outs

    def _to_region(self, h: DistTensor, stage, layout, name: str = "stage_transfer") -> DistTensor:
        """Hidden states on to the next region of the pipeline (on another wafer: over the
        link between them); they leave the previous one."""
        if _same_wafer(h.mesh, stage.mesh):
            moved = comm.relayout(h, stage.mesh, layout, name=name)
        else:
            moved = interwafer.transfer(h, stage.mesh, layout, self.cluster)
        h.mesh.sram.release(h)
        return moved

    def _vocab_stages(self, stages: list) -> list:
        """The stages holding a vocabulary slice (on one wafer: every stage)."""
        return stages if self.cluster is None else [st for st in stages if len(st.vocab)]

    def _check_prompt(self, token_ids) -> tuple[np.ndarray | None, int]:
        if isinstance(token_ids, (int, np.integer)):
            ids, length = None, int(token_ids)
        else:
            ids = np.asarray(token_ids, np.int64).reshape(-1)
            length = ids.size
        if length < 1:
            raise RequestError("prefill needs at least one token")
        if length >= self.max_seq_len:
            raise RequestError(f"prompt of {length} tokens leaves no room in the planned {self.max_seq_len}-token context")
        if ids is not None and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise RequestError(f"token id out of range [0, {self.config.vocab_size})")
        return ids, length

    def typical_prompt(self, length: int) -> np.ndarray:
        """The token ids a dry run assumes for a prompt of ``length`` tokens: the rows each PE
        row of the first prefill region needs sit in one table column of that region (its
        own index), so the lookup is a transpose: every PE sends and receives its share,
        over typical distances, as a prompt of varied text does."""
        st = self.prefill_stages[0]
        table = st.embed if st.embed is not None else st.lm
        width = table.tile_shape[1]  # vocabulary entries per table column
        rows = -(-length // st.mesh.rows)  # prompt tokens per PE row
        pos = np.arange(length, dtype=np.int64)
        local = (pos // rows) * width + (pos % rows) % width
        return st.vocab.start + np.minimum(local, len(st.vocab) - 1)

    def _embed_prompt(self, ids: np.ndarray) -> DistTensor:
        """The prompt's embedding rows as [L, E] (y, x) on the first prefill region.

        Each region's table columns hold the rows of its vocabulary slice (features split
        over the PE rows); every region sends the prompt's rows it holds to their token's
        PE row of the first region, features now split over the columns. The regions send
        at the same time."""
        led, first, c = self.ledger, self.prefill_stages[0], self.config
        length = len(ids)
        dest = Placement.blocked(first.mesh.region, (length, c.hidden_size), ("y", "x"))
        far = []  # rows held on other wafers of a cluster: they cross together
        with led.span("embedding"), led.parallel() as par:
            for st in self.prefill_stages:
                held = np.flatnonzero((ids >= st.vocab.start) & (ids < st.vocab.stop))
                if held.size:
                    to = Placement(dest.region, (held.size, c.hidden_size), y_dim=0, y_of=dest.y_of[held],
                                   x_dim=1, x_of=dest.x_of)
                    if not _same_wafer(st.mesh, first.mesh):
                        far.append(interwafer.Flow(st.embedding_source(ids[held]), to, DTYPE_BYTES[self.dtype]))
                        continue
                    with par.branch():
                        charge_move(led, st.embedding_source(ids[held]), to, DTYPE_BYTES[self.dtype],
                                    name="embedding.gather")
            if far:
                with par.branch():
                    interwafer.charge_transfer(led, self.cluster, far, name="interwafer.embedding")
        rows = np.asarray(self.weights.embed[ids], np.float32) if self.mode == "numeric" else (length, c.hidden_size)
        return first.mesh.place(rows, ("y", "x"), self.dtype, name="embedding_rows")  # where the moves left them

    def _prefill_logits(self, h: DistTensor, length: int, prompt_logits: bool) -> np.ndarray | None:
        """The LM head over every region's vocabulary slice at once: all rows, or the last."""
        last, led = self.prefill_stages[-1], self.ledger
        heads = self._vocab_stages(self.prefill_stages)
        chunks = []
        with last.mesh.sram.scope():
            hn = last.rmsnorm(h, last.final_norm, "final_norm")  # [L, E] (y, x)
            last.mesh.sram.release(h)
            # on a cluster: the rows (or the last one) also cross to every other wafer with tables
            copies = self._to_table_wafers(hn, heads, ("y", "x"), None if prompt_logits else length)
            with led.span("lm_head"), led.parallel() as par:
                for i, st in enumerate(heads):
                    src, n = copies.get(st.mesh.wafer.name, (hn, length))
                    with par.branch(), st.mesh.sram.scope():
                        # [L or 1, E] (y, x) on each region, from where the rows are
                        x = (comm.relayout(src, st.mesh, ("y", "x"), name="lm_head.transfer") if prompt_logits
                             else self._move_last_row(src, n, st.mesh))
                        chunks.append(self._head_logits("prefill", i, st, x))
            self._release_copies(copies, hn)
            self._gather_best(heads, self.prefill_stages[0])
        if self.mode != "numeric":
            return None
        return np.concatenate(chunks, axis=1)

    def _to_table_wafers(self, hn: DistTensor, heads: list, layout, last_row: int | None = None) -> dict:
        """On a cluster, ``hn`` (or only its row ``last_row - 1``, as a [1, E] tensor at row 0)
        copied to every other wafer holding vocabulary slices, sent together: {wafer name:
        (copy, its rows)}. On one wafer (or with the tables all on ``hn``'s wafer): {}."""
        if self.cluster is None:
            return {}
        far = [st for st in _first_per_wafer(heads) if not _same_wafer(st.mesh, hn.mesh)]
        if not far:
            return {}
        if last_row is None:
            src, data = Placement.of(hn), (hn.to_global() if hn.tiles is not None else hn.shape)
        else:
            E = hn.shape[1]
            held = Placement.blocked(hn.mesh.region, hn.shape, hn.layout, hn.tile_shape)
            src = Placement(held.region, (1, E), y_dim=0, y_of=held.y_of[last_row - 1: last_row], x_dim=1,
                            x_of=held.x_of)
            data = hn.to_global()[last_row - 1: last_row] if hn.tiles is not None else (1, E)
        landed = interwafer.send_many(src, hn.itemsize, data, [st.mesh for st in far], layout, hn.dtype, self.cluster)
        rows = hn.shape[0] if last_row is None else 1
        return {st.mesh.wafer.name: (t, rows) for st, t in zip(far, landed)}

    @staticmethod
    def _release_copies(copies: dict, keep: DistTensor) -> None:
        for t, _ in copies.values():
            if t is not keep:
                t.mesh.sram.release(t)

    def _gather_best(self, heads: list, dest) -> None:
        """On a cluster whose vocabulary tables span several wafers: every other table wafer
        sends its slices' best logit and index (two fp32 words from one PE) to ``dest``'s
        wafer, where the token is picked."""
        if self.cluster is None:
            return
        flows = [interwafer.Flow(_one_pe(st.mesh.region), _one_pe(dest.mesh.region), DTYPE_BYTES["fp32"])
                 for st in _first_per_wafer(heads) if not _same_wafer(st.mesh, dest.mesh)]
        if flows:
            interwafer.charge_transfer(self.ledger, self.cluster, flows, name="interwafer.argmax")

    def _move_last_row(self, hn: DistTensor, length: int, mesh: Mesh) -> DistTensor:
        """The last token's row of ``hn`` [L, E] (y, x), moved from the PE row that holds it to
        row 0 of ``mesh`` as a [1, E] (y, x) tensor; the other rows stay behind."""
        E = hn.shape[1]
        held = Placement.blocked(hn.mesh.region, hn.shape, hn.layout, hn.tile_shape)
        src = Placement(held.region, (1, E), y_dim=0, y_of=held.y_of[length - 1: length], x_dim=1, x_of=held.x_of)
        row = hn.to_global()[length - 1: length] if hn.tiles is not None else (1, E)
        out = mesh.place(row, ("y", "x"), hn.dtype, name="lm_head.transfer")
        ends = plain_key(hn), plain_key(out)
        if None in ends:  # a block map or defective PEs: priced each time
            charge_move(self.ledger, src, Placement.of(out), hn.itemsize, name="lm_head.transfer")
            return out
        key = ("last_row", length) + ends  # every request of this length moves it alike
        if key not in self._prices:
            self._prices[key] = price_move(self.ledger.wafer, src, Placement.of(out), hn.itemsize)
        charge_priced(self.ledger, self._prices[key], "lm_head.transfer")
        return out

    def _stage_weights(self, phase: str, index: int) -> dict:
        """One layer's weights of a stage as the transition moves them (see
        :func:`transition.prefill_weights`): every layer of a stage is placed alike."""
        key = (phase, index)
        if key not in self._weights:
            if phase == "prefill":
                self._weights[key] = transition.prefill_weights(self.prefill_stages[index], self.config)
            else:
                self._weights[key] = transition.decode_weights(self.decode_stages[index], self.config)
        return self._weights[key]

    def _region_pairs(self) -> list[tuple[int, int, list[int]]]:
        """(prefill stage, decode stage, the layers both hold) for every pair of a prefill and
        a decode region holding some of the same layers."""
        return [(pi, di, layers) for pi, pst in enumerate(self.prefill_stages)
                for di, dst in enumerate(self.decode_stages)
                if (layers := [li for li in pst.layer_ids if li in dst.layer_ids])]

    def _weight_moves(self, pi: int, di: int, n: int, back: bool) -> list[tuple]:
        """The ``n`` common layers' weights of a pair, prefill -> decode (or ``back``)."""
        pw, dw = self._stage_weights("prefill", pi), self._stage_weights("decode", di)
        moves = [(name, transition.stacked(pw[name][0], n), transition.stacked(dw[name][0], n), item)
                 for name, (_, item) in pw.items()]
        return [(name, b, a, item) for name, a, b, item in moves] if back else moves

    def _kv_move(self, pi: int, di: int, layers: list[int], seq: int, length: int, kv: list) -> tuple:
        """A request's K and V of a pair's layers, from the prefill tiles to its decode cache."""
        k, v = kv[layers[0]]  # every layer of the pair: the same placement
        src = transition.kv_source(k, v, self.prefill_stages[pi].hl, self.config)
        dst = transition.kv_destination(self.decode_stages[di].caches[seq], length)
        return "kv", transition.stacked(src, len(layers)), transition.stacked(dst, len(layers)), k.itemsize

    def _pairs(self, kvs: list | None = None) -> list[transition.Pair]:
        """The moves between every prefill region and every decode region holding some of the
        same layers: prefill -> decode (weights, and each request's K and V when ``kvs``,
        (slot, length, K/V per layer) each, is given) or, without ``kvs``, the weights decode ->
        prefill. The layers of a pair move as one tensor with a leading layer dim (they share
        every link)."""
        pairs = []
        for pi, di, layers in self._region_pairs():
            src, dst = self.prefill_stages[pi].mesh.region, self.decode_stages[di].mesh.region
            moves = self._weight_moves(pi, di, len(layers), back=kvs is None)
            if kvs is None:
                pairs.append(transition.Pair(dst, src, moves))
                continue
            moves += [self._kv_move(pi, di, layers, seq, length, kv) for seq, length, kv in kvs]
            pairs.append(transition.Pair(src, dst, moves))
        return pairs

    def _charge_moves(self, kvs: list | None, prefix: str) -> None:
        """``transition.charge(ledger, self._pairs(kvs), prefix)`` on one wafer, each move
        priced once: the weights' moves are the same for every request, and a request's K
        and V move alike for every prompt of its length (the weights and every slot's cache
        sit where the plan put them). The same events, in the same order, with the same
        values; only the routing is not worked out again."""
        prices, w = self._prices, self.ledger.wafer
        if len(prices) > 4096:  # a server meets many lengths: keep the recent ones
            prices.clear()
        back = kvs is None
        every = self._region_pairs()
        if ("rounds", back) not in prices:  # which pairs run together depends on their regions alone
            ends = [(self.prefill_stages[pi].mesh.region, self.decode_stages[di].mesh.region) for pi, di, _ in every]
            pairs = [transition.Pair(*(e[::-1] if back else e), []) for e in ends]
            index = {id(p): j for j, p in enumerate(pairs)}
            prices["rounds", back] = [[index[id(p)] for p in rnd] for rnd in transition.rounds(pairs)]
        priced = []
        for rnd in prices["rounds", back]:
            priced.append([])
            for j in rnd:
                pi, di, layers = every[j]
                key = ("weights", j, back, prefix)
                if key not in prices:
                    prices[key] = [(f"{prefix}.{name}", price_move(w, src, dst, item))
                                   for name, src, dst, item in self._weight_moves(pi, di, len(layers), back)]
                moves = list(prices[key])
                for seq, length, kv in kvs or ():
                    key = ("kv", j, length, prefix)
                    if key not in prices:
                        name, src, dst, item = self._kv_move(pi, di, layers, seq, length, kv)
                        prices[key] = (f"{prefix}.{name}", price_move(w, src, dst, item))
                    moves.append(prices[key])
                priced[-1].append(moves)
        transition.charge_priced_rounds(self.ledger, priced)

    def _transition(self, kvs: list[tuple[int, int, list]]) -> None:
        """Re-place weights and the prompts' K and V ((slot, length, K/V per layer) each) from
        the prefill layout to the decode layout."""
        led = self.ledger
        start = led.mark()
        with led.span("transition"):
            if self.cluster is None:
                self._charge_moves(kvs, "transition")
            elif self.cluster.layout == "split":
                self._send_kv(self._pairs(kvs))
            else:
                self._charge_per_wafer(self._pairs(kvs), "transition")
            for seq, length, kv in kvs:
                for dst_st in self.decode_stages:
                    cache = dst_st.caches[seq]
                    if self.mode != "numeric":
                        cache.load(length)
                        continue
                    # each layer's K and V, read from the prefill tiles that hold them
                    layers = dst_st.layer_ids
                    src = [next(p for p in self.prefill_stages if li in p.layer_ids).hl for li in layers]
                    cache.load(length, [kv[li][0] for li in layers], [kv[li][1] for li in layers],
                               [transition.positions(hl.kv_cols, hl.kv_dim) for hl in src])
        if self.cluster is None or self.cluster.layout == "shared":  # split: the weights stay where they are
            self.weights_layout = "decode"
        delta = led.since(start)
        self.cycles.phase["transition"] += delta["cycles"]
        self.cycles.add_per_layer_counters(delta)  # it moves every layer's weights and K/V

    def _restore(self) -> float:
        """At the start of a request: if the previous request left the weights in the decode
        layout, move them back to the prefill layout. Returns the cycles it took."""
        if self.weights_layout != "decode":
            return 0.0
        led = self.ledger
        start = led.mark()
        with led.span("restore"):
            if self.cluster is None:
                self._charge_moves(None, "restore")
            else:
                self._charge_per_wafer(self._pairs(), "restore")
        self.weights_layout = "prefill"
        delta = led.since(start)
        self.cycles.phase["restore"] += delta["cycles"]
        self.cycles.add_per_layer_counters(delta)  # it moves every layer's weights
        return delta["cycles"]

    def _charge_per_wafer(self, pairs: list[transition.Pair], prefix: str) -> None:
        """Each wafer's moves between its own regions (a ``shared`` cluster's transition or
        restore): the wafers work at the same time."""
        by_wafer: dict = {}
        for p in pairs:
            if not _same_wafer(p.src, p.dst):
                raise RuntimeError(f"{prefix}: {p.src.describe()} -> {p.dst.describe()} would cross wafers")
            by_wafer.setdefault(p.src.wafer.name, []).append(p)
        with self.ledger.parallel() as par:
            for group in by_wafer.values():
                with par.branch():
                    transition.charge(self.ledger, group, prefix)

    def _send_kv(self, pairs: list[transition.Pair]) -> None:
        """A ``split`` cluster's transition: every prefill region's K and V (of the layers a
        decode region holds) cross to that region's wafer, all at once (each system's I/O
        carries what leaves or enters it); the weights stay."""
        flows = [interwafer.Flow(src, dst, item) for p in pairs for name, src, dst, item in p.moves if name == "kv"]
        # the first token (picked on the prefill side) goes with them to where decode embeds it
        flows.append(interwafer.Flow(_one_pe(self.prefill_stages[0].mesh.region),
                                     _one_pe(self.decode_stages[0].mesh.region), DTYPE_BYTES["fp32"]))
        interwafer.charge_transfer(self.ledger, self.cluster, flows, name="interwafer.kv")

    def decode(self, token_id, seq: int = 0) -> np.ndarray | None:
        """Run one token (None in a dry run) of the request in slot ``seq``; returns the next
        token's logits [V] (numeric)."""
        out = self.decode_batch([seq], [token_id])
        return None if out is None else out[0]

    def decode_batch(self, seqs, tokens) -> np.ndarray | None:
        """One decode step for the requests in slots ``seqs``, whose last tokens are ``tokens``
        (None each in a dry run); returns their next tokens' logits [B, V] (numeric).

        With several decode regions the batch runs as micro-batches (one per region at most)
        pipelined over them: while one micro-batch is on region s, the next is on region s-1
        (``Ledger.pipeline``). The LM head spans every region (its vocabulary is sliced over
        them all), so each micro-batch's head waits for them all to be free.
        ``token_cycles[slot]`` is when each request's token was picked."""
        seqs = tuple(int(s) for s in seqs)
        tokens = list(tokens)
        if len(tokens) != len(seqs):
            raise RequestError(f"{len(tokens)} tokens for {len(seqs)} request slots")
        # a slot may come several times, its tokens in order (a verification pass): the k-th
        # is at its position + k, and all of them stay in one micro-batch
        rows_of: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            rows_of.setdefault(s, []).append(i)
        ahead = {s: len(r) for s, r in rows_of.items()}
        toks = [self._check_token(t, s, ahead[s]) for t, s in zip(tokens, seqs)]
        positions = [0] * len(seqs)
        for s, r in rows_of.items():
            for k, i in enumerate(r):
                positions[i] = self.positions[s] + k
        # one micro-batch per region at most, of no more rows than the plan budgeted a region for
        rows = self.plan.decode.rows
        requests = list(rows_of)
        count = max(min(len(requests), len(self.decode_stages)), -(-len(seqs) // rows))
        parts = np.array_split(requests, min(count, len(requests)))
        # rows of each micro-batch, a request's tokens side by side in their order
        order = [[i for s in part for i in rows_of[int(s)]] for part in parts]
        groups = [tuple(seqs[i] for i in g) for g in order]
        wide = max(len(g) for g in groups)
        if wide > rows:
            raise RequestError(f"a micro-batch of {wide} rows (a verification pass's tokens stay together) on decode "
                               f"regions planned for {rows}: plan the run with speculative_tokens={wide - 1} "
                               "(RunConfig.speculative_tokens)")
        led, stages = self.ledger, self.decode_stages
        start = led.mark(per_primitive=self.mode == "dry")
        if self.mode == "dry":
            # the step's program: the micro-batches and every cache's state on every stage
            # (stages of different grids change occupancy at different tokens)
            step_key = ("step", tuple(len(g) for g in groups)) + tuple(
                tuple(c.program_key(n) for c in self._alike_caches(s)) for s, n in ahead.items())
            if step_key in self._memo:
                return self._replay_step(self._memo[step_key], groups)
            layers_before = self.cycles.layer_totals("decode")
        with led.span("decode"), led.pipeline() as pipe:
            hs = [self._embed_tokens(pipe, m, [toks[i] for i in g]) for m, g in enumerate(order)]
            for si, st in enumerate(stages):
                for m, g in enumerate(groups):
                    with pipe.slot(m, (si,)):
                        h = hs[m] if not si else self._to_region(hs[m], st, hs[m].layout)  # [b, E] (None, y)
                        hs[m] = st.step(h, [positions[i] for i in order[m]], partial(self._run_layer, "decode", si),
                                        seqs=g)
            logits = []
            for m, g in enumerate(groups):
                with pipe.slot(m, range(len(stages))):
                    logits.append(self._decode_logits(hs[m]))
            ends = [pipe.item_end(m) - start["cycles"] for m in range(len(groups))]
        delta = led.since(start)
        delta["token_offsets"] = ends
        if self.mode == "dry":
            after = self.cycles.layer_totals("decode")
            delta["layers"] = {k: v - layers_before[k] for k, v in after.items()}  # the step's layers alone
            self._memo[step_key] = delta
        self._count_step(delta, groups, start["cycles"])
        if self.mode != "numeric":
            return None
        out = np.concatenate(logits, axis=0)  # micro-batch order
        back = np.argsort(np.concatenate(order), kind="stable")
        return out[back]

    def _alike_caches(self, seq: int) -> list:
        """One cache of slot ``seq`` per kind (region size, scheme, slots per row, layers: a
        region without layers never appends), the first stage's of each: every decode stage's
        cache of a slot is loaded, appended to and rolled back together, so caches of one kind
        are in one state and have one program key."""
        caches = [st.caches[seq] for st in self.decode_stages]
        held = self._kinds.get(seq)
        if held is None or len(held[0]) != len(caches) or any(a is not b for a, b in zip(held[0], caches)):
            first: dict = {}
            for c in caches:
                first.setdefault((c.q, c.scheme, c.cap, c.layers), c)
            held = self._kinds[seq] = (caches, list(first.values()))
        return held[1]

    def verify(self, seq: int, tokens) -> np.ndarray | None:
        """A verification pass of speculative decoding: the request in slot ``seq`` takes
        ``tokens`` (its last token, then the draft's; None each in a dry run) in one decode
        step, every layer appending them in order, each attending over the cache up to
        itself; returns the logits after each [T, V] (numeric). :meth:`rollback` drops the
        rejected ones."""
        return self.decode_batch([seq] * len(tokens), tokens)

    def rollback(self, seq: int, tokens: int) -> None:
        """Drop the newest ``tokens`` tokens of the request in slot ``seq`` from its KV cache
        on every decode region (the drafts a verification pass rejected), charged as decode time."""
        if seq not in self.positions:
            raise RequestError(f"no request in slot {seq}")
        if not 0 <= tokens <= self.positions[seq]:
            raise RequestError(f"cannot drop {tokens} of the {self.positions[seq]} tokens in slot {seq}")
        if not tokens:
            return
        mark = self.ledger.mark()
        with self.ledger.span("kv_rollback"), self.ledger.parallel() as par:
            for st in self.decode_stages:  # each region drops its layers' entries at once
                with par.branch():
                    st.caches[seq].rollback(tokens)
        self.cycles.phase["decode"] += self.ledger.since(mark)["cycles"]
        self.positions[seq] -= tokens

    def _check_token(self, token_id, seq: int = 0, tokens: int = 1) -> int | None:
        tok = None if token_id is None else int(token_id)
        if tok is not None and not 0 <= tok < self.config.vocab_size:
            raise RequestError(f"token id {tok} out of range [0, {self.config.vocab_size})")
        if seq not in self.positions:
            raise RequestError(f"no request in slot {seq}")
        if self.positions[seq] + tokens > self.max_seq_len:
            raise RequestError(f"context of {self.max_seq_len} tokens is full")
        return tok

    def _replay_step(self, delta: dict, groups: list[tuple[int, ...]]) -> None:
        start = self.ledger.cycles
        self.ledger.replay(delta, "decode step (replayed)")
        for st in self.decode_stages:
            for g in groups:
                st.skip_step(g)
        self.cycles.add_layers("decode", delta["layers"])
        self._count_step(delta, groups, start)

    def _count_step(self, delta: dict, groups: list[tuple[int, ...]], start: float) -> None:
        self.cycles.phase["decode"] += delta["cycles"]
        self.cycles.steps.append(delta["cycles"])
        for g, offset in zip(groups, delta["token_offsets"]):
            for s in g:
                self.positions[s] += 1
                self.token_cycles[s] = start + offset

    def _embed_tokens(self, pipe, item: int, toks: list[int | None]) -> DistTensor:
        """The micro-batch's token embeddings [b, E] (None, y) on the first decode region; each
        is broadcast on the region whose table slice holds it (a dry run's token: the first of
        the vocabulary)."""
        owners = {next((i for i, s in enumerate(self.decode_stages) if t is not None and t in s.vocab), 0)
                  for t in toks}
        with pipe.slot(item, sorted(owners | {0})):
            return batch.stack([self._embed_token(t) for t in toks], name="embeddings")

    def _embed_token(self, tok: int | None) -> DistTensor:
        """The token's embedding [E] (y) on the first decode region (a dry run's token is the
        first of the vocabulary)."""
        stage = next((s for s in self.decode_stages if tok is not None and tok in s.vocab), self.decode_stages[0])
        first = self.decode_stages[0]
        if not _same_wafer(stage.mesh, first.mesh):  # the token goes to the wafer with its row
            interwafer.charge_transfer(self.ledger, self.cluster, [interwafer.Flow(
                _one_pe(first.mesh.region), _one_pe(stage.mesh.region), DTYPE_BYTES["fp32"])], name="interwafer.token")
        h = stage.embed_lookup(tok if tok is not None else stage.vocab.start)
        if stage is not first:
            h = self._to_region(h, first, ("y",), name="embedding.transfer")
        return h

    def _decode_logits(self, h: DistTensor) -> np.ndarray | None:
        last, led = self.decode_stages[-1], self.ledger
        heads = self._vocab_stages(self.decode_stages)
        chunks = []
        with last.mesh.sram.scope():
            hn = last.rmsnorm(h, last.final_norm, "final_norm")  # [E] (y)
            last.mesh.sram.release(h)
            copies = self._to_table_wafers(hn, heads, hn.layout)  # on a cluster: to the wafers with tables
            with led.span("lm_head"), led.parallel() as par:
                for i, st in enumerate(heads):
                    src = copies.get(st.mesh.wafer.name, (hn, 1))[0]
                    with par.branch(), st.mesh.sram.scope():
                        x = comm.relayout(src, st.mesh, src.layout, name="lm_head.transfer")
                        chunks.append(self._head_logits("decode", i, st, x))
            self._release_copies(copies, hn)
            self._gather_best(heads, self.decode_stages[0])
        if self.mode != "numeric":
            return None
        return np.concatenate(chunks, axis=-1)  # [b, V]

    def measured_stages(self, phase: str):
        """(phase plan, stages) whose SRAM accounting saw their layers run: every stage, except
        in a dry run on a cluster, where a stage that replayed its twin's layers (the same
        region, layers and tables on another wafer) holds what its twin holds."""
        pp = self.plan.prefill if phase == "prefill" else self.plan.decode
        stages = self.prefill_stages if phase == "prefill" else self.decode_stages
        if pp is None or self.cluster is None or self.mode == "numeric":
            return pp, stages
        keep = [i for i, t in enumerate(self.twins[phase]) if t == i]
        sub = dataclasses.replace(pp, stages=[pp.stages[i] for i in keep],
                                  layer_share=[pp.layer_share[i] for i in keep] if pp.layer_share else [],
                                  region_bytes=[pp.region_bytes[i] for i in keep] if pp.region_bytes else [])
        return sub, [stages[i] for i in keep]

    # ---- reporting ---------------------------------------------------------------------------
    def request_metrics(self) -> dict:
        """Predicted wafer figures of the request run since the last reset()."""
        return request_metrics(self)


def _same_wafer(a, b) -> bool:
    """Whether two meshes (or regions) are on the same wafer."""
    return a.wafer is b.wafer or a.wafer == b.wafer


def _first_per_wafer(stages) -> list:
    """The first of ``stages`` on each wafer: what a wafer sends or receives goes once, to or
    from that stage's region."""
    first: dict = {}
    for st in stages:
        first.setdefault(st.mesh.wafer.name, st)
    return list(first.values())


def _one_pe(region) -> Placement:
    """Two fp32 words (a token id, or a best logit and its index) on a region's first PE."""
    return Placement(region, (1, 2), y_dim=0, y_of=np.zeros(1, np.int64), x_dim=1, x_of=np.zeros(2, np.int64))


def _twins(stages) -> list[int]:
    """For each stage, the first one with the same program: the same region (place and size),
    layer count, vocabulary slice size and attention passes (stages of one wafer never share
    a region, so on one wafer every stage is its own)."""
    first: dict = {}
    out = []
    for i, st in enumerate(stages):
        r = st.region
        key = (r.row0, r.col0, r.rows, r.cols, len(st.layers), len(st.vocab), st.heads_per_pass)
        out.append(first.setdefault(key, i))
    return out
