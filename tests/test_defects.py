"""Defective PEs: maps from a list or a rate, the two recovery schemes, and what they cost.

The hardware's remap (``spare``) and the software's (``reroute``) are recomputed here PE
by PE with plain loops; the extra hops the comm primitives pay are checked against
those; a defective wafer gives the perfect wafer's tokens and logits, and is never
predicted faster.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from waferllm.engine.placement import region_slots
from waferllm.engine.predict import predict_run
from waferllm.engine.run_config import RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.errors import HardwareError, MeshError
from waferllm.hardware import get_wafer
from waferllm.hardware.defects import (DETOUR_HOPS, healthy_positions, random_defects, region_links, spare_remap,
                                       with_defect_rate)
from waferllm.hardware.plmr import from_mapping
from waferllm.mesh import comm
from waferllm.mesh.region import Region
from waferllm.mesh.runtime import Mesh
from waferllm.models.presets import get_model_preset
from waferllm.models.testing import random_weights, tiny_config

WSE2 = get_wafer("wse2")
SMALL = WSE2.replace(rows=12, cols=14, spare_rows=2, spare_cols=3)


# ------------------------------------------------------------------ maps


def test_a_rate_and_a_seed_give_one_map():
    a, b = random_defects(200, 300, 0.01, 7), random_defects(200, 300, 0.01, 7)
    assert a == b and a != random_defects(200, 300, 0.01, 8)
    assert 0.7 * 600 < len(a) < 1.3 * 600
    assert all(0 <= r < 200 and 0 <= c < 300 for r, c in a)
    assert random_defects(200, 300, 0.0, 1) == frozenset()
    for bad in (-0.1, 0.5, float("nan"), "x", True):
        with pytest.raises(HardwareError, match="defect_rate"):
            random_defects(10, 10, bad, 1)
    with pytest.raises(HardwareError, match="seed"):
        random_defects(10, 10, 0.1, -1)


def test_spare_maps_lie_on_the_physical_fabric():
    w = with_defect_rate(WSE2, 0.002, 3, "spare")
    assert w.fabric_shape == (750 + 16, 994 + 48)
    assert max(r for r, _ in w.defective_pes) >= 750 or max(c for _, c in w.defective_pes) >= 994
    with pytest.raises(HardwareError, match="outside the 766x1042 physical fabric"):
        w.replace(defective_pes=[[766, 0]])


def test_wafer_file_defect_keys(tmp_path):
    w = from_mapping({"base": "wse2", "rows": 40, "cols": 50, "defect_rate": 0.01, "defect_seed": 2,
                      "defect_recovery": "reroute"})
    assert w.defect_recovery == "reroute" and w.defective_pes == with_defect_rate(
        WSE2.replace(rows=40, cols=50), 0.01, 2, "reroute").defective_pes
    with pytest.raises(HardwareError, match="not both"):
        from_mapping({"base": "wse2", "defect_rate": 0.01, "defective_pes": [[1, 1]]})
    with pytest.raises(HardwareError, match="defect_recovery must be one of avoid, spare, reroute"):
        from_mapping({"base": "wse2", "defect_recovery": "pray"})
    # a full file without the newer keys still loads (with their documented defaults)
    full = {k: v for k, v in WSE2.to_dict(with_provenance=False).items() if k not in (
        "ops_dequant_int8", "ops_dequant_int4", "spare_rows", "spare_cols")}
    plain = from_mapping(full)
    assert plain.spare_cols == 0 and plain.ops_dequant_int8 == 2.0


def test_spares_that_run_out_are_refused():
    with pytest.raises(HardwareError, match=r"fewer than the 12 rows the hardware must present"):
        with_defect_rate(SMALL.replace(spare_cols=0, spare_rows=0), 0.05, 1, "spare")


# ------------------------------------------------------------------ the spare remap, PE by PE


def _brute_spare(w):
    """Logical -> physical by loops: rows with more defects than spare PEs are retired; each
    kept row's logical PEs are its healthy PEs in order."""
    fr, fc = w.fabric_shape
    dead = w.defective_pes
    kept = [r for r in range(fr) if sum((r, c) in dead for c in range(fc)) <= w.spare_cols][: w.rows]
    cols = [[c for c in range(fc) if (r, c) not in dead][: w.cols] for r in kept]
    return kept, cols


def _brute_extra(row_of, col_of, axis, hops, detour=0):
    """Most extra hops of a path of ``hops`` logical hops along ``axis``, by loops."""
    rows, cols = len(col_of), len(col_of[0])
    best = 0
    if axis == "x":
        for r in range(rows):
            for c in range(cols - hops):
                skipped = [col_of[r][c + i + 1] - col_of[r][c + i] - 1 for i in range(hops)]
                best = max(best, sum(s + (detour if s else 0) for s in skipped))
    else:
        for c in range(cols):
            for r in range(rows - hops):
                retired = sum(row_of[r + i + 1] - row_of[r + i] - 1 for i in range(hops))
                spread = max(col_of[r + i][c] for i in range(hops + 1)) - min(col_of[r + i][c] for i in range(hops + 1))
                best = max(best, retired + spread)
    return best


