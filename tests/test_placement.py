"""Placement planning: what fits where, the plan's fields, and helpful does-not-fit errors."""

from __future__ import annotations

import re

import pytest

from waferllm.engine.placement import (PLANNING_SLACK, kv_bytes_per_slot, layer_weight_bytes, phase_fits, plan,
                                       planned_kv_capacity)
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
    with pytest.raises(PlacementError, match="does not fit wse2 for prefill on 32x32 regions") as exc:
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
    with pytest.raises(PlacementError, match="does not fit wse2 for prefill on 16x16 regions") as exc:
        plan(cfg, WSE2, 16, 32, 256, "fp16")
    msg = str(exc.value)
    assert "prefill" in msg and _layers_short(msg) > 0
    g = int(re.search(r"A (\d+)x\1 grid would fit", msg).group(1))
    assert g > 16
    p = plan(cfg, WSE2, g, 32, 256, "fp16")  # the suggestion really fits
    assert p.prefill.grid == g
    with pytest.raises(PlacementError, match=f"for prefill on {g - 1}x{g - 1} regions"):
        plan(cfg, WSE2, g - 1, 32, 256, "fp16")  # and it is the smallest one


def test_tiny_wafer_cannot_hold_a_model():
    tiny_wafer = WSE2.replace(rows=16, cols=16)
    cfg = get_model_preset("llama2-13b")
    with pytest.raises(PlacementError, match="llama2-13b does not fit") as exc:
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
    assert (len(p.decode.stages), p.decode.layers_per_region) == (1, 2)
    # one token more than the planned capacity: the layers and their cache no longer fit its one
    # region (attention's score tiles grow with the cache too), so the planner spreads them out
    longer = plan(cfg, WSE2, None, 4, p.kv_capacity_tokens + 1, "fp16")
    assert (len(longer.decode.stages), longer.decode.layers_per_region) == (2, 1)
    # the longest context any layout of 4x4 regions holds (one layer each); one token more raises
    lo, hi = p.kv_capacity_tokens + 1, 4 * p.kv_capacity_tokens
    assert phase_fits(cfg, WSE2, 4, "decode", lo) and not phase_fits(cfg, WSE2, 4, "decode", hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if phase_fits(cfg, WSE2, 4, "decode", mid) else (lo, mid)
    assert plan(cfg, WSE2, None, 4, lo, "fp16").decode.layers_per_region == 1
    with pytest.raises(PlacementError, match="tiny does not fit wse2 for decode on 4x4 regions"):
        plan(cfg, WSE2, None, 4, lo + 1, "fp16", suggest=False)
    # a model extrapolated from its first layer (the whole does not fit): that layer's cache must
    with pytest.raises(PlacementError, match="the KV cache for 2176 tokens does not fit the 28x28 decode regions"):
        plan(get_model_preset("llama3-8b"), WSE2, None, 28, 2176, "fp16", layers=1)


# tiny_config(): E=64, F=96, 4 query heads and 2 kv heads of 16 features. On a 4x4 region:
# kv features 2*16=32 -> 8 per PE column; query features 2 heads per kv head -> 16 per column
# (64 in all); FFN 96 -> 24 per column. Per PE, one layer's weights (fp16 matrices, fp32 norms):
TINY_LAYER_ON_4 = {
    # decode: fused QKV [64 (y), 4 cols x (16 q + 8 k + 8 v)] -> 16 x 32; O [64 (x), 64 (y)] -> 16 x 16;
    # fused gate/up [64, 2 x 96] -> 16 x 48; down [96, 64] -> 24 x 16; two norms [64] (y) -> 16 each
    "decode": 2 * (16 * 32 + 16 * 16 + 16 * 48 + 24 * 16) + 4 * 2 * 16,
    # prefill: q [64, 64] -> 16 x 16; k, v [64, 32] -> 16 x 8 each; o [64, 64]; gate, up [64, 96]
    # -> 16 x 24 each; down [96, 64] -> 24 x 16; two norms [1, 64] (x) -> 16 each
    "prefill": 2 * (16 * 16 + 2 * 16 * 8 + 16 * 16 + 2 * 16 * 24 + 24 * 16) + 4 * 2 * 16,
}


def test_plan_fields():
    cfg = tiny_config()
    p = plan(cfg, WSE2, 4, 4, 64, "fp16", prompt_len=32)
    assert TINY_LAYER_ON_4 == {"decode": 3968, "prefill": 3968}
    assert kv_bytes_per_slot(cfg, 4, "fp16") == 2 * 8 * 2  # one token's K and V blocks of 8 features
    for ph in (p.prefill, p.decode):
        # the planner budgets the two norms at fp16; the runtime holds them in fp32 (slack covers it)
        assert layer_weight_bytes(cfg, 4, ph.phase) == TINY_LAYER_ON_4[ph.phase] - 2 * 16 * 2
        assert ph.grid == 4 and len(ph.stages) == 1 and ph.layer_share == [2] and ph.whole_model_fits
        assert ph.layers_per_region == 2 and ph.stages[0].layers == range(2)
        assert ph.stages[0].vocab == range(cfg.vocab_size)  # one region: the whole vocabulary
        b = ph.bytes_per_pe
        assert b["weights"] == 2 * (TINY_LAYER_ON_4[ph.phase] - 2 * 16 * 2)
        # the LM head's [64, 272] slice (and the embedding table's: not tied) -> 16 x 68 fp16,
        # with two fp32 vectors of 68 (the planner's allowance for the logits)
        assert b["vocab_tables"] == 2 * (16 * 68 * 2 + 2 * 68 * 4)
        # K/V of every planned token: 64 tokens (decode) / a 32-token prompt (prefill) over 4 rows
        assert b["kv_cache"] == 2 * 32 * (16 if ph.phase == "decode" else 8)
        assert b["reserved"] == WSE2.reserved_bytes_per_pe and b["usable"] == WSE2.usable_sram_bytes_per_pe
        assert sum(b[k] for k in ("weights", "kv_cache", "activations", "vocab_tables")) <= b["usable"] - PLANNING_SLACK
    # the runtime allocates exactly the hand-counted bytes for a layer
    wm = WaferModel(cfg, None, WSE2, 4, 4, max_seq_len=64, prompt_len=32, mode="dry")
    for st, phase in ((wm.prefill_stages[0], "prefill"), (wm.decode_stages[0], "decode")):
        held = st.mesh.sram.by_name()
        assert sum(v for k, v in held.items() if k.startswith("L0.")) == TINY_LAYER_ON_4[phase]
    # decode activations, per PE: the token's vectors (6 fp32 hidden slices of 16, 3 of the 16 q +
    # 2 x 8 k/v features) = 768 B, then the larger of attention's score tiles (2 fp32 tiles of the
    # 4 query heads per cache slot: 32 B a slot, 16 slots = 512 B) and the FFN's (4 fp32 vectors
    # of 2 x 24) = 768 B, and 1024 B of margin
    b = p.decode.bytes_per_pe
    assert b["activations"] == 768 + max(32 * 16, 768) + 1024
    # planned KV capacity: the slots per row whose K/V (2 layers x 32 B) and score tiles (32 B) fit
    # beside weights, tables and the rest of the activations (the score tiles outgrow the FFN's)
    slots = (b["usable"] - b["weights"] - b["vocab_tables"] - 768 - 1024) // (2 * 32 + 32)
    assert 32 * slots > 768
    assert (p.kv_capacity_tokens, p.kv_capacity_tokens_concat) == (4 * slots, slots)
    assert planned_kv_capacity(cfg, WSE2, p.decode) == (4 * slots, slots)
    d = p.to_dict()
    assert d["decode"]["layer_share"] == [2] and d["prefill"]["layers_per_region"] == 2
    assert d["planned_kv_capacity_tokens"] == 4 * slots


def test_split_plans_are_the_whole_models_share():
    """An extrapolated plan budgets each region for the layers it holds in the whole model."""
    cfg = get_model_preset("llama3-8b")
    full = plan(cfg, WSE2, 600, 360, 2176, prompt_len=2048)
    one = plan(cfg, WSE2, 600, 360, 2176, prompt_len=2048, layers=1)
    for f, o in ((full.prefill, one.prefill), (full.decode, one.decode)):
        assert [len(s.layers) for s in f.stages] == f.layer_share == o.layer_share
        assert [len(s.layers) for s in o.stages] == [1] + [0] * (len(o.stages) - 1)
        assert o.bytes_per_pe == f.bytes_per_pe and o.region_bytes == f.region_bytes
        assert o.bytes_per_pe["weights"] > 0 and o.bytes_per_pe["kv_cache"] > 0
    assert (one.kv_capacity_tokens, one.kv_capacity_tokens_concat) == (full.kv_capacity_tokens,
                                                                        full.kv_capacity_tokens_concat)


def test_single_phase_and_extrapolated_plans():
    cfg = get_model_preset("llama3-8b")
    p = plan(cfg, WSE2, None, 360, 256, "fp16", layers=1)
    assert p.prefill is None and p.decode is not None
    assert [i for s in p.decode.stages for i in s.layers] == [0]
    assert p.decode.stages[0].layers == range(0, 1)
    full = plan(cfg, WSE2, None, 360, 256, "fp16")  # all 32 layers: the 360s and the squares beside them
    assert sum(len(s.layers) for s in full.decode.stages) == 32
    with pytest.raises(PlacementError, match="llama3-70b does not fit wse2 for decode"):
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
