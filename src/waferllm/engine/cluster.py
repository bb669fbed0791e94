"""Clusters of wafers: a model's layers pipelined over several wafers, planned per wafer.

A model too large for one wafer runs, as production wafer-scale inference does, as a
pipeline of wafers: each wafer holds a run of consecutive layers (its *share*), placed
by the single-wafer planner (:func:`waferllm.engine.placement.plan_phase`) on its own
regions, and a request's hidden states go from wafer to wafer over the link between the
systems (:mod:`waferllm.mesh.interwafer`). One request is on one wafer at a time.

Two layouts:

- ``shared``: every wafer runs both phases on its share, each in its own grid, and the
  prefill-to-decode transition re-places each wafer's weights and K/V on that wafer
  (the wafers do it at the same time);
- ``split``: the first ``p`` wafers run prefill and the others decode (prefill/decode
  disaggregation). Each side keeps its own layout for good: no weights move between the
  phases and no restore precedes the next request, but each side holds the whole model,
  and the prompt's K/V cross the links to the decode wafers.

The vocabulary tables (LM head, and the embedding table when it is not tied) sit on the
*first* wafer of each phase, sliced over its regions. Every decode step crosses as many
links whether they sit on the first or the last wafer (the hidden state wafer to wafer,
then back to where the next token is embedded), but on the first wafer the prompt's
embedding rows never cross a link, only the last hidden row (or the rows whose logits are
asked for) goes back, and a tied table serves the LM head and the embedding from one place.
Splitting the tables over every wafer would save the first wafer's SRAM (a 128K x 8K table
is ~2 GB in fp16, ~5% of a wafer) at the price of sending the hidden state to every wafer
and gathering their best logits each step. So the tables are split only when they must
be: over the fewest leading wafers with which the shares plan (a 405B-class model's
16K-wide tables do not fit one wafer beside a layer); the hidden state then goes to each
of them at once, and each sends its best logit and index to the first, which picks the
token and asks the wafer holding its row for the embedding.

Each share is as many layers as its wafer holds in proportion to what the wafers can
take (the wafer with the tables takes fewer), at least one each. The wafer counts come
from planning: :func:`fewest_wafers` is the smallest count whose shares all plan, and
:func:`search` predicts the candidate counts and layouts and keeps the fastest.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

from waferllm.engine.placement import PhasePlan, Plan, Stage, _split, fill_by_capacity, plan_phase, planned_kv_capacity
from waferllm.errors import PlacementError, RequestError
from waferllm.hardware.cluster import FASTER_WHEN_LARGER, LINK_FIELDS, ClusterSpec, cluster_for
from waferllm.hardware.plmr import DTYPE_BYTES, WaferSpec

LAYOUTS = ("shared", "split")
PHASES = ("prefill", "decode")


# ------------------------------------------------------------------ what one wafer holds


class Capacity:
    """The layers one wafer of ``wafer``'s kind can hold, by phase, grid and the vocabulary
    entries it holds tables for: the most for which its share plans (the decode share with
    its KV cache for ``max_seq_len`` tokens). Every answer is a plan that succeeded."""

    def __init__(self, config, wafer: WaferSpec, max_seq_len: int, prompt_len: int | None = None,
                 dtype: str = "fp16", weights: str = "fp16", prefill_attention: str = "paper"):
        self.config, self.wafer, self.dtype, self.weights = config, wafer, dtype, weights
        self.prefill_attention = prefill_attention
        self.seq = {"prefill": prompt_len or max_seq_len, "decode": max_seq_len}
        self.max_seq_len = max_seq_len
        self._layers: dict = {}
        self._plans: dict = {}  # (phase, grid, layers, vocab entries) -> PhasePlan or the PlacementError

    def share_plan(self, grid: int, phase: str, layers: int, vocab: int) -> PhasePlan:
        """The plan of a share of ``layers`` layers and ``vocab`` vocabulary entries' tables on
        one wafer (raises PlacementError); every wafer of a cluster is alike, so a plan holds
        for each (see :func:`_on_wafer`)."""
        key = (phase, grid, layers, vocab)
        if key not in self._plans:
            try:
                self._plans[key] = self._plan(grid, phase, layers, vocab)
            except PlacementError as exc:
                self._plans[key] = exc
        out = self._plans[key]
        if isinstance(out, PlacementError):
            raise out
        return out

    def _plan(self, grid: int, phase: str, layers: int, vocab: int) -> PhasePlan:
        cfg, wafer = self.config.replace(num_layers=layers), self.wafer
        pp = plan_phase(cfg, wafer, grid, phase, self.seq[phase], self.dtype, suggest=False, vocab_size=vocab,
                        weights=self.weights, prefill_attention=self.prefill_attention)
        if phase == "decode":
            held = planned_kv_capacity(cfg, wafer, pp)[0]
            if held < self.max_seq_len:
                raise PlacementError(f"the KV cache for {self.max_seq_len} tokens of {layers} layers does not fit "
                                     f"the {grid}x{grid} decode regions of one wafer (capacity {held} tokens)")
        return pp

    def fits(self, phase: str, grid: int, layers: int, vocab: int) -> bool:
        try:
            self.share_plan(grid, phase, layers, vocab)
            return True
        except PlacementError:
            return False

    def layers(self, phase: str, grid: int, vocab: int) -> int:
        """The most layers (up to the model's) a wafer holding ``vocab`` entries' tables holds
        for ``phase`` on ``grid``; 0 if not one."""
        key = (phase, grid, vocab)
        if key not in self._layers:
            lo, hi = 0, self.config.num_layers
            while lo < hi:  # more layers never fit where fewer do not
                mid = (lo + hi + 1) // 2
                if self.fits(phase, grid, mid, vocab):
                    lo = mid
                else:
                    hi = mid - 1
            self._layers[key] = lo
        return self._layers[key]

    def table_slices(self, wafers: int) -> list[int]:
        """The vocabulary entries each of ``wafers`` table wafers holds (contiguous, balanced)."""
        return _split(self.config.vocab_size, [1] * wafers)

    def per_wafer(self, grids: dict[str, int | None], phases=PHASES, tables: int = 1) -> tuple[int, int]:
        """(with a table slice, without) layers a wafer running ``phases`` on ``grids`` holds,
        the tables spread over ``tables`` wafers."""
        run = [ph for ph in phases if grids.get(ph) is not None]
        if not run:
            return 0, 0
        widest = max(self.table_slices(tables))
        return (min(self.layers(ph, grids[ph], widest) for ph in run),
                min(self.layers(ph, grids[ph], 0) for ph in run))


_CAPACITIES: dict = {}  # the arguments (the model's fields by value) -> their Capacity


def capacity_for(config, wafer: WaferSpec, max_seq_len: int, prompt_len: int | None = None, dtype: str = "fp16",
                 weights: str = "fp16", prefill_attention: str = "paper") -> Capacity:
    """The :class:`Capacity` of these arguments, shared: a search's candidates, and the
    cluster plan of each, plan the same shares (every answer is a function of them)."""
    key = (repr(config), id(wafer), max_seq_len, prompt_len, dtype, weights, prefill_attention)
    held = _CAPACITIES.get(key)
    if held is None or held.wafer is not wafer:
        if len(_CAPACITIES) >= 8:
            _CAPACITIES.pop(next(iter(_CAPACITIES)))
        held = _CAPACITIES[key] = Capacity(config, wafer, max_seq_len, prompt_len, dtype, weights, prefill_attention)
    return held


#: the most wafers the vocabulary tables are spread over (beyond, a table slice is smaller
#: than a layer on any wafer this project describes)
MAX_TABLE_WAFERS = 8


def wafers_for(total: int, with_tables: int, without: int, tables: int = 1) -> int | None:
    """The fewest wafers holding ``total`` layers (at least one each) when the first
    ``tables`` hold the vocabulary tables and ``with_tables`` layers each, every other
    ``without`` (None: no count does)."""
    if with_tables < 1 or tables > total:
        return None
    if tables * with_tables >= total:
        return tables
    if without < 1:
        return None
    return tables + math.ceil((total - tables * with_tables) / without)


def side_layout(cap: Capacity, grids: dict, phases, wafers: int | None = None) -> tuple[int, int] | None:
    """(wafers, table wafers) for one group of wafers running ``phases``: with ``wafers`` None
    the fewest that hold the model (the tables on as few wafers as that allows); else the
    fewest table wafers with which ``wafers`` hold it. None: no such count."""
    L, best = cap.config.num_layers, None
    for v in range(1, min(MAX_TABLE_WAFERS, L) + 1):
        if best is not None and v >= best[0]:
            break
        if wafers is not None and v > wafers:
            break
        cv, cp = cap.per_wafer(grids, phases, v)
        if wafers is None:
            n = wafers_for(L, cv, cp, v)
            if n is not None and (best is None or n < best[0]):
                best = (n, v)
        elif _spread(L, [cv] * v + [cp] * (wafers - v)) is not None:
            return wafers, v
        if cv == cp and cv >= 1:  # a smaller table slice no longer costs a layer
            break
    return best


def fewest_wafers(config, wafer: WaferSpec, prefill_grid: int | None, decode_grid: int | None, max_seq_len: int,
                  dtype: str = "fp16", prompt_len: int | None = None, layout: str = "shared",
                  capacity: Capacity | None = None, weights: str = "fp16") -> int | None:
    """The fewest wafers of ``wafer`` that hold the model on these grids (``shared``: each
    wafer both phases; ``split``: prefill wafers plus decode wafers), or None."""
    cap = capacity or Capacity(config, wafer, max_seq_len, prompt_len, dtype, weights)
    grids = {"prefill": prefill_grid, "decode": decode_grid}
    if layout == "shared":
        found = side_layout(cap, grids, PHASES)
        return None if found is None else found[0]
    sides = [side_layout(cap, grids, (ph,)) for ph in PHASES if grids[ph] is not None]
    return None if None in sides or not sides else sum(n for n, _ in sides)


def _spread(total: int, caps: list[int]) -> list[int] | None:
    """Layers per wafer: at least one each, the rest in proportion to what each can take
    beyond that, topped up where there is room (None: they cannot hold ``total``)."""
    n = len(caps)
    if total < n or min(caps) < 1 or sum(caps) < total:
        return None
    return [1 + x for x in fill_by_capacity(total - n, [c - 1 for c in caps])]


# ------------------------------------------------------------------ the plan


@dataclass
class WaferShare:
    """What one wafer of a cluster holds: its layers, its slice of the vocabulary tables, and
    its plan per phase it runs (stages with model-wide layer and vocabulary indices)."""

    index: int
    layers: range
    vocab: range
    prefill: PhasePlan | None = None
    decode: PhasePlan | None = None

    @property
    def phases(self) -> list[str]:
        return [ph for ph in PHASES if getattr(self, ph) is not None]

    def to_dict(self) -> dict:
        out = {"wafer": self.index, "phases": self.phases, "layers": [self.layers.start, self.layers.stop],
               "vocab": [self.vocab.start, self.vocab.stop]}
        for ph in self.phases:
            out[ph] = getattr(self, ph).to_dict()
        return out


@dataclass
class ClusterPlan(Plan):
    """A :class:`Plan` over the wafers of a cluster: each phase's stages are every wafer's, in
    pipeline order (``Stage.wafer`` says whose), and ``shares`` what each wafer holds."""

    cluster: ClusterSpec | None = None
    shares: list[WaferShare] = field(default_factory=list)

    @property
    def wafers(self) -> int:
        return len(self.shares)

    def to_dict(self) -> dict:
        d = super().to_dict()
        for ph in PHASES:
            pp = getattr(self, ph)
            if pp is not None:
                for sd, st in zip(d[ph]["stages"], pp.stages):
                    sd["wafer"] = st.wafer
        d.update({"wafers": self.wafers, "layout": self.cluster.layout, "prefill_wafers": self.cluster.prefill_wafers,
                  "per_wafer": [s.to_dict() for s in self.shares]})
        return d


def _on_wafer(pp: PhasePlan, index: int, wafer: WaferSpec, first_layer: int, first_entry: int) -> PhasePlan:
    """A share's plan moved to wafer ``index``: its regions on that wafer (named ``w{index}.``),
    its layers and vocabulary entries numbered model-wide."""
    stages = [Stage(dataclasses.replace(st.region, wafer=wafer, name=f"w{index}.{st.region.name}"),
                    range(first_layer + st.layers.start, first_layer + st.layers.stop),
                    range(first_entry + st.vocab.start, first_entry + st.vocab.stop), index,
                    pp.heads_per_pass) for st in pp.stages]
    return dataclasses.replace(pp, stages=stages)


def _merge(phase: str, plans: list[PhasePlan]) -> PhasePlan | None:
    """One phase's plan over the wafers (every wafer's stages in pipeline order)."""
    if not plans:
        return None
    fullest = max(plans, key=lambda p: sum(v for k, v in p.bytes_per_pe.items() if k not in ("reserved", "usable")))
    pp = PhasePlan(phase, plans[0].grid, [s for p in plans for s in p.stages], max(p.layers_per_region for p in plans),
                   dict(fullest.bytes_per_pe), sum(p.regions_available for p in plans))
    pp.heads_per_pass = min(p.heads_per_pass for p in plans)
    pp.attention = plans[0].attention
    pp.region_bytes = [b for p in plans for b in p.region_bytes]
    pp.layer_share = [n for p in plans for n in p.layer_share]
    pp.whole_model_fits = True
    pp.seq_len, pp.dtype = plans[0].seq_len, plans[0].dtype
    if hasattr(plans[0], "weights"):
        pp.weights = plans[0].weights
    return pp


def plan_cluster(config, cluster: ClusterSpec, prefill_grid: int | None, decode_grid: int | None, max_seq_len: int,
                 dtype: str = "fp16", prompt_len: int | None = None, weights: str = "fp16",
                 prefill_attention: str = "paper") -> ClusterPlan:
    """Plan the model over ``cluster.wafers`` wafers in the cluster's layout (see the module
    docstring). A count that cannot hold the model is an error that says how many can."""
    if max_seq_len < 1:
        raise PlacementError("max_seq_len must be positive")
    N, L = cluster.wafers, config.num_layers
    grids = {"prefill": prefill_grid, "decode": decode_grid}
    cap = capacity_for(config, cluster.wafer, max_seq_len, prompt_len, dtype, weights, prefill_attention)
    if cluster.prefill_wafers is None:
        groups = [(list(range(N)), [ph for ph in PHASES if grids[ph] is not None])]
    else:
        p = cluster.prefill_wafers
        groups = [(list(range(p)), ["prefill"] if prefill_grid else []),
                  (list(range(p, N)), ["decode"] if decode_grid else [])]
    if N > L:
        raise PlacementError(f"{config.name} has {L} layers: a pipeline of {N} wafers would leave some without one; "
                             f"use at most {L} wafers", wafers=N, layers=L)
    shares = {i: WaferShare(i, range(0), range(0)) for i in range(N)}
    for idx, phases in groups:
        if not phases:
            continue
        if len(idx) > L:
            raise PlacementError(f"{config.name} has {L} layers: {len(idx)} {'/'.join(phases)} wafers would leave "
                                 f"some without one; use at most {L}", wafers=N, layers=L)
        found = side_layout(cap, grids, phases, len(idx))
        if found is None:
            raise _too_few(config, cluster, grids, phases, len(idx), cap)
        v = found[1]
        cv, cp = cap.per_wafer(grids, phases, v)
        counts = _spread(L, [cv] * v + [cp] * (len(idx) - v))
        slices = cap.table_slices(v) + [0] * (len(idx) - v)
        start = vstart = 0
        for i, n, nv in zip(idx, counts, slices):
            share = shares[i]
            share.layers, share.vocab = range(start, start + n), range(vstart, vstart + nv)
            wafer = cluster.wafer_at(i)
            for ph in phases:
                pp = cap.share_plan(grids[ph], ph, n, nv)
                setattr(share, ph, _on_wafer(pp, i, wafer, start, vstart))
            start += n
            vstart += nv
    pre = _merge("prefill", [s.prefill for s in shares.values() if s.prefill is not None])
    dec = _merge("decode", [s.decode for s in shares.values() if s.decode is not None])
    shift = concat = 0
    if dec is not None:
        shift, concat = planned_kv_capacity(config, cluster.wafer, dec)
    plan = ClusterPlan(config.name, cluster.wafer.name, dtype, max_seq_len, pre, dec, int(shift), int(concat), [],
                       cluster=cluster, shares=[shares[i] for i in range(N)])
    return plan


def _too_few(config, cluster: ClusterSpec, grids: dict, phases: list[str], n: int, cap: Capacity) -> PlacementError:
    what = " and ".join(f"{ph} on {grids[ph]}x{grids[ph]} regions" for ph in phases)
    found = side_layout(cap, grids, phases)
    need = found[0] if found else None
    with_tables, without = cap.per_wafer(grids, phases, found[1] if found else 1)
    side = "" if cluster.prefill_wafers is None else f" {'/'.join(phases)}"
    detail = (f"{config.name} ({config.num_layers} layers) does not fit {n}{side} {cluster.wafer.name} wafers for {what}: "
              f"a wafer with (a slice of) the vocabulary tables holds {with_tables} layers, each other {without}")
    advice = (f"; {need}{side} wafers hold it (checked by planning them)." if need else
              "; no count of these wafers does: a wafer cannot hold one layer beside what it needs on these grids. "
              "Try other grids.")
    return PlacementError(detail + advice, wafers=n, wafers_needed=need, detail=detail)


def wafers_needed_note(config, wafer: WaferSpec, prefill_grid, decode_grid, max_seq_len: int, dtype: str,
                       prompt_len: int | None, weights: str = "fp16") -> tuple[int | None, str]:
    """(count, sentence) for an error about a model one wafer cannot hold: the fewest wafers
    that hold it on these grids (each share planned), or (None, "")."""
    try:
        n = fewest_wafers(config, wafer, prefill_grid, decode_grid, max_seq_len, dtype, prompt_len, weights=weights)
    except PlacementError:
        return None, ""
    if n is None or n < 2:
        return None, ""
    base = cluster_for(wafer)
    try:  # checked: the shares plan
        plan_cluster(config, dataclasses.replace(base, max_wafers=max(n, base.max_wafers)).with_wafers(n),
                     prefill_grid, decode_grid, max_seq_len, dtype, prompt_len, weights)
    except PlacementError:
        return None, ""
    return n, (f" Pipelined over wafers, it needs {n} {wafer.name} wafers on these grids (checked by planning "
               f"them): predict with --wafers {n}, or --wafers auto.")


# ------------------------------------------------------------------ the band


def cluster_corner(cluster: ClusterSpec, slow: bool) -> ClusterSpec | None:
    """The cluster with its wafer's and its link's assumed constants (those with a range) at
    the end that makes a run slower (``slow``) or faster; None if none has a range."""
    from waferllm.engine.band import corner

    w = corner(cluster.wafer, slow)
    link = {k: (hi if slow == (k not in FASTER_WHEN_LARGER) else lo) for k, (lo, hi) in cluster.assumed_ranges().items()}
    if w is None and not link:
        return None
    return dataclasses.replace(cluster, wafer=w or cluster.wafer, **{k: LINK_FIELDS[k][0](v) for k, v in link.items()})


# ------------------------------------------------------------------ choosing the count and layout


@dataclass
class Option:
    """One way to run the model on the cluster: a wafer count, a layout and the grids."""

    wafers: int
    layout: str
    prefill_grid: int
    decode_grid: int
    prefill_wafers: int | None = None
    estimate_s: float = 0.0  # the ranking estimate (see :func:`search`)
    e2e_s: float | None = None  # predicted (None: not predicted)
    metrics: dict | None = None  # its predicted times and rates (predict.predict_times)
    why: str = ""

    def to_dict(self) -> dict:
        m = self.metrics or {}
        return {"wafers": self.wafers, "layout": self.layout, "prefill_wafers": self.prefill_wafers,
                "prefill_grid": self.prefill_grid, "decode_grid": self.decode_grid,
                "estimate_s": self.estimate_s, "e2e_s": self.e2e_s, "ttft_s": m.get("ttft_s"),
                "tpot_s": m.get("tpot_s"), "transition_s": m.get("transition_s"),
                "e2e_tokens_per_s": m.get("e2e_tokens_per_s"), "note": self.why}


def _phase_seconds(config, wafer, run, input_len: int, output_len: int, grids: list[int]) -> dict:
    """Per phase, each grid's predicted phase time for the whole model, from one layer placed
    and run on one wafer (the per-layer time depends on the grid, not on the wafer count):
    TTFT for prefill, the mean TPOT for decode. A grid on which not even that places is left out."""
    from waferllm.engine.predict import predict_phase
    from waferllm.errors import WaferLLMError

    out = {"prefill": {}, "decode": {}}
    for phase in PHASES:
        fixed = run.prefill_grid if phase == "prefill" else run.decode_grid
        for g in ([fixed] if fixed else grids):
            trial = run.with_grids(g, None) if phase == "prefill" else run.with_grids(None, g)
            try:
                out[phase][g] = predict_phase(config, wafer, trial.replace(layers=1), phase, input_len,
                                              min(output_len, 64))
            except WaferLLMError:
                continue
    return out


def _estimate(config, cluster, opt: Option, secs: dict, input_len: int, output_len: int, dtype: str) -> float:
    """Ranking estimate of an option's request time: the phases' times on their grids plus
    the link crossings its wafers add (the prompt's hidden states once per prefill wafer,
    the hidden vector once per decode wafer and token, the K/V of a split layout)."""
    b = DTYPE_BYTES[dtype]
    E = config.hidden_size
    n_pre = opt.prefill_wafers or opt.wafers
    n_dec = opt.wafers - opt.prefill_wafers if opt.prefill_wafers else opt.wafers
    pre = secs["prefill"][opt.prefill_grid] + (n_pre - 1) * cluster.link_seconds(input_len * E * b) + (
        cluster.link_seconds(E * b) if n_pre > 1 else 0.0)
    dec = secs["decode"][opt.decode_grid] + (cluster.link_seconds(E * b) * n_dec if n_dec > 1 else 0.0)
    kv = 0.0
    if opt.prefill_wafers:
        kv = cluster.link_seconds(2 * config.num_layers * config.kv_dim * input_len * b / n_dec)
    return pre + kv + (output_len - 1) * dec


def search(config, cluster: ClusterSpec, run, input_len: int, output_len: int, wafers="auto", layout: str = "auto",
           limit: float = 2.0, grids: list[int] | None = None, progress=None) -> dict:
    """Choose how many wafers, which layout and which grids, by predicting the candidates.

    ``wafers``: a count, or ``auto``: from the fewest that hold the model (either layout, on
    any candidate grid) up to ``limit`` times that (and the cluster's ``max_wafers``).
    ``layout``: ``shared``, ``split`` or ``auto`` (both). Grids the run fixes are kept; the
    others are chosen per count among ``grids`` (default: the tuner's candidates) by their
    phase times (:func:`_phase_seconds`). For each count and layout the option with the best
    ranking estimate (:func:`_estimate`) is predicted in full: every count in the range, since
    a count's speed is not the smallest count's with more link crossings (with fewer layers
    per wafer, more of them sit on full-size regions instead of the smaller squares around
    them, and prefill attention may take more kv heads per pass). Returns the fastest option
    by predicted request time (``best``), every option considered (``options``), and the
    cluster and run it needs (``cluster``, ``run``)."""
    from waferllm.engine.predict import predict_times
    from waferllm.engine.tuner import candidate_grids

    if layout not in LAYOUTS + ("auto",):
        raise RequestError(f"layout must be one of shared, split or auto, got {layout!r}")
    if run.layers is not None:
        raise RequestError("a cluster places the whole model: --extrapolate-from-layers does not combine with --wafers")
    wafer, L = cluster.wafer, config.num_layers
    t0 = time.perf_counter()
    grids = grids or candidate_grids(wafer)
    secs = _phase_seconds(config, wafer, run, input_len, output_len, grids)
    for phase in PHASES:
        if not secs[phase]:
            fixed = run.prefill_grid if phase == "prefill" else run.decode_grid
            tried = ", ".join(map(str, [fixed] if fixed else grids))
            raise PlacementError(f"{config.name}: not one {phase} layer fits a region of {wafer.name} on the grids "
                                 f"tried ({tried}), so no count of wafers holds it: try other grids, or a wafer with "
                                 "more SRAM per PE")
    cap = capacity_for(config, wafer, run.max_seq_len, run.prompt_len, run.dtype, run.weights)
    layouts = LAYOUTS if layout == "auto" else (layout,)
    # the fewest wafers per layout and grid pair (planning only)
    fewest: dict = {}
    for g_pre in secs["prefill"]:
        for g_dec in secs["decode"]:
            for lay in layouts:
                fewest[(lay, g_pre, g_dec)] = fewest_wafers(config, wafer, g_pre, g_dec, run.max_seq_len, run.dtype,
                                                            run.prompt_len, lay, cap, run.weights)
    counts = [n for n in fewest.values() if n is not None]
    if not counts:
        raise PlacementError(f"{config.name} does not fit any count of {wafer.name} wafers on the grids tried: a wafer "
                             "cannot hold one layer beside what it needs there", wafers_needed=None)
    lo = min(counts)
    if wafers == "auto":
        hi = min(max(lo, math.floor(limit * lo)), cluster.max_wafers, L)
        if lo > cluster.max_wafers:
            raise PlacementError(f"{config.name} needs {lo} {wafer.name} wafers (checked by planning them); "
                                 f"{cluster.name} has at most {cluster.max_wafers} (max_wafers): raise it in a cluster "
                                 f"file with base = \"{cluster.name}\"", wafers_needed=lo)
        span = range(lo, hi + 1)
    else:
        if isinstance(wafers, bool) or not isinstance(wafers, int) or wafers < 1:
            raise RequestError(f"wafers must be a positive whole number or 'auto', got {wafers!r}")
        if wafers < lo:
            raise PlacementError(f"{config.name} does not fit {wafers} {wafer.name} wafer{'s' if wafers > 1 else ''} "
                                 f"on the grids tried; it needs {lo} (checked by planning them): --wafers {lo} or "
                                 "--wafers auto", wafers=wafers, wafers_needed=lo)
        cluster.with_wafers(wafers)  # within max_wafers
        span = range(wafers, wafers + 1)
    # per count and layout: the option with the best estimate
    options: list[Option] = []
    for n in span:
        for lay in layouts:
            best = None
            for (lay2, g_pre, g_dec), need in fewest.items():
                if lay2 != lay or need is None or need > n:
                    continue
                splits = [None] if lay == "shared" else _splits(config, cap, g_pre, g_dec, n)
                for p in splits:
                    opt = Option(n, lay, g_pre, g_dec, p)
                    opt.estimate_s = _estimate(config, cluster, opt, secs, input_len, output_len, run.dtype)
                    if best is None or opt.estimate_s < best.estimate_s:
                        best = opt
            if best is not None and (n > 1 or lay == "shared"):
                options.append(best)
    done = []
    for opt in sorted(options, key=lambda o: (o.wafers, o.layout)):
        c = cluster.with_wafers(opt.wafers, opt.prefill_wafers) if opt.wafers > 1 else cluster.with_wafers(1)
        r = run.with_grids(opt.prefill_grid, opt.decode_grid)
        try:  # ranked by its times alone: the caller reports the chosen one in full
            m = predict_times(config, c, r, input_len, output_len)
        except PlacementError as exc:  # the estimate's plan can differ from the real one in the last bytes
            opt.why = f"does not place: {exc}"
            continue
        opt.metrics = m
        opt.e2e_s = m["ttft_s"] + m["transition_s"] + (m["tpot_s"] or 0.0) * (output_len - 1)
        done.append(opt)
        if progress:
            progress(len(done), len(options), f"{opt.wafers} wafers, {opt.layout}, grids {opt.prefill_grid}/"
                                              f"{opt.decode_grid}: {opt.e2e_s * 1e3:.1f} ms")
    if not done:
        least = {lay: min((n for (l2, _, _), n in fewest.items() if l2 == lay and n is not None), default=None)
                 for lay in layouts}
        why = "; ".join(o.why for o in options) or ", ".join(
            f"the {lay} layout needs {n} wafers" if n else f"the {lay} layout fits no count"
            for lay, n in least.items())
        raise PlacementError(f"{config.name}: no option of {span.start}{'-' + str(span.stop - 1) if len(span) > 1 else ''}"
                             f" {wafer.name} wafers places ({why}; checked by planning them)")
    best = min(done, key=lambda o: o.e2e_s)
    chosen = cluster.with_wafers(best.wafers, best.prefill_wafers) if best.wafers > 1 else cluster.with_wafers(1)
    return {"best": best, "options": options, "fewest": lo, "cluster": chosen,
            "run": run.with_grids(best.prefill_grid, best.decode_grid), "search_wall_s": time.perf_counter() - t0}


def _splits(config, cap: Capacity, g_pre: int, g_dec: int, n: int) -> list[int]:
    """The prefill wafer counts p of a split over ``n`` wafers on these grids (both sides hold
    the model): from the fewest prefill wafers to ``n`` minus the fewest decode wafers."""
    L = config.num_layers
    pre, dec = side_layout(cap, {"prefill": g_pre}, ("prefill",)), side_layout(cap, {"decode": g_dec}, ("decode",))
    if pre is None or dec is None:
        return []
    return [p for p in range(pre[0], n - dec[0] + 1) if p <= L and n - p <= L]


def fewest_any_grid(config, wafer: WaferSpec, run, grids: list[int] | None = None) -> tuple[int, int, int] | None:
    """(wafers, prefill grid, decode grid): the fewest wafers that hold the model in the
    ``shared`` layout on any of ``grids`` (default: the tuner's candidates; a grid ``run``
    fixes is kept), checked by planning the cluster; None if no count does."""
    from waferllm.engine.tuner import candidate_grids

    grids = grids or candidate_grids(wafer)
    cap = Capacity(config, wafer, run.max_seq_len, run.prompt_len, run.dtype, run.weights)
    best = None
    for g_pre in ([run.prefill_grid] if run.prefill_grid else grids):
        for g_dec in ([run.decode_grid] if run.decode_grid else grids):
            n = fewest_wafers(config, wafer, g_pre, g_dec, run.max_seq_len, run.dtype, run.prompt_len, "shared", cap,
                              run.weights)
            if n is not None and n > 1 and (best is None or n < best[0]):
                best = (n, g_pre, g_dec)
    if best is None:
        return None
    base = cluster_for(wafer)
    plan_cluster(config, dataclasses.replace(base, max_wafers=max(best[0], base.max_wafers)).with_wafers(best[0]),
                 best[1], best[2], run.max_seq_len, run.dtype, run.prompt_len, run.weights)
    return best