def test_spare_remap_and_its_extra_hops_by_hand():
    w = SMALL.replace(defective_pes=[[0, 2], [2, 1], [2, 4], [5, 0], [5, 1], [5, 2], [5, 3], [9, 13], [13, 6]],
                      defect_recovery="spare")
    row_of, col_of = spare_remap(w)
    kept, cols = _brute_spare(w)
    assert row_of.tolist() == kept and col_of.tolist() == cols
    assert 5 not in kept  # four defects, three spare PEs: the row is retired
    region = Region(w, 12, 14)
    links = region_links(region)
    for axis in ("x", "y"):
        for hops in (1, 2, 3, 6, 11):
            assert links.extra(axis, hops) == _brute_extra(kept, cols, axis, hops), (axis, hops)
    # a sub-region sees its own slice
    sub = Region(w, 4, 5, 3, 6)
    sl = [row[6:11] for row in cols[3:7]]
    assert region_links(sub).extra("y", 3) == _brute_extra(kept[3:7], sl, "y", 3)


def test_shift_pays_the_extra_hops_of_its_slowest_line():
    w = SMALL.replace(defective_pes=[[0, 2], [2, 1], [3, 1]], defect_recovery="spare")
    kept, cols = _brute_spare(w)
    for axis in ("x", "y"):
        mesh = Mesh(Region(w, 6, 6), mode="dry")
        t = mesh.place((6 * 8, 6 * 8), ("y", "x"), "fp16")
        before = mesh.ledger.comm_cycles
        comm.shift(t, axis, 1)
        extra = _brute_extra(kept[:6], [r[:6] for r in cols[:6]], axis, 1)
        assert extra > 0
        body = math.ceil(t.bytes_per_pe / w.link_bytes_per_cycle)
        assert mesh.ledger.comm_cycles - before == pytest.approx(2 * w.ramp_cycles + w.alpha_cycles * (1 + extra) + body)


def test_spare_regions_see_a_perfect_rectangle_and_avoid_skips_squares():
    w = SMALL.replace(defective_pes=[[1, 1]])
    with pytest.raises(MeshError, match="defective"):
        Region(w, 4, 4)  # avoid (the default): no region on a defective PE
    assert [(r.row0, r.col0) for r in region_slots(w, 4, "decode", fill=False)] == [
        (0, 4), (0, 8), (4, 0), (4, 4), (4, 8), (8, 0), (8, 4), (8, 8)]
    spare = w.replace(defect_recovery="spare")
    assert len(region_slots(spare, 4, "decode", fill=False)) == 9
    assert region_links(Region(spare, 4, 4)) is not None


# ------------------------------------------------------------------ reroute: fault-aware placement


def test_reroute_regions_skip_every_defective_pe():
    w = with_defect_rate(WSE2.replace(rows=60, cols=80), 0.02, 5, "reroute")
    dead = w.defective_pes
    slots = region_slots(w, 18, "prefill")
    assert len(slots) >= 8
    used = set()
    for reg in slots:
        span = reg.span
        rows = range(reg.row0, reg.row0 + reg.rows)
        healthy = [[c for c in range(reg.col0, reg.col0 + span) if (r, c) not in dead] for r in rows]
        assert all(len(h) >= reg.cols for h in healthy)
        assert any(len([c for c in h if c < reg.col0 + span - 1]) < reg.cols for h in healthy)  # the tightest span
        pes = {(r, c) for r in rows for c in range(reg.col0, reg.col0 + span)}
        assert not pes & used  # no two regions share a PE
        used |= pes
        # the logical PEs are each row's first healthy PEs; a row link past a dead PE detours
        col_of = [h[: reg.cols] for h in healthy]
        links = region_links(reg)
        if links is not None:
            for hops in (1, 2, 5):
                assert links.extra("x", hops) == _brute_extra(list(rows), col_of, "x", hops, DETOUR_HOPS)
                assert links.extra("y", hops) == _brute_extra(list(rows), col_of, "y", hops)
        mask = np.array([[(r, c) in dead for c in range(reg.col0, reg.col0 + span)] for r in rows])
        assert (healthy_positions(mask, reg.cols) + reg.col0).tolist() == col_of
    with pytest.raises(MeshError, match="fewer than"):
        Region(w, 18, 18, slots[0].row0, slots[0].col0, span=18) if slots[0].span > 18 else Region(w, 60, 80)


def test_relays_when_detours_find_no_route():
    w = SMALL.replace(defective_pes=[[1, 3]], defect_recovery="reroute")
    few = w.replace(routable_routes_per_pe=4)
    for spec, relays in ((w, 0), (few, 1)):
        mesh = Mesh(Region(spec, 6, 6, span=7), mode="dry")
        t = mesh.place((6 * 8, 6 * 8), ("y", "x"), "fp16")
        stages = mesh.ledger.totals["routing_stages"]
        comm.ring_shift(t, "x", 1)  # 3 routes per PE, + 2 for a detour: over a budget of 4
        assert mesh.ledger.totals["routing_stages"] - stages == relays


