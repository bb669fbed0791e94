"""KV capacity and SRAM breakdowns from the runtime's own SRAM accounting."""

from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

from waferllm.engine.capacity import kind_of, kv_capacity, region_sram, sram_breakdown
from waferllm.engine.run_config import RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.errors import SRAMOverflowError
from waferllm.hardware import get_wafer
from waferllm.interfaces.report import sram_table
from waferllm.mesh import Mesh
from waferllm.models.presets import get_model_preset
from waferllm.models.testing import tiny_config

WSE2 = get_wafer("wse2")


# ---- the SRAM accounting's record of where usage peaked


def test_sram_keeps_what_was_held_at_each_high():
    sram = Mesh.square(WSE2, 2, mode="dry").sram
    a = sram.alloc("a", 100)
    b = sram.alloc("b", 50)
    sram.free(b)
    c = sram.alloc("c", 30)
    rows = np.zeros((2, 2), np.int64)
    rows[1] = 20  # bottom row only
    d = sram.alloc("d", rows)
    assert sram.held_at_peak() == {a: ("a", 100), b: ("b", 50)}  # 150, the highest
    highs = sram.held_at_highs()
    assert highs["c"] == {a: ("a", 100), c: ("c", 30)}
    assert highs["d"] == {a: ("a", 100), c: ("c", 30), d: ("d", 20)}  # on the fullest PE
    assert sram.held() == {a: ("a", 100), c: ("c", 30), d: ("d", 20)}
    # a resize that sets a new high keeps its handle there, as in held()
    sram.resize(c, 90)
    assert sram.held_at_peak() == {a: ("a", 100), c: ("c", 90), d: ("d", 20)}
    assert sram.held_at_highs()["c"] == sram.held_at_peak()


def test_allocation_kinds():
    assert kind_of("L12.gate_up", "decode") == "weights"
    assert {kind_of(n, "decode") for n in ("lm_head", "embedding", "final_norm")} == {"vocab_tables"}
    assert kind_of("kv[0:7] cache (shift)", "decode") == kind_of("kv cache (concat)", "decode") == "kv_cache"
    assert kind_of("k_prefill", "prefill") == kind_of("v_proj", "prefill") == "kv_cache"
    assert kind_of("rope_k", "decode") == "activations"  # the new token's k, not yet cached
    assert kind_of("q_proj_acc", "prefill") == kind_of("meshgemm.next_tiles", "prefill") == "buffers"
    assert kind_of("softmax.exp", "decode") == "activations"


# ---- KV capacity


def _decode_only(cfg, grid, max_seq_len, prompt, layers=None, scheme="shift"):
    wm = WaferModel(cfg, None, WSE2, None, grid, max_seq_len=max_seq_len, mode="dry", layers=layers,
                    kv_scheme=scheme)
    wm.reset()
    wm.start_decode(prompt)
    wm.decode(None)
    return wm


@pytest.mark.parametrize("grid", [4, 8])
def test_runtime_capacity_is_what_the_cache_holds(monkeypatch, grid):
    """A run sized for the measured capacity fills its cache; one token more overflows."""
    cfg = tiny_config()
    base = _decode_only(cfg, grid, 64, 40)
    cap = kv_capacity(cfg, base.plan.decode, base.decode_stages)
    assert cap.shift == grid * cap.concat > 64  # one region: its rows fill evenly, or one row grows
    # the same placement with its cache sized for more tokens (the planner keeps slack)
    monkeypatch.setattr(RunConfig, "plan", lambda self, config, wafer: base.plan)
    full = _decode_only(cfg, grid, cap.shift, cap.shift - 1)  # its last step fills the cache
    assert full.decode_stages[0].cache.length == cap.shift
    again = kv_capacity(cfg, full.plan.decode, full.decode_stages)
    assert (again.shift, again.concat) == (cap.shift, cap.concat)  # measured full, the same answer
    with pytest.raises(SRAMOverflowError, match="SRAM overflow on region decode"):
        _decode_only(cfg, grid, cap.shift + 1, cap.shift)


