"""Placement planning: what fits where, the plan's fields, and helpful does-not-fit errors."""

from __future__ import annotations

import re

import pytest

from waferllm.engine.placement import PLANNING_SLACK, kv_bytes_per_slot, plan
from waferllm.engine.wafer import WaferModel
from waferllm.errors import PlacementError
from waferllm.hardware import get_wafer
from waferllm.models.presets import get_model_preset
from waferllm.models.testing import tiny_config

WSE2 = get_wafer("wse2")


def _layers_short(msg: str) -> int:
    m = re.search(r"hold (\d+) of its (\d+) layers, (\d+) short", msg)
    assert m, msg
    held, total, short = (int(g) for g in m.groups())
    assert held + short == total
    return short


def test_llama3_8b_does_not_fit_default_grids_and_says_by_how_much():
    cfg = get_model_preset("llama3-8b")
    with pytest.raises(PlacementError) as exc:
        WaferModel(cfg, None, "wse2", 32, 32, max_seq_len=4096, mode="dry")
    msg = str(exc.value)
    assert "llama3-8b" in msg and "wse2" in msg
    assert _layers_short(msg) == 32  # a 32x32 region cannot hold one layer of an 8B model
    # the per-layer need and the budget it is compared against
    budget = int(re.search(r"of the ([\d,]+) B it may plan for", msg).group(1).replace(",", ""))
    assert budget == WSE2.usable_sram_bytes_per_pe - PLANNING_SLACK
    # what to do about it
    assert "--extrapolate-from-layers" in msg and ("would fit" in msg or "No grid" in msg)


def test_llama3_8b_fits_wse2_with_the_squares_around_the_main_regions():
    """600x600 prefill and 360x360 decode regions leave strips; smaller squares there
    take the layers the main regions cannot."""
    p = plan(get_model_preset("llama3-8b"), WSE2, 600, 360, 2048 + 128, "fp16", prompt_len=2048)
    assert sum(len(s.layers) for s in p.prefill.stages) == 32
    assert {s.region.rows for s in p.prefill.stages} > {600}
    assert sum(len(s.layers) for s in p.decode.stages) == 32
    assert p.kv_capacity_tokens >= 2048 + 128


def test_does_not_fit_error_suggests_a_grid_that_fits():
    cfg = get_model_preset("smollm2-135m")
    with pytest.raises(PlacementError) as exc:
        plan(cfg, WSE2, 16, 32, 256, "fp16")
    msg = str(exc.value)
    assert "prefill" in msg and _layers_short(msg) > 0
    g = int(re.search(r"A (\d+)x\1 grid would fit", msg).group(1))
    assert g > 16
    p = plan(cfg, WSE2, g, 32, 256, "fp16")  # the suggestion really fits
    assert p.prefill.grid == g
    with pytest.raises(PlacementError):
        plan(cfg, WSE2, g - 1, 32, 256, "fp16")  # and it is the smallest one


def test_tiny_wafer_cannot_hold_a_model():
    tiny_wafer = WSE2.replace(rows=16, cols=16)
    cfg = get_model_preset("llama2-13b")
    with pytest.raises(PlacementError) as exc:
        plan(cfg, tiny_wafer, 8, 8, 128, "fp16")
    assert _layers_short(str(exc.value)) > 0
    assert "No grid of this wafer fits it" in str(exc.value)


@pytest.mark.parametrize("grid", [0, -1, 751, 2000])
def test_grid_larger_than_the_wafer_raises(grid):
    with pytest.raises(PlacementError, match="does not fit the 750x994 mesh"):
        plan(tiny_config(), WSE2, grid, 8, 32)
    with pytest.raises(PlacementError, match="decode grid"):
        plan(tiny_config(), WSE2, 8, grid, 32)


def test_kv_cache_longer_than_capacity_raises():
    cfg = tiny_config()
    p = plan(cfg, WSE2, None, 4, 32, "fp16")  # decode only: prefill plans the whole prompt
    with pytest.raises(PlacementError, match="(?i)kv.cache"):
        plan(cfg, WSE2, None, 4, p.kv_capacity_tokens + 1, "fp16")