# ------------------------------------------------------------------ numerics and predictions


@pytest.mark.parametrize("recovery", ["spare", "reroute"])
def test_defects_never_change_the_tokens(recovery):
    base = WSE2.replace(sram_bytes_per_pe=96 * 1024, rows=24, cols=30, spare_rows=4, spare_cols=6)
    cfg = tiny_config(name="gqa")
    w = random_weights(cfg, seed=3)
    prompt = [3, 17, 99, 5, 200, 7, 1, 44, 9, 130, 61]

    def run(spec):
        wm = WaferModel(cfg, w, spec, RunConfig(4, 5, max_seq_len=len(prompt) + 8, dtype="fp32"), mode="numeric")
        wm.reset()
        logits = [wm.prefill(prompt, prompt_logits=True)]
        toks = [int(np.argmax(logits[0][-1]))]
        for _ in range(5):
            logits.append(wm.decode(toks[-1]))
            toks.append(int(np.argmax(logits[-1])))
        return toks, logits, wm.request_metrics()

    t0, l0, m0 = run(base)
    spec = with_defect_rate(base, 0.08, 2, recovery)
    t1, l1, m1 = run(spec)
    assert t1 == t0 and all(np.array_equal(a, b) for a, b in zip(l0, l1))
    assert m1["tpot_s"] > m0["tpot_s"] and m1["ttft_s"] >= m0["ttft_s"]


def test_a_defect_rate_never_makes_a_prediction_faster():
    cfg = get_model_preset("llama3-8b")
    run = RunConfig.for_request(2048, 128, prefill_grid=600, decode_grid=360, layers=1)
    kw = dict(gpus=False, band=False)
    base = predict_run(cfg, WSE2, run, 2048, 128, **kw)
    for recovery in ("spare", "reroute"):
        prev = base
        for rate in (0.001, 0.01):
            m = predict_run(cfg, with_defect_rate(WSE2, rate, 1, recovery), run, 2048, 128, **kw)
            assert m["ttft_s"] >= base["ttft_s"] and m["tpot_s"] > base["tpot_s"], (recovery, rate)
            assert m["e2e_tokens_per_s"] < base["e2e_tokens_per_s"]
            assert m["tpot_s"] >= prev["tpot_s"]  # more defects, no faster
            prev = m
            # the same regions (spare: the same perfect rectangle; reroute: the perfect tiling, moved over
            # into the spare columns), so the same capacity: only the hops grow
            assert m["kv_capacity_tokens"] == base["kv_capacity_tokens"]
            for ph in ("prefill", "decode"):
                assert m["placement"][ph]["region_sides"] == base["placement"][ph]["region_sides"]
            if recovery == "spare":
                assert m["placement"]["decode"]["stages"] == base["placement"]["decode"]["stages"]


def test_cli_predict_reports_what_the_defects_cost(capsys):
    from waferllm.interfaces.cli import main

    args = ["predict", "--model", "llama3-8b", "--input-len", "2048", "--output-len", "16", "--prefill-grid", "600",
            "--decode-grid", "360", "--extrapolate-from-layers", "1", "--defect-rate", "0.001", "--seed", "1"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    d = out["defects"]
    assert d["recovery"] == "spare" and d["rate"] == 0.001 and d["seed"] == 1
    assert d["defective_pes"] == len(random_defects(750 + 16, 994 + 48, 0.001, 1))
    assert d["defective"]["tpot_s"] == out["tpot_s"]
    assert d["lost_fraction"]["decode_tokens_per_s"] > 0 and d["lost_fraction"]["ttft_s"] >= 0
    assert d["lost_fraction"]["kv_capacity_tokens"] == 0
    assert main(args + ["--recovery", "reroute"]) == 0
    text = capsys.readouterr().out
    assert "perfect" in text and "reroute" in text and "KV capacity" in text
    assert main(["predict", "--model", "llama3-8b", "--seed", "3"]) != 0
    assert "give --defect-rate too" in capsys.readouterr().err


def test_a_grid_with_no_defect_free_square_is_refused_clearly():
    """Recovery 'avoid' skips every square holding a defective PE: at 1e-4 of wse2's PEs no
    600x600 square is left; the error says so and names a grid that does have such squares."""
    from waferllm.engine.placement import plan, region_slots
    from waferllm.errors import PlacementError
    from waferllm.hardware import get_wafer
    from waferllm.hardware.defects import with_defect_rate
    from waferllm.models.presets import get_model_preset

    wafer = with_defect_rate(get_wafer("wse2"), 1e-4, 1, "avoid")
    assert region_slots(wafer, 600, "prefill") == []
    with pytest.raises(PlacementError, match="no 600x600 prefill region of wse2 is free of defective PEs") as err:
        plan(get_model_preset("llama3-8b"), wafer, 600, 360, 2176, prompt_len=2048)
    free = int(str(err.value).split("a ")[-1].split("x")[0]) if "grid has squares" in str(err.value) else None
    assert free and region_slots(wafer, free, "prefill", fill=False)
    assert not any(region_slots(wafer, g, "prefill", fill=False) for g in range(free + 1, 601))
