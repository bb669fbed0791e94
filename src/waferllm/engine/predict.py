"""Dry-run prediction: the engine's own code path on shapes only, for any model size.

``predict()`` places the whole model (a pipeline of regions per phase), runs prefill
for ``input_len`` tokens, the transition, and ``output_len - 1`` decode steps (the first
output token comes from the prefill logits), and reports the ledger's figures beside a
GPU roofline. With ``layers=K`` it runs the first K layers on the given grids and scales
the per-layer time to the whole model: the paper's method for models that do not fit
one wafer; the result says so. :func:`predict_cluster` predicts the model pipelined over
several wafers of a cluster (:mod:`waferllm.engine.cluster`): a given count, or the fastest
count from the fewest that hold the model up to a limit, in the faster layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

from waferllm.baselines import gpu_baselines
from waferllm.engine.band import RATES, TIMES, apply_band, corner
from waferllm.engine.cluster import cluster_corner
from waferllm.engine.metrics import request_times
from waferllm.engine.run_config import ALGORITHMS, RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.errors import RequestError
from waferllm.hardware import get_wafer
from waferllm.hardware.cluster import ClusterSpec
from waferllm.hardware.plmr import WaferSpec
from waferllm.mesh.corners import Corners, nominal, tracking
from waferllm.mesh.corners import corner as corner_value


#: the most tokens a prediction runs, even beyond the model's context (each decode step is
#: host work: a million-token request would take the better part of an hour)
MAX_PREDICT_TOKENS = 1 << 17


def _check(input_len: int, output_len: int, config=None, layers: int | None = None,
           allow_beyond_context: bool = False) -> None:
    """Refuse a request that cannot be predicted, before anything is placed or tuned: lengths
    that are not positive integers, ``layers`` outside 1..num_layers, and (unless
    ``allow_beyond_context``) more tokens than the model's context."""
    for name, v in (("input_len", input_len), ("output_len", output_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RequestError(f"{name} must be a positive integer, got {v!r}")
    if input_len + output_len > MAX_PREDICT_TOKENS:
        raise RequestError(f"input_len {input_len} + output_len {output_len} is more than the {MAX_PREDICT_TOKENS:,} "
                           "tokens a prediction runs (every decode step is simulated)")
    if config is None:
        return
    n = config.num_layers
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= n):
        raise RequestError(f"layers (--extrapolate-from-layers) must be a whole number from 1 to {n} "
                           f"({config.name} has {n} layers), got {layers!r}")
    ctx = config.max_position_embeddings
    if not allow_beyond_context and input_len + output_len > ctx:
        raise RequestError(
            f"input_len {input_len} + output_len {output_len} = {input_len + output_len} tokens is more than "
            f"{config.name}'s context of {ctx} tokens (max_position_embeddings): shorten the request to at most "
            f"{ctx} tokens in all, or allow_beyond_context=True (--allow-beyond-context) to predict its cost anyway")


def check_request(config, input_len: int, output_len: int, layers: int | None = None,
                  allow_beyond_context: bool = False) -> None:
    """What :func:`predict` refuses, checked on its own (a front end calls it before tuning grids)."""
    _check(input_len, output_len, config, layers, allow_beyond_context)


def predict(config, wafer, input_len: int, output_len: int, prefill_grid: int, decode_grid: int,
            dtype: str = "fp16", kv_scheme: str = "shift", layers: int | None = None, gpus: bool = True,
            band: bool = True, allow_beyond_context: bool = False) -> dict:
    """Predict one request of ``input_len`` + ``output_len`` tokens (keyword form of :func:`predict_run`)."""
    _check(input_len, output_len, config, layers, allow_beyond_context)
    run = RunConfig.for_request(input_len, output_len, prefill_grid=prefill_grid, decode_grid=decode_grid,
                                dtype=dtype, kv_scheme=kv_scheme, layers=layers)
    return predict_run(config, wafer, run, input_len, output_len, gpus, band, allow_beyond_context)


def predict_run(config, wafer, run: RunConfig, input_len: int, output_len: int, gpus: bool = True,
                band: bool = True, allow_beyond_context: bool = False) -> dict:
    """Predict one request of ``input_len`` + ``output_len`` tokens run as ``run`` says.

    With ``band``, times and rates also get ``*_low``/``*_high``: the same request on the
    wafer with its assumed constants at the ends of their ranges, widened by the wafer's
    calibration error (:mod:`waferllm.engine.band`). The corners are priced in the same
    execution as the request when their programs are the same (:func:`_with_corners`), else
    run again. ``host_wall_s``: the whole prediction's host time, band included."""
    _check(input_len, output_len)
    t0 = time.perf_counter()
    spec = wafer if isinstance(wafer, (WaferSpec, ClusterSpec)) else get_wafer(wafer)
    m, ends = _with_corners(config, spec, run, input_len, output_len) if band else (None, None)
    if m is None:
        m = _run(config, spec, run, input_len, output_len)
        if band:
            ends = _corner_runs(config, spec, run, input_len, output_len)
    if band:
        apply_band(m, ends[0], ends[1], _residual(spec))
    if gpus:
        m["gpu_baselines"] = gpu_baselines(config, input_len, output_len)
    m["host_wall_s"] = time.perf_counter() - t0
    return m


def _execute(config, spec, run: RunConfig, input_len: int, output_len: int, watch=None) -> WaferModel:
    """The request executed shape-only on ``spec`` (a wafer, or a cluster), inside ``watch``."""
    wm = WaferModel(config, None, spec, run, mode="dry")
    with watch or contextlib.nullcontext():
        return _request(wm, input_len, output_len, restored=False)


def predict_times(config, spec, run: RunConfig, input_len: int, output_len: int) -> dict:
    """One execution of the request on ``spec``: its times and rates alone
    (:func:`waferllm.engine.metrics.request_times`; ``total_s``: prefill, transition and
    decode), the figures :func:`predict_run` would report under those names."""
    return request_times(_execute(config, spec, run, input_len, output_len))


def _run(config, spec, run: RunConfig, input_len: int, output_len: int, shown=None, watch=None) -> dict:
    """One execution of the request on ``spec`` (a wafer, or a cluster): its metrics.
    ``shown``: the wafer or cluster whose constants the result lists (default ``spec``);
    ``watch``: a context the execution runs in (the report built from it runs outside)."""
    wm = _execute(config, spec, run, input_len, output_len, watch)
    m = wm.request_metrics()
    shown = shown or spec
    shown_wafer = shown.wafer if isinstance(shown, ClusterSpec) else shown
    m.update({
        "model": config.name,
        "input_len": input_len,
        "output_len": output_len,
        "dtype": run.dtype,
        "weights": run.weights,
        "kv_scheme": run.kv_scheme,
        "algorithms": {k: getattr(run, k) for k in ALGORITHMS},  # the paper's, or beyond it
        "placement": wm.plan.to_dict(),
        "constants": {k: {"value": v["value"], "status": v["status"]} for k, v in shown_wafer.to_dict().items()
                      if isinstance(v, dict)},
    })
    if isinstance(shown, ClusterSpec):  # the link's constants, with their provenance
        m["cluster"] = shown.to_dict()
    if wm.layers != config.num_layers:
        m["note"] = (f"extrapolated: {wm.layers} of {config.num_layers} layers were placed and run on these grids; "
                     f"layer time scaled by {config.num_layers / wm.layers:g} (the paper's method for models that "
                     f"do not fit one wafer)")
    return m


def _ends(spec) -> list:
    """The fast and the slow corner of a wafer or cluster (both None: no constant has a range)."""
    if isinstance(spec, ClusterSpec):
        return [cluster_corner(spec, slow) for slow in (False, True)]
    return [corner(spec, slow) for slow in (False, True)]


def _residual(spec) -> float:
    return (spec.wafer if isinstance(spec, ClusterSpec) else spec).calibration_error


def _corner_runs(config, spec, run: RunConfig, input_len: int, output_len: int) -> list:
    """The request run again on each corner (None where there is none)."""
    return [None if w is None else _run(config, w, run, input_len, output_len) for w in _ends(spec)]


def _combined(spec, ends):
    """``spec`` with every constant that differs between it and its corners holding all of
    their values (a :class:`Corners`: nominal, fast, slow); the rest as they are."""
    def merge(nom, fast, slow):
        changed = {}
        for f in dataclasses.fields(nom):
            vals = tuple(getattr(x, f.name) for x in (nom, fast, slow))
            if isinstance(vals[0], (int, float)) and not isinstance(vals[0], bool) and len(set(vals)) > 1:
                changed[f.name] = Corners(tuple(float(v) for v in vals))
        return dataclasses.replace(nom, **changed) if changed else nom

    fast, slow = ends
    if isinstance(spec, ClusterSpec):
        w = merge(spec.wafer, fast.wafer, slow.wafer)
        return merge(*(dataclasses.replace(c, wafer=w) for c in (spec, fast, slow)))
    return merge(spec, fast, slow)


def _with_corners(config, spec, run: RunConfig, input_len: int, output_len: int):
    """The request and both corners of its band from one execution, on a wafer whose
    differing constants carry every corner's value (:mod:`waferllm.mesh.corners`): the
    metrics (with the nominal values alone) and each corner's times and rates. (None, None)
    when the corners' programs would differ (or anything fails): the caller runs them apart."""
    ends = _ends(spec)
    if ends[0] is None or ends[1] is None:
        return None, None
    watch = tracking()  # the execution's decisions; the report sorts and formats by nominal values
    try:
        m = _run(config, _combined(spec, ends), run, input_len, output_len, shown=spec, watch=watch)
    except Exception:  # noqa: BLE001 - the separate runs will raise whatever is real
        return None, None
    if watch.seen["diverged"] or watch.seen["lost"]:
        return None, None
    return _nominal(m), _corner_ends(m)


def _corner_ends(m: dict) -> list[dict]:
    """The fast and the slow corner's times and rates, from figures that carry both."""
    keys = [k for k in TIMES + RATES if m.get(k) is not None]
    return [{k: corner_value(m[k], i) for k in keys} for i in (1, 2)]


def _nominal(x):
    """``x`` with every :class:`Corners` replaced by its nominal value (a plain float)."""
    if isinstance(x, dict):
        return {k: _nominal(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nominal(v) for v in x]
    return nominal(x) if isinstance(x, Corners) else x


class RequestBands:
    """The low/high band of each request an engine runs, one after another (``LLM.generate``).

    Each request runs again shape-only on the wafer whose assumed constants carry both
    corners' values (:func:`_with_corners`), in one model placed once and kept: a request
    replays the programs earlier ones ran, as the engine's own model does, and starts with
    the weights where the engine's request found them (``restored``: the previous request
    left them in the decode layout, so this one pays the restore too). Should the corners'
    programs differ, each corner runs in a kept model of its own from then on."""

    def __init__(self, config, spec, run: RunConfig):
        self.config, self.spec, self.run = config, spec, run
        self.ends = _ends(spec)
        self.shared = (None if None in self.ends else
                       WaferModel(config, None, _combined(spec, self.ends), run, mode="dry"))
        self.apart: list | None = None

    def add(self, m: dict, input_len: int, output_len: int, restored: bool = False) -> dict:
        """Add the band to the metrics ``m`` of the request just run (in place; returned)."""
        ends = None
        if self.shared is not None:
            try:
                with tracking() as seen:
                    _request(self.shared, input_len, output_len, restored)
            except Exception:  # noqa: BLE001 - the separate runs will raise whatever is real
                seen = {"diverged": 1, "lost": 0}
            if seen["diverged"] or seen["lost"]:
                self.shared = None  # its kept programs mix corners that part ways
            else:
                ends = _corner_ends(request_times(self.shared))
        if ends is None:
            if self.apart is None:
                self.apart = [None if w is None else WaferModel(self.config, None, w, self.run, mode="dry")
                              for w in self.ends]
            ends = [None if wm is None else request_times(_request(wm, input_len, output_len, restored))
                    for wm in self.apart]
        return apply_band(m, ends[0], ends[1], _residual(self.spec))


def _request(wm: WaferModel, input_len: int, output_len: int, restored: bool) -> WaferModel:
    """One more request on a kept dry model, the weights where ``restored`` says."""
    wm.reset(weights_in="decode" if restored else "prefill")
    wm.prefill(input_len)
    for _ in range(output_len - 1):
        wm.decode(None)
    return wm


def predict_cluster(config, cluster: ClusterSpec, run: RunConfig, input_len: int, output_len: int,
                    wafers: int | str = "auto", layout: str = "auto", limit: float = 2.0, gpus: bool = True,
                    band: bool = True, allow_beyond_context: bool = False, progress=None) -> dict:
    """Predict one request on ``cluster``: ``wafers`` of them (or ``auto``: the fastest count
    from the fewest that hold the model up to ``limit`` times that), in ``layout`` (``shared``,
    ``split`` or ``auto``: the faster), on the grids ``run`` fixes or tuned per count (see
    :func:`waferllm.engine.cluster.search`). The figures are the chosen option's, with
    ``cluster_search``: the fewest wafers, every option considered and its predicted time."""
    from waferllm.engine.cluster import search

    _check(input_len, output_len, config, run.layers, allow_beyond_context)
    t0 = time.perf_counter()
    res = search(config, cluster, run, input_len, output_len, wafers, layout, limit, progress=progress)
    best, chosen = res["best"], res["cluster"]
    # the search ranked its options by their times alone: the chosen one's full report (its
    # band priced in the same execution) comes from running it once more
    m = predict_run(config, chosen, res["run"], input_len, output_len, gpus=gpus, band=band,
                    allow_beyond_context=True)
    m.pop("host_wall_s")
    if chosen.wafers == 1:
        m.pop("cluster", None)
    m.setdefault("wafers", chosen.wafers)
    m["cluster_search"] = {
        "wafers": wafers, "layout": layout, "limit": limit, "fewest_wafers": res["fewest"],
        "chosen": best.to_dict(), "options": [o.to_dict() for o in res["options"]],
    }
    m["host_wall_s"] = time.perf_counter() - t0
    return m


def predict_phase(config, wafer, run: RunConfig, phase: str, input_len: int, output_len: int) -> float:
    """Predicted seconds of one phase alone (for the tuner): TTFT on ``run.prefill_grid``,
    or the mean TPOT on ``run.decode_grid`` after an ``input_len``-token prompt."""
    if phase == "prefill":
        one = run.with_grids(run.prefill_grid, None).replace(prompt_len=input_len)
        wm = WaferModel(config, None, wafer, one, mode="dry", plan=_quiet_plan(config, wafer, one))
        wm.reset()
        wm.prefill(input_len)
        return phase_seconds(wm, "prefill")
    one = run.with_grids(None, run.decode_grid).replace(prompt_len=None)
    wm = WaferModel(config, None, wafer, one, mode="dry", plan=_quiet_plan(config, wafer, one))
    wm.reset()
    wm.start_decode(input_len)
    for _ in range(max(1, output_len - 1)):
        wm.decode(None)
    return phase_seconds(wm, "decode")


def _quiet_plan(config, wafer, run: RunConfig):
    """A candidate's plan without the does-not-fit advice (a candidate that does not fit is
    simply not taken; planning the advice is most of a failing candidate's time); None on a
    cluster, which plans itself."""
    if isinstance(wafer, ClusterSpec):
        return None
    return run.plan(config, wafer if isinstance(wafer, WaferSpec) else get_wafer(wafer), suggest=False)


def phase_seconds(wm: WaferModel, phase: str) -> float:
    """``request_metrics(wm)``'s ``ttft_s`` (prefill) or ``tpot_s`` (decode), read from the
    cycles the run counted, the same sums in the same order, without the rest of the report
    (its SRAM and capacity analysis is most of a small candidate's host time)."""
    cyc, sec = wm.cycles, wm.wafer.cycles_to_seconds
    scale = wm.config.num_layers / wm.layers
    if phase == "prefill":
        return sec(cyc.phase["restore"] * scale + cyc.phase["prefill"] + cyc.layers["prefill"] * (scale - 1))
    return sec((cyc.phase["decode"] + cyc.layers["decode"] * (scale - 1)) / len(cyc.steps))
