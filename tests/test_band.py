"""The low/high band of a prediction: the assumed constants' ranges and the calibration error."""

from __future__ import annotations

import dataclasses

import pytest

from waferllm.engine.band import corner
from waferllm.engine.predict import predict
from waferllm.hardware import get_wafer
from waferllm.hardware.plmr import Provenance
from waferllm.models.testing import tiny_config

CFG = tiny_config(num_layers=2)


def _without_ranges(w):
    prov = {k: Provenance(p.source, p.status) for k, p in w.provenance.items()}
    return dataclasses.replace(w, provenance=prov)


def test_no_doubt_no_band():
    w = _without_ranges(get_wafer("wse2")).replace(calibration_error=0.0)
    m = predict(CFG, w, 8, 4, 4, 4, gpus=False)
    for key in ("ttft_s", "tpot_s", "decode_tokens_per_s"):
        assert m[f"{key}_low"] == pytest.approx(m[key]) and m[f"{key}_high"] == pytest.approx(m[key])


def test_band_is_the_corners_widened_by_the_calibration_error():
    base = get_wafer("wse2")
    prov = dict(base.provenance)
    prov["ops_exp"] = Provenance("test", "assumed", (1.0, 16.0))
    prov["op_overhead_cycles"] = Provenance("test", "assumed", (10.0, 200.0))
    w = dataclasses.replace(base, provenance=prov).replace(calibration_error=0.05)
    w = dataclasses.replace(w, provenance={**w.provenance, "ops_exp": prov["ops_exp"],
                                           "op_overhead_cycles": prov["op_overhead_cycles"]})
    m = predict(CFG, w, 8, 4, 4, 4, gpus=False)
    fast = predict(CFG, corner(w, slow=False), 8, 4, 4, 4, gpus=False, band=False)
    slow = predict(CFG, corner(w, slow=True), 8, 4, 4, 4, gpus=False, band=False)
    assert corner(w, slow=True).op_overhead_cycles == 200.0 and corner(w, slow=False).ops_exp == 1.0
    assert fast["ttft_s"] < m["ttft_s"] < slow["ttft_s"]
    assert m["ttft_s_low"] == pytest.approx(fast["ttft_s"] * 0.95)
    assert m["ttft_s_high"] == pytest.approx(slow["ttft_s"] * 1.05)
    assert m["decode_tokens_per_s_high"] == pytest.approx(fast["decode_tokens_per_s"] / 0.95)
    assert m["decode_tokens_per_s_low"] == pytest.approx(slow["decode_tokens_per_s"] / 1.05)


def test_each_request_s_band_is_its_own_on_each_corner(smollm):
    """An engine's requests one after another: the second finds the weights in the decode
    layout and pays the restore. Its band is the same two requests run on each corner
    wafer, in models of their own (the restore included), widened by the calibration error;
    the nominal time lies inside it. Both requests' bands come from one kept model."""
    from waferllm import LLM, SamplingParams
    from waferllm.engine.wafer import WaferModel

    w = get_wafer("wse2")
    llm = LLM(smollm, wafer=w, dtype="fp32", prefill_grid=28, decode_grid=28, max_model_len=32)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    got = [llm.generate_ids(ids, params).metrics for ids in ([5, 9, 2, 7, 1], [4, 4, 8])]
    assert got[0]["restore_s"] == 0 and got[1]["restore_s"] > 0
    err = w.calibration_error
    for slow, key in ((False, "_low"), (True, "_high")):
        wm = WaferModel(smollm.config, None, corner(w, slow), llm.backend.run, mode="dry")
        for m, length in zip(got, (5, 3)):
            wm.reset()
            wm.prefill(length)
            for _ in range(2):
                wm.decode(None)
            alone = wm.request_metrics()
            for name in ("ttft_s", "tpot_s"):
                want = (max if slow else min)(alone[name], m[name]) * (1 + err if slow else 1 - err)
                assert m[name + key] == pytest.approx(want, rel=1e-12), (name, key)
    assert got[1]["ttft_s_low"] < got[1]["ttft_s"] < got[1]["ttft_s_high"]
    assert llm._bands.apart is None  # the corners shared one kept model
