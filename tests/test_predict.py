"""Dry-run prediction: exact replay, extrapolation from K layers, sane trends, JSON output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from waferllm.engine.predict import predict
from waferllm.engine.run_config import RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.errors import RequestError
from waferllm.baselines import gpu_baselines
from waferllm.hardware import get_wafer
from waferllm.models.presets import get_model_preset
from waferllm.models.testing import random_weights, tiny_config

WSE2 = get_wafer("wse2")
BIG = WSE2.replace(sram_bytes_per_pe=96 * 1024)
L8B_GRIDS = (420, 360)  # llama3-8b, one layer: fits these prefill / decode grids on wse2


def _run(cfg, weights, mode, prefill_grid, decode_grid, prompt_len, steps, wafer=WSE2, kv_scheme="shift",
         dtype="fp32"):
    run = RunConfig(prefill_grid, decode_grid, max_seq_len=prompt_len + steps + 1, prompt_len=prompt_len, dtype=dtype,
                    kv_scheme=kv_scheme)
    wm = WaferModel(cfg, weights if mode == "numeric" else None, wafer, run, mode=mode)
    wm.reset()
    # a dry run has no token ids: it assumes a typical prompt, whose embedding rows the
    # numeric run must fetch from the same table columns to cost the same
    wm.prefill(wm.typical_prompt(prompt_len) if mode == "numeric" else prompt_len)
    for i in range(steps):
        # a dry run's token is the first of the vocabulary (its embedding column sets the broadcast's root)
        wm.decode(0 if mode == "numeric" else None)
    return wm


@pytest.mark.parametrize("case", [
    dict(name="gqa", cfg={}, grids=(4, 5), prompt_len=9, steps=7, kv_scheme="shift"),
    dict(name="concat", cfg={}, grids=(5, 4), prompt_len=6, steps=6, kv_scheme="concat"),
    dict(name="pipeline", cfg=dict(num_layers=4), grids=(4, 4), prompt_len=5, steps=9, kv_scheme="shift"),
    dict(name="tied_fp16", cfg=dict(tie_word_embeddings=True, num_kv_heads=1), grids=(3, 3), prompt_len=4, steps=5,
         kv_scheme="shift", dtype="fp16", wafer=BIG),
], ids=lambda c: c["name"])
def test_dry_run_replay_equals_numeric_execution(case):
    """Dry runs replay identical layers and steps; numeric runs execute them all: same ledger."""
    cfg = tiny_config(**case["cfg"])
    w = random_weights(cfg, seed=1)
    kw = dict(kv_scheme=case["kv_scheme"], dtype=case.get("dtype", "fp32"), wafer=case.get("wafer", WSE2))
    num = _run(cfg, w, "numeric", *case["grids"], case["prompt_len"], case["steps"], **kw)
    dry = _run(cfg, None, "dry", *case["grids"], case["prompt_len"], case["steps"], **kw)
    mn, md = num.request_metrics(), dry.request_metrics()
    for key in ("ttft_s", "tpot_s", "transition_s", "e2e_tokens_per_s", "flops"):
        assert md[key] == pytest.approx(mn[key], rel=1e-12, abs=0), key
    # known inexactness: a replayed decode step is keyed on (occupancy, any rows shifting),
    # not on how many rows shift, so the shift's bytes (not its cycles) may differ slightly,
    # and with them the fabric's share of the energy
    assert md["bytes_moved"] == pytest.approx(mn["bytes_moved"], rel=1e-2)
    assert md["energy_j"] == pytest.approx(mn["energy_j"], rel=1e-6)
    for part, joules in mn["energy_breakdown_j"].items():
        exact = part in ("compute_fp16", "compute_fp32", "static")  # traffic terms carry the shift's inexactness
        assert md["energy_breakdown_j"][part] == pytest.approx(joules, rel=1e-12 if exact else 1e-2), part
    assert dry.cycles.steps == pytest.approx(num.cycles.steps, rel=1e-12)
    assert md["kv_shift_moves"] == mn["kv_shift_moves"]
    assert md["sram_peak_bytes_per_pe"] == mn["sram_peak_bytes_per_pe"]
    assert mn["ttft_s"] > 0 and mn["tpot_s"] > 0


@pytest.fixture(scope="module")
def l8b():
    return get_model_preset("llama3-8b")


@pytest.fixture(scope="module")
def l8b_pred(l8b):
    return predict(l8b, "wse2", 128, 16, *L8B_GRIDS, layers=1)


def test_predict_llama3_8b_extrapolated(l8b_pred, l8b):
    m = l8b_pred
    assert m["extrapolated_from_layers"] == 1
    assert "extrapolated" in m["note"] and "1 of 32" in m["note"]
    assert m["model"] == "llama3-8b" and m["input_len"] == 128 and m["output_len"] == 16
    assert m["prefill_grid"] == L8B_GRIDS[0] and m["decode_grid"] == L8B_GRIDS[1]
    assert m["prefill_tokens_per_s"] == pytest.approx(128 / m["ttft_s"], rel=1e-12)
    assert m["decode_tokens_per_s"] == pytest.approx(1 / m["tpot_s"], rel=1e-12)
    total = m["ttft_s"] + m["transition_s"] + 15 * m["tpot_s"]
    assert m["e2e_tokens_per_s"] == pytest.approx(16 / total, rel=1e-12)
    assert m["gpu_baselines"] == gpu_baselines(l8b, 128, 16)
    # the whole result is plain JSON
    back = json.loads(json.dumps(m))
    assert back["ttft_s"] == m["ttft_s"]


def test_extrapolated_equals_placed_when_the_model_fits_one_region():
    """4 layers in one region per phase: the prediction from 1 placed layer is the whole
    model's own (same program, the layer part 4 times), in time and in every counter."""
    cfg = tiny_config(num_layers=4)
    full = predict(cfg, BIG, 9, 6, 5, 4, dtype="fp32", gpus=False)
    one = predict(cfg, BIG, 9, 6, 5, 4, dtype="fp32", layers=1, gpus=False)
    assert full["placement"]["prefill"]["regions"] == full["placement"]["decode"]["regions"] == 1
    for key in ("ttft_s", "tpot_s", "flops", "bytes_moved", "routing_stages", "kv_shift_moves"):
        assert one[key] == pytest.approx(full[key], rel=1e-9), key