def test_concat_cache_holds_its_capacity_on_one_row(monkeypatch):
    cfg = tiny_config()
    base = _decode_only(cfg, 8, 64, 40, scheme="concat")
    cap = kv_capacity(cfg, base.plan.decode, base.decode_stages)
    monkeypatch.setattr(RunConfig, "plan", lambda self, config, wafer: base.plan)
    wm = WaferModel(cfg, None, WSE2, None, 8, max_seq_len=cap.shift, mode="dry", kv_scheme="concat")
    wm.reset()
    wm.start_decode(0)
    for _ in range(cap.concat):
        wm.decode(None)
    assert wm.decode_stages[0].cache.count[-1] == cap.concat  # all on the bottom row


def test_extrapolated_capacity_equals_placed():
    """llama3-8b at 2048/128 on 360x360 decode regions: the whole model's capacity from
    one placed layer equals the fully placed run's."""
    cfg = get_model_preset("llama3-8b")
    placed = _decode_only(cfg, 360, 2176, 2048)
    one = _decode_only(cfg, 360, 2176, 2048, layers=1)
    a = kv_capacity(cfg, placed.plan.decode, placed.decode_stages)
    b = kv_capacity(cfg, one.plan.decode, one.decode_stages)
    assert a.shift >= 2176 and a.shift == 360 * a.concat  # the 360x360 regions are the tightest
    assert b.shift == pytest.approx(a.shift, rel=0.05) and b.concat == pytest.approx(a.concat, rel=0.05)
    # the regions with no layer placed take a placed one's figures, for their whole share
    assert [r.source for r in b.regions] == ["measured"] + ["like decode[0]"] * 3 + ["scaled from decode[0]"]
    for ra, rb in zip(a.regions, b.regions):
        assert rb.share == ra.share == ra.layers
        if rb.side == 360:
            assert (rb.weights, rb.kv_bytes_per_slot, rb.kv_cache) == (ra.weights, ra.kv_bytes_per_slot, ra.kv_cache)
        # the 274x274 region's figures are scaled from the 360x360 ones' by the planner's ratios
        assert rb.weights == pytest.approx(ra.weights, rel=0.02)
    # and the request metrics report it
    assert one.request_metrics()["kv_capacity_tokens"] == b.shift


def test_kv_bytes_per_slot_are_the_caches_own():
    cfg = tiny_config()
    wm = _decode_only(cfg, 4, 64, 40)
    (r,) = region_sram(cfg, wm.plan.decode, wm.decode_stages)
    # two layers x (K and V) x 8 features per PE column x fp16
    assert r.kv_bytes_per_slot == 2 * 2 * 8 * 2 and r.kv_cache == r.kv_bytes_per_slot * 16  # 64 tokens / 4 rows
    assert r.weights == 2 * 3968  # tests/test_placement.py: TINY_LAYER_ON_4


# ---- where the SRAM goes


def test_breakdown_of_extrapolated_run_is_the_whole_models():
    cfg = get_model_preset("llama3-8b")
    runs = {}
    for layers in (None, 1):
        wm = WaferModel(cfg, None, WSE2, 600, 360, max_seq_len=2176, prompt_len=2048, mode="dry", layers=layers)
        wm.reset()
        wm.prefill(2048)
        wm.decode(None)
        runs[layers] = sram_breakdown(cfg, wm.plan, wm.prefill_stages, wm.decode_stages)
    for phase in ("prefill", "decode"):
        full, one = runs[None][phase], runs[1][phase]
        for bd in (full, one):
            assert sum(bd.values()) == WSE2.sram_bytes_per_pe
            assert bd["reserved"] == WSE2.reserved_bytes_per_pe
            assert min(bd["weights"], bd["kv_cache"], bd["vocab_tables"], bd["free"]) > 0
        for kind in ("weights", "kv_cache", "vocab_tables", "free"):
            assert one[kind] == pytest.approx(full[kind], rel=0.05), (phase, kind)
        used = WSE2.usable_sram_bytes_per_pe
        assert one["free"] == pytest.approx(full["free"], abs=0.02 * used)
    # decode: every region of the fullest side was measured or is like one
    assert runs[1]["decode"] == runs[None]["decode"]
    # the report's table
    console = Console(record=True, width=120)
    console.print(sram_table({"sram_breakdown_bytes_per_pe": runs[1]}))
    text = console.export_text()
    for label in ("weights", "KV cache", "activations", "buffers", "reserve", "free", "total"):
        assert label in text
    assert f"{WSE2.sram_bytes_per_pe:,}" in text