def test_plan_fields():
    cfg = get_model_preset("smollm2-135m")
    p = plan(cfg, WSE2, 32, 28, 512, "fp16")
    for ph, grid in ((p.prefill, 32), (p.decode, 28)):
        assert ph.grid == grid
        assert {"weights", "kv_cache", "activations", "vocab_tables"} <= set(ph.bytes_per_pe)
        assert all(ph.bytes_per_pe[k] > 0 for k in ("weights", "kv_cache", "activations", "vocab_tables"))
        need = sum(ph.bytes_per_pe[k] for k in ("weights", "kv_cache", "activations", "vocab_tables"))
        assert need <= WSE2.usable_sram_bytes_per_pe - PLANNING_SLACK
        assert ph.layers_per_region * len(ph.stages) >= cfg.num_layers
        assert len(ph.stages) <= ph.regions_available
        # stages cover the layers and the vocabulary exactly once, in order
        layers = [i for s in ph.stages for i in s.layers]
        vocab = [s.vocab for s in ph.stages]
        assert layers == list(range(cfg.num_layers))
        assert vocab[0].start == 0 and vocab[-1].stop == cfg.vocab_size
        assert all(a.stop == b.start for a, b in zip(vocab, vocab[1:]))
        assert all(s.region.rows == s.region.cols == grid for s in ph.stages)
    # KV capacity: the shift scheme fills every row of the decode grid, concat only one
    assert p.kv_capacity_tokens == 28 * p.kv_capacity_tokens_concat
    assert p.kv_capacity_tokens >= 512
    per_slot = kv_bytes_per_slot(cfg, 28, "fp16") * p.decode.layers_per_region
    free = WSE2.usable_sram_bytes_per_pe - sum(p.decode.bytes_per_pe[k] for k in ("weights", "activations",
                                                                                  "vocab_tables"))
    assert p.kv_capacity_tokens_concat == free // per_slot
    d = p.to_dict()
    assert d["prefill"]["layers_per_region"] == p.prefill.layers_per_region
    assert d["kv_capacity_tokens"] == p.kv_capacity_tokens


def test_single_phase_and_extrapolated_plans():
    cfg = get_model_preset("llama3-8b")
    p = plan(cfg, WSE2, None, 360, 256, "fp16", layers=1)
    assert p.prefill is None and p.decode is not None
    assert [i for s in p.decode.stages for i in s.layers] == [0]
    assert p.decode.stages[0].layers == range(0, 1)
    full = plan(cfg, WSE2, None, 360, 256, "fp16")  # all 32 layers: the 360s and the squares beside them
    assert sum(len(s.layers) for s in full.decode.stages) == 32
    with pytest.raises(PlacementError):
        plan(get_model_preset("llama3-70b"), WSE2, None, 360, 256, "fp16")  # 140 GB does not fit 36 GB


@pytest.mark.parametrize("prefill_grid,decode_grid,max_seq_len", [
    (24, 24, 64),    # the plan used to leave out the LM head's in-flight MeshGEMM tiles
    (40, 40, 64),
    (28, 24, 128),   # the transition's cost blob used to overflow a smaller decode grid
    (32, 24, 512),
])
def test_a_plan_that_fits_runs(prefill_grid, decode_grid, max_seq_len):
    """What the planner accepts, the runtime's own SRAM accounting accepts too (dry run)."""
    cfg = get_model_preset("smollm2-135m")
    wm = WaferModel(cfg, None, WSE2, prefill_grid, decode_grid, max_seq_len=max_seq_len, mode="dry", dtype="fp16")
    wm.reset()
    wm.prefill(max_seq_len // 2)
    for _ in range(2):
        wm.decode(None)
    peak = wm.request_metrics()["sram_peak_bytes_per_pe"]
    assert 0 < peak["prefill"] <= peak["usable"] and 0 < peak["decode"] <= peak["usable"]