def test_extrapolated_ttft_is_the_non_layer_time_plus_32_layer_times(l8b, l8b_pred):
    """Prefill-only runs of 1 and 2 placed layers give a layer's time (their difference) and
    the rest (embedding, LM head); the prediction from 1 layer is the rest plus 32 layers."""
    raw = {}
    for k in (1, 2):
        wm = WaferModel(l8b, None, "wse2", RunConfig(L8B_GRIDS[0], None, max_seq_len=144, prompt_len=128, layers=k),
                        mode="dry")
        wm.prefill(128)
        raw[k] = wm.ledger.cycles  # no decode grid: no transition, only the prefill
    layer, rest = raw[2] - raw[1], 2 * raw[1] - raw[2]
    assert layer > 0 and rest > 0
    assert l8b_pred["ttft_s"] == pytest.approx(WSE2.cycles_to_seconds(rest + 32 * layer), rel=1e-9)


def test_longer_input_larger_ttft_more_output_larger_total(l8b):
    short = predict(l8b, "wse2", 64, 8, *L8B_GRIDS, layers=1, gpus=False)
    long_in = predict(l8b, "wse2", 256, 8, *L8B_GRIDS, layers=1, gpus=False)
    long_out = predict(l8b, "wse2", 64, 32, *L8B_GRIDS, layers=1, gpus=False)
    assert long_in["ttft_s"] > short["ttft_s"]

    def total(m):
        return m["ttft_s"] + m["transition_s"] + (m["output_len"] - 1) * m["tpot_s"]

    assert total(long_out) > total(short)
    assert long_out["ttft_s"] == pytest.approx(short["ttft_s"], rel=0.05)


