"""Calibration: the measurement data, the fit, the stored presets against their measurements."""

from __future__ import annotations

import dataclasses
import math

import pytest

from waferllm.engine.band import apply_band, assumed_ranges, corner
from waferllm.calibration.fit import PLANS, FitPlan, evaluate, fit, recorded_loss, target_loss
from waferllm.hardware.measurements import Measurement, load_measurements
from waferllm.calibration.targets import WSE3_LAYER, decode_layer_profile
from waferllm.errors import HardwareError
from waferllm.hardware import get_wafer
from waferllm.hardware.plmr import Provenance


def test_every_spec_measurement_is_in_the_data():
    ms = {m.id: m for m in load_measurements()}
    absolute = {i: m.value for i, m in ms.items() if m.absolute and m.system != "gpu"}
    # SPEC section 5: two WSE-2 GEMV latencies and the WSE-3 layer profile
    assert absolute == {"wse2.meshgemv.16k": 1.2e-6, "wse2.meshgemv.32k": 2.03e-6,
                        "wse3.decode_layer.cycles": 19546, "wse3.decode_layer.comm": 11982,
                        "wse3.decode_layer.outside": 19546 - 15189}
    gpu = sorted(m.value for m in ms.values() if m.system == "gpu")
    assert gpu == sorted([78.9, 260.4, 164.6, 13988, 17361, 13994, 48.7, 175.8, 7805, 12287,
                        26.1, 100.4, 84.5, 10.6, 51.2, 48.7])
    assert all(m.kind == "claim" for m in ms.values() if m.system == "wse2" and not m.id.startswith("wse2.meshgemv.1")
               and not m.id.startswith("wse2.meshgemv.3"))
    assert all(m.source for m in ms.values())


def test_measurement_scoring():
    m = Measurement(id="a", system="s", kind="absolute", quantity="q", unit="s", model="x", source="s",
                    value=2.0, tolerance=0.1)
    assert m.error(2.1) == pytest.approx(0.05)
    assert m.passes(2.19) and not m.passes(2.21)
    assert m.residual(4.0) == pytest.approx(math.log(2))
    c = Measurement(id="b", system="s", kind="claim", quantity="q", unit="x", model="x", source="s",
                    check="between", low=2.0, high=3.0)
    assert c.residual(2.5) == 0 and c.residual(1.0) == pytest.approx(math.log(0.5))
    assert c.residual(6.0) == pytest.approx(math.log(2)) and not c.passes(6.0)
    least = Measurement(id="c", system="s", kind="claim", quantity="q", unit="x", model="x", source="s",
                        check="at_least", value=0.7)
    assert least.residual(0.8) == 0 and least.residual(0.35) == pytest.approx(math.log(0.5))


def test_loader_refuses_a_bad_file(tmp_path):
    bad = tmp_path / "m.toml"
    bad.write_text('[[measurement]]\nid="x"\nsystem="wse2"\nkind="absolute"\nquantity="q"\nunit="s"\n'
                   'model="gemv_best_seconds"\nsource="s"\nvalue=1.0\n')
    with pytest.raises(HardwareError, match="needs a value and a tolerance"):
        load_measurements(bad)
    bad.write_text('[[measurement]]\nid="x"\nsystem="wse2"\nkind="guess"\n')
    with pytest.raises(HardwareError, match="missing key.*model, quantity, source, unit"):
        load_measurements(bad)
    bad.write_text('[[measurement]]\nid="x"\nsystem="wse2"\nkind="guess"\nquantity="q"\nunit="s"\nmodel="m"\n'
                   'source="s"\n')
    with pytest.raises(HardwareError, match="kind must be one of absolute, claim"):
        load_measurements(bad)


@pytest.mark.parametrize("name", ["wse2", "wse3"])
def test_presets_meet_their_measurements(name):
    """After calibration every absolute measurement is within its tolerance, and the preset's
    provenance records exactly the loss and the largest error its constants give."""
    wafer = get_wafer(name)
    rows = evaluate(wafer)
    absolute = [r for r in rows if r.measurement.absolute]
    assert absolute
    for r in absolute:
        assert r.passes, (r.measurement.id, r.value, r.measurement.value)
    assert recorded_loss(wafer) == pytest.approx(target_loss(rows), abs=6e-5)
    worst = max(abs(r.measurement.error(r.value)) for r in absolute)
    assert wafer.calibration_error == pytest.approx(worst, abs=1e-4)


def test_decode_layer_runs_ten_collectives():
    """The WSE-3 layer program has 10 allreduce collectives (SPEC 5): raising the fixed cost of
    a collective by X raises its communication by exactly 10 X."""
    base = get_wafer("wse3")
    a = decode_layer_profile(base, **WSE3_LAYER)
    b = decode_layer_profile(base.replace(collective_overhead_cycles=base.collective_overhead_cycles + 100),
                             **WSE3_LAYER)
    assert b["comm_cycles"] - a["comm_cycles"] == pytest.approx(1000)
    assert b["cycles"] - a["cycles"] == pytest.approx(1000)
    assert a["cycles"] == pytest.approx(a["comm_cycles"] + a["compute_cycles"] + a["outside_cycles"])


def test_fit_recovers_known_constants():
    """Measurements made by the model itself at known constants are fitted back."""
    truth = {"collective_overhead_cycles": 400.0, "task_switch_cycles": 90.0, "op_overhead_cycles": 60.0}
    w = get_wafer("wse3").replace(**truth)
    prof = decode_layer_profile(w, **WSE3_LAYER)
    ms = [m for m in load_measurements(system="wse3")]
    field_of = {m.id: m.args["field"] for m in ms}
    synthetic = [dataclasses.replace(m, value=prof[field_of[m.id]]) for m in ms]
    plan = FitPlan("wse3", free={"collective_overhead_cycles": 800.0, "task_switch_cycles": 200.0,
                                 "op_overhead_cycles": 120.0})
    values, loss = fit(get_wafer("wse3"), plan, iters=200, log=lambda *_: None, measurements=synthetic)
    assert loss < 1e-3
    for k, v in truth.items():
        assert values[k] == pytest.approx(v, rel=0.05)


def test_band_corners_and_residual():
    w = get_wafer("wse2")
    prov = dict(w.provenance)
    prov["ops_exp"] = Provenance("test", "assumed", (2.0, 8.0))
    prov["fp16_macs_per_cycle"] = Provenance("test", "assumed", (2.0, 8.0))
    w = dataclasses.replace(w, provenance=prov)
    assert set(assumed_ranges(w)) >= {"ops_exp", "fp16_macs_per_cycle"}
    slow, fast = corner(w, slow=True), corner(w, slow=False)
    assert (slow.ops_exp, slow.fp16_macs_per_cycle) == (8.0, 2.0)
    assert (fast.ops_exp, fast.fp16_macs_per_cycle) == (2.0, 8.0)
    m = apply_band({"tpot_s": 1.0, "decode_tokens_per_s": 1.0}, {"tpot_s": 0.8, "decode_tokens_per_s": 1.25},
                   {"tpot_s": 1.5, "decode_tokens_per_s": 1 / 1.5}, residual=0.1)
    assert m["tpot_s_low"] == pytest.approx(0.72) and m["tpot_s_high"] == pytest.approx(1.65)
    assert m["decode_tokens_per_s_low"] == pytest.approx((1 / 1.5) / 1.1)
    assert m["decode_tokens_per_s_high"] == pytest.approx(1.25 / 0.9)


def test_plans_name_only_real_constants():
    w = get_wafer("wse2")
    for plan in PLANS.values():
        for key in list(plan.free) + list(plan.derived):
            assert hasattr(w, key)
