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
