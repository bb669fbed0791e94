"""The grid tuner and the run configuration it tunes.

The chosen grids are the argmin of predictions run independently (full ``predict``
calls, one per candidate); a grid the run fixes is kept; a wafer too small for the
model gives a PlacementError that says so. A RunConfig refuses what cannot run.
"""

from __future__ import annotations

import pytest

from waferllm.engine.predict import predict
from waferllm.engine.run_config import RunConfig
from waferllm.engine.tuner import tune_grids
from waferllm.errors import PlacementError, RequestError
from waferllm.hardware import get_wafer
from waferllm.models.testing import tiny_config

BIG = get_wafer("wse2").replace(sram_bytes_per_pe=96 * 1024)
CANDIDATES = [3, 4, 5, 6]
IN, OUT = 9, 5


@pytest.fixture(scope="module")
def cfg():
    return tiny_config(num_layers=2)


@pytest.fixture(scope="module")
def tuned(cfg):
    run = RunConfig.for_request(IN, OUT, dtype="fp32")
    return tune_grids(cfg, BIG, run, IN, OUT, candidates=CANDIDATES)


def test_chosen_grids_are_the_fastest_of_independent_predictions(cfg, tuned):
    ttft = {g: predict(cfg, BIG, IN, OUT, g, 4, dtype="fp32", gpus=False)["ttft_s"] for g in CANDIDATES}
    tpot = {g: predict(cfg, BIG, IN, OUT, 4, g, dtype="fp32", gpus=False)["tpot_s"] for g in CANDIDATES}
    assert tuned["prefill_grid"] == min(ttft, key=ttft.get)
    assert tuned["decode_grid"] == min(tpot, key=tpot.get)
    for g in CANDIDATES:
        assert tuned["tried"]["prefill"][g] == pytest.approx(ttft[g], rel=1e-12)
        assert tuned["tried"]["decode"][g] == pytest.approx(tpot[g], rel=1e-12)
    assert tuned["run"] == RunConfig.for_request(IN, OUT, dtype="fp32", prefill_grid=tuned["prefill_grid"],
                                                 decode_grid=tuned["decode_grid"])


def test_a_fixed_grid_is_kept(cfg, tuned):
    out = tune_grids(cfg, BIG, RunConfig.for_request(IN, OUT, dtype="fp32", prefill_grid=6), IN, OUT,
                     candidates=CANDIDATES)
    assert out["prefill_grid"] == 6 and out["tried"]["prefill"] == {}
    assert out["decode_grid"] == tuned["decode_grid"]


def test_a_too_small_wafer_is_an_error_that_says_so(cfg):
    tiny = get_wafer("wse2").replace(sram_bytes_per_pe=9 * 1024)
    with pytest.raises(PlacementError, match=r"does not fit .* for prefill on any grid tried \(3\.\.6\)") as exc:
        tune_grids(cfg, tiny, RunConfig.for_request(IN, OUT, dtype="fp32"), IN, OUT, candidates=CANDIDATES)
    assert "6x6" in str(exc.value)  # and why the largest candidate does not


@pytest.mark.parametrize("bad, match", [
    (dict(dtype="bf16"), "dtype"), (dict(kv_scheme="ring"), "kv_scheme"), (dict(decode_grid=0), "decode_grid"),
    (dict(max_seq_len=True), "max_seq_len"), (dict(layers=1.5), "layers"), (dict(route_policy="x"), "route_policy"),
])
def test_run_config_refuses_what_cannot_run(bad, match):
    with pytest.raises(RequestError, match=match):
        RunConfig(**bad)


def test_run_config_layers_must_exist_in_the_model(cfg):
    assert RunConfig().layer_count(cfg) == 2
    with pytest.raises(RequestError, match=r"1\.\.2"):
        RunConfig(layers=3).layer_count(cfg)
