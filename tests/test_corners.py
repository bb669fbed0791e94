"""A band's corners priced in the request's own execution equal separate runs on each corner."""

from __future__ import annotations

import math

import numpy as np
import pytest

from waferllm.engine import predict as P
from waferllm.engine.band import RATES, TIMES
from waferllm.engine.run_config import RunConfig
from waferllm.hardware import get_wafer
from waferllm.hardware.cluster import cluster_for
from waferllm.mesh.corners import Corners, cmax, corner, nominal, pick, tracking
from waferllm.mesh.ledger import Ledger
from waferllm.models.presets import get_model_preset

WSE2 = get_wafer("wse2")


def test_arithmetic_goes_corner_by_corner_and_collapses_when_equal():
    a = Corners((4.0, 2.0, 8.0))
    b = 3 * a + 1
    assert isinstance(b, Corners) and b.v == (13.0, 7.0, 25.0) and float.__float__(b) == 13.0
    assert math.ceil(a / 3).v == (2, 1, 3)
    assert (a - a) == 0.0 and not isinstance(a - a, Corners)  # equal in every corner: a plain number
    assert type(math.ceil(a * 0)) is int
    assert (1 / a).v == (0.25, 0.5, 0.125)
    assert cmax(a, 3.0).v == (4.0, 3.0, 8.0)
    assert pick((True, False, True), a, 0.0).v == (4.0, 0.0, 8.0)
    assert corner(a, 2) == 8.0 and corner(5.0, 2) == 5.0 and nominal(a) == 4.0


def test_decisions_and_plain_numbers_that_differ_between_corners_are_caught():
    a = Corners((4.0, 2.0, 8.0))
    with tracking() as seen:
        assert a > 1.0  # every corner agrees
        assert seen == {"diverged": 0, "lost": 0}
        assert a > 3.0  # the nominal outcome, but not every corner's
        assert seen["diverged"] == 1
        float(a), int(a)
        assert seen["lost"] == 2
    with pytest.raises(TypeError, match="ufunc"):
        np.sqrt(a)  # numpy refuses rather than dropping the corners


def test_ledger_keeps_each_corners_slowest_branch():
    led = Ledger(WSE2, keep_events=False)
    with led.parallel() as par:
        with par.branch():
            led.charge("a", "compute", Corners((10.0, 5.0, 30.0)))
        with par.branch():
            led.charge("b", "comm", 20.0)
    assert led.cycles.v == (20.0, 20.0, 30.0)
    assert led.exposed_comm_cycles.v == (20.0, 20.0, 0.0)  # corner 2's slowest branch exposes none
    with led.overlap():
        led.charge("c", "compute", Corners((1.0, 1.0, 50.0)))
        led.charge("d", "comm", 10.0)
    assert led.cycles.v == (30.0, 30.0, 80.0)


def _separate(config, spec, run, li, lo):
    return P._corner_runs(config, spec, run, li, lo)


@pytest.mark.parametrize("name, li, lo, pg, dg, weights, layers", [
    ("smollm2-135m", 512, 64, 120, 90, "fp16", None),
    ("smollm2-135m", 256, 32, 120, 120, "int8", None),  # the dequantisation's ops are in the band too
    ("llama3-8b", 1024, 16, 600, 360, "fp16", 1),
])
def test_corners_in_one_execution_equal_separate_runs(name, li, lo, pg, dg, weights, layers):
    cfg = get_model_preset(name)
    run = RunConfig.for_request(li, lo, prefill_grid=pg, decode_grid=dg, weights=weights, layers=layers)
    m, ends = P._with_corners(cfg, WSE2, run, li, lo)
    assert ends is not None  # the corners' programs are the same: no decision differs
    apart = _separate(cfg, WSE2, run, li, lo)
    for one, other in zip(ends, apart):
        assert one == {k: other[k] for k in TIMES + RATES if other.get(k) is not None}
    plain = P._run(cfg, WSE2, run, li, lo)
    assert m == plain  # the nominal figures are the ordinary run's, exactly


def test_a_clusters_corners_in_one_execution_equal_separate_runs():
    cfg = get_model_preset("llama3-8b")
    cluster = cluster_for(WSE2).with_wafers(2)
    run = RunConfig.for_request(512, 8, prefill_grid=300, decode_grid=300)
    m, ends = P._with_corners(cfg, cluster, run, 512, 8)
    assert ends is not None
    for one, other in zip(ends, _separate(cfg, cluster, run, 512, 8)):
        assert one == {k: other[k] for k in TIMES + RATES if other.get(k) is not None}
    assert m == P._run(cfg, cluster, run, 512, 8)


def test_a_corner_whose_program_differs_falls_back_to_separate_runs(monkeypatch):
    """A decision that depends on a band constant: the corners run apart, and agree with
    runs of their own."""
    from waferllm.kernels import layer_ops

    real = layer_ops.compute.elementwise

    def deciding(fn, *tensors, ops_per_elem=1.0, **kw):
        if ops_per_elem > 4.5:  # differs between the corners of ops_exp (2 .. 8)
            kw["name"] = kw.get("name", "elementwise") + ".slow_path"
        return real(fn, *tensors, ops_per_elem=ops_per_elem, **kw)

    monkeypatch.setattr(layer_ops.compute, "elementwise", deciding)
    cfg = get_model_preset("smollm2-135m")
    run = RunConfig.for_request(256, 8, prefill_grid=120, decode_grid=120)
    assert P._with_corners(cfg, WSE2, run, 256, 8) == (None, None)
    m = P.predict_run(cfg, WSE2, run, 256, 8, gpus=False)
    fast, slow = _separate(cfg, WSE2, run, 256, 8)
    assert m["ttft_s_low"] == min(fast["ttft_s"], slow["ttft_s"], m["ttft_s"]) * (1 - WSE2.calibration_error)
    assert m["ttft_s_high"] == max(fast["ttft_s"], slow["ttft_s"], m["ttft_s"]) * (1 + WSE2.calibration_error)
    # an engine's kept band model parts ways too: its requests' corners run in kept models of their own
    bands = P.RequestBands(cfg, WSE2, run)
    for _ in range(2):  # the second request reuses them (its programs replayed: sums to the last bits)
        again = bands.add(P.predict_run(cfg, WSE2, run, 256, 8, gpus=False, band=False), 256, 8)
        assert bands.shared is None and again["ttft_s_low"] == pytest.approx(m["ttft_s_low"], rel=1e-12)
    restored = bands.add(dict(m), 256, 8, restored=True)
    assert restored["ttft_s_high"] > m["ttft_s_high"]  # the restore is in its slow corner


@pytest.mark.parametrize("layers", [None, 1])
def test_a_phase_alone_times_as_the_full_report_does(layers):
    """The tuner's reading of a phase's time equals the request report's."""
    from waferllm.engine.wafer import WaferModel

    cfg = get_model_preset("smollm2-135m")
    run = RunConfig.for_request(256, 8, prefill_grid=120, decode_grid=90, layers=layers)
    wm = WaferModel(cfg, None, WSE2, run, mode="dry")
    wm.reset()
    wm.prefill(256)
    for _ in range(7):
        wm.decode(None)
    m = wm.request_metrics()
    assert P.phase_seconds(wm, "prefill") == m["ttft_s"]
    assert P.phase_seconds(wm, "decode") == m["tpot_s"]