def test_concat_capacity_is_about_decode_grid_times_smaller(l8b):
    shift = predict(l8b, "wse2", 32, 8, *L8B_GRIDS, layers=1, gpus=False)
    concat = predict(l8b, "wse2", 32, 8, *L8B_GRIDS, layers=1, gpus=False, kv_scheme="concat")
    # each run reports both (its plan budgets its own scheme: concat's regions hold the bottom
    # row's 1 + 8 slots, so their layer shares may differ from shift's)
    for m in (shift, concat):
        ratio = m["kv_capacity_tokens"] / m["kv_capacity_tokens_concat"]
        # the shift cache fills every row of the tightest decode region; concat grows one row of it
        assert any(ratio == pytest.approx(side, rel=0.02) for side in m["placement"]["decode"]["region_sides"])
    ratio = shift["kv_capacity_tokens"] / shift["kv_capacity_tokens_concat"]
    # the paper: ~360-385x on its decode grids (all 360 or larger here but the strip's 274)
    assert 250 <= ratio <= 400
    assert concat["kv_shift_moves"] == 0 < shift["kv_shift_moves"]


def test_concat_scheme_runs_where_its_capacity_allows(l8b):
    """Decode attention scans only a concat row's occupied prefix, so the run fits as long
    as the concat cache does (it once sized its score tiles by the whole capacity)."""
    m = predict(l8b, "wse2", 128, 8, *L8B_GRIDS, layers=1, gpus=False, kv_scheme="concat")
    # the prompt is spread over the rows at the transition (at most one token per row of a
    # 274-row region), then the 7 decode steps append to the bottom row only
    bottom_row_needs = -(-128 // min(m["placement"]["decode"]["region_sides"])) + 7
    assert bottom_row_needs <= m["kv_capacity_tokens_concat"]
    assert m["kv_shift_moves"] == 0


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "8"])
def test_predict_rejects_bad_lengths(l8b, bad):
    with pytest.raises(RequestError):
        predict(l8b, "wse2", bad, 4, *L8B_GRIDS, layers=1)
    with pytest.raises(RequestError):
        predict(l8b, "wse2", 8, bad, *L8B_GRIDS, layers=1)


def test_predict_matches_a_numeric_run_of_a_small_model():
    """predict() is the same code path as a numeric request with the same shapes."""
    cfg = tiny_config(num_layers=3)
    p = predict(cfg, BIG, 7, 5, 4, 5, dtype="fp32", gpus=False)
    num = _run(cfg, random_weights(cfg), "numeric", 4, 5, 7, 4, wafer=BIG)
    mn = num.request_metrics()
    for key in ("ttft_s", "tpot_s"):
        assert p[key] == pytest.approx(mn[key], rel=1e-12), key
    # replayed decode steps may shift other rows' bytes (see the replay test above)
    assert p["energy_j"] == pytest.approx(mn["energy_j"], rel=1e-6)


def test_dry_replay_is_exact_when_decode_regions_differ_in_size():
    """Decode regions of different grids (360s and a 274 beside them) change occupancy at
    different tokens: replaying a step must still charge what executing it charges."""
    from waferllm.engine.wafer import WaferModel

    cfg = get_model_preset("llama3-8b")
    steps = []
    for memo in (True, False):
        wm = WaferModel(cfg, None, "wse2", None, 360, max_seq_len=2100, mode="dry")
        assert len({s.mesh.rows for s in wm.decode_stages}) > 1
        wm.reset()
        wm.start_decode(2070)
        for _ in range(12):
            if not memo:
                wm._memo.clear()
            wm.decode(None)
        steps.append(wm.cycles.steps)
    assert steps[0] == pytest.approx(steps[1], rel=1e-9)
