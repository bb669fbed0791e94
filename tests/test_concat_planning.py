"""Planning the concatenation KV cache: every plan the planner accepts runs without an SRAM overflow.

The concatenation cache spreads the prompt over a decode region's rows at the transition,
then puts every generated token on the bottom row; decode attention's score tiles span that
row's slots on every PE. The planner budgets exactly that (``placement.decode_row_slots``),
with decode attention's score tiles sized from the kernel's own tile shape
(``placement.decode_scores_bytes_per_slot``): here runs planned at the longest request that
plans are executed (dry, the engine's own code) and one token more is refused at planning.
"""

from __future__ import annotations

import pytest

from waferllm.engine.capacity import kv_capacity, region_sram
from waferllm.engine.placement import (concat_bottom_slots, decode_row_slots, decode_scores_bytes_per_slot,
                                       kv_bytes_per_slot)
from waferllm.engine.run_config import RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.errors import PlacementError
from waferllm.hardware import get_wafer
from waferllm.models.presets import get_model_preset
from waferllm.models.testing import tiny_config

WSE2 = get_wafer("wse2")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- the budget's figures, computed by hand


def test_bottom_row_slots():
    # llama3-8b's 2048-token prompt over 360 rows: the bottom rows take the extra ones (6), then 128 generated
    assert concat_bottom_slots(2048 + 128, 2048, 360) == 6 + 128
    assert concat_bottom_slots(300 + 100, 300, 120) == 3 + 100
    assert concat_bottom_slots(2176, None, 360) == 2176  # any prompt: the whole context may land there
    assert decode_row_slots(2176, 360, "concat", 2048) == (134, 134)
    assert decode_row_slots(2176, 360, "shift", 2048) == (7, 7)  # rows fill evenly
    # a pool of 2 requests of 21 tokens (12 prompt): each request's bottom row; attention scans one at a time
    assert decode_row_slots(42, 4, "concat", 12, 21) == (2 * (3 + 9), 3 + 9)
    assert decode_row_slots(42, 4, "shift", 12, 21) == (11, 6)


@pytest.mark.parametrize("name, per_slot", [
    # two fp32 score tiles live at once, each [kv heads, query heads per kv head, slots]: every query head
    ("llama3-8b", 2 * 32 * 4), ("llama2-13b", 2 * 40 * 4), ("smollm2-135m", 2 * 9 * 4)])
def test_decode_score_budget_per_slot(name, per_slot):
    assert decode_scores_bytes_per_slot(get_model_preset(name)) == per_slot


@pytest.mark.parametrize("cfg, grid, scheme", [
    (tiny_config(), 4, "shift"), (tiny_config(), 8, "concat"),
    (tiny_config(num_heads=8, num_kv_heads=8, head_dim=8), 6, "concat"),  # MHA
    (tiny_config(num_heads=4, num_kv_heads=1), 4, "shift"),  # MQA
    (get_model_preset("smollm2-135m"), 120, "concat"),
    (get_model_preset("llama3-8b"), 360, "shift"),
])
def test_score_budget_is_what_decode_attention_keeps(cfg, grid, scheme):
    """The score tiles live at decode attention's peak, per scanned slot, as the runtime's SRAM
    accounting measures them (``engine.capacity``), are exactly the planner's budget."""
    wm = WaferModel(cfg, None, WSE2, None, grid, max_seq_len=64, mode="dry", layers=1, kv_scheme=scheme)
    wm.reset()
    wm.start_decode(40)
    for _ in range(3):
        wm.decode(None)
    measured = {p.score_bytes_per_slot for r in region_sram(cfg, wm.plan.decode, wm.decode_stages) for p in r.points}
    assert max(measured) == decode_scores_bytes_per_slot(cfg) == 2 * cfg.num_heads * 4


# ---- plans at the limit run; one token more is refused


def _plan(cfg, wafer, prompt: int, output: int, pg: int, dg: int):
    run = RunConfig.for_request(prompt, output, prefill_grid=pg, decode_grid=dg, kv_scheme="concat")
    return run, run.plan(cfg, wafer, suggest=False)


def _plans(cfg, wafer, prompt, output, pg, dg) -> bool:
    try:
        _plan(cfg, wafer, prompt, output, pg, dg)
        return True
    except PlacementError:
        return False


def _longest_output(cfg, wafer, prompt, pg, dg) -> int:
    """The most output tokens a request with this prompt plans for (each length tried is planned)."""
    lo, hi = 1, 64
    assert _plans(cfg, wafer, prompt, lo, pg, dg)
    while _plans(cfg, wafer, prompt, hi, pg, dg):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _plans(cfg, wafer, prompt, mid, pg, dg) else (lo, mid)
    return lo


def _run(cfg, wafer, run: RunConfig, prompt: int, output: int) -> WaferModel:
    """The request as ``predict`` runs it (dry): prefill, then output - 1 decode steps."""
    wm = WaferModel(cfg, None, wafer, run, mode="dry")
    wm.reset()
    wm.prefill(prompt)
    for _ in range(output - 1):
        wm.decode(None)
    return wm


LIMIT_CASES = {
    # (model, wafer, prompt, prefill grid, decode grid): small wafers, so that regions hold several layers
    "tiny-gqa": (tiny_config(num_layers=6), WSE2.replace(rows=16, cols=16, sram_bytes_per_pe=8192 + 16384), 20, 8, 8),
    "tiny-mha": (tiny_config(num_heads=8, num_kv_heads=8, head_dim=8, num_layers=6),
                 WSE2.replace(rows=12, cols=12, sram_bytes_per_pe=8192 + 16384), 20, 6, 6),
    "tiny-mqa": (tiny_config(num_heads=4, num_kv_heads=1, num_layers=4),
                 WSE2.replace(rows=12, cols=12, sram_bytes_per_pe=8192 + 16384), 20, 6, 6),
    "smollm2-120": (get_model_preset("smollm2-135m"), WSE2.replace(rows=240, cols=240), 300, 120, 120),
    "smollm2-80": (get_model_preset("smollm2-135m"), WSE2.replace(rows=240, cols=240), 200, 120, 80),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_concat_plans_at_the_limit_run_without_overflow(case):
    cfg, wafer, prompt, pg, dg = LIMIT_CASES[case]
    output = _longest_output(cfg, wafer, prompt, pg, dg)
    run, plan = _plan(cfg, wafer, prompt, output, pg, dg)
    dec = plan.decode
    assert dec.kv_scheme == "concat" and dec.prompt_len == prompt
    wm = _run(cfg, wafer, run, prompt, output)  # no SRAMOverflowError
    # every generated token but the last went to the bottom row, after its share of the prompt
    bottom = _cdiv(prompt, dg) + output - 1
    held = [st for st in wm.decode_stages if len(st.layer_ids)]
    assert [int(st.cache.count[-1]) for st in held] == [bottom] * len(held)
    for st, need in zip(wm.decode_stages, dec.region_bytes):
        side, layers = st.mesh.rows, len(st.layer_ids)
        # the budget holds the bottom row's slots (the cache admits one more append than the request makes)
        assert need["kv_cache"] == layers * kv_bytes_per_slot(cfg, side) * (bottom + 1)
        # and the runtime's fullest PE never went beyond what the planner budgeted for the region
        assert st.mesh.sram.peak_bytes <= sum(need.values())
    # what the runtime measures the concat cache holds is at least what the planner expects, and that
    # covers the request
    measured = kv_capacity(cfg, dec, wm.decode_stages)
    assert measured.concat >= plan.kv_capacity_tokens_concat >= bottom + 1
    # one generated token more: refused when planning, with the concat cache named
    with pytest.raises(PlacementError, match="concatenation"):
        _plan(cfg, wafer, prompt, output + 1, pg, dg)


def test_concat_plan_without_prompt_length_holds_the_whole_context_on_the_bottom_row():
    """With prompts of any length (``prompt_len`` None, as the LLM API plans) a request may put
    nearly its whole context on the bottom row: the plan budgets that, and a run doing it fits."""
    cfg, wafer, _, _, dg = LIMIT_CASES["tiny-gqa"]

    def plans(n):
        try:
            return RunConfig(decode_grid=dg, max_seq_len=n, kv_scheme="concat").plan(cfg, wafer, suggest=False)
        except PlacementError:
            return None

    lo, hi = 2, 4096
    assert plans(lo) and not plans(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plans(mid) else (lo, mid)
    p = plans(lo)
    assert all(rb["kv_cache"] == len(st.layers) * kv_bytes_per_slot(cfg, dg) * lo
               for st, rb in zip(p.decode.stages, p.decode.region_bytes))
    wm = WaferModel(cfg, None, wafer, RunConfig(decode_grid=dg, max_seq_len=lo, kv_scheme="concat"), mode="dry")
    wm.reset()
    wm.start_decode(1)  # a one-token prompt lands on the bottom row
    for _ in range(lo - 1):
        wm.decode(None)  # no SRAMOverflowError
    assert int(wm.decode_stages[0].cache.count[-1]) == lo


def test_repro_smollm2_runs():
    """The reported case: smollm2 300 + 100 on 120/120 grids overflowed in qk_allreduce; its plan now
    budgets the bottom row's 3 + 100 slots (two regions of 15 layers) and the request runs."""
    cfg = get_model_preset("smollm2-135m")
    run, plan = _plan(cfg, WSE2, 300, 100, 120, 120)
    assert plan.decode.layer_share == [15, 15]
    wm = _run(cfg, WSE2, run, 300, 100)
    assert int(wm.decode_stages[0].cache.count[-1]) == 3 + 99


def test_repro_llama3_8b_is_refused_with_advice_that_was_planned():
    """llama3-8b 2048 + 128 on 600/360 with the concat cache overflowed at runtime: its bottom row's
    134 slots of score tiles alone leave no room for a layer, so planning refuses it and says what
    fits, each option planned; following the advice runs."""
    cfg = get_model_preset("llama3-8b")
    run = RunConfig.for_request(2048, 128, prefill_grid=600, decode_grid=360, kv_scheme="concat")
    with pytest.raises(PlacementError) as exc:
        run.plan(cfg, WSE2)
    msg, ctx = str(exc.value), exc.value.context
    assert "134 slots of the concatenation cache's bottom row" in msg
    assert ctx["shift_fits"] and "the shift-based cache (--kv-scheme shift) holds it on 360x360 regions" in msg
    longest = ctx["longest"]
    assert f"a request of at most {longest} tokens in all does (the 2048-token prompt and {longest - 2048} generated)" \
        in msg
    assert run.replace(kv_scheme="shift").plan(cfg, WSE2, suggest=False)  # the shift-based cache holds it
    output = longest - 2048
    ok, plan = _plan(cfg, WSE2, 2048, output, 600, 360)
    wm = _run(cfg, WSE2, ok, 2048, output)  # no SRAMOverflowError
    assert int(wm.decode_stages[0].cache.count[-1]) == 6 + output - 1
    with pytest.raises(PlacementError, match="concatenation"):
        _plan(cfg, WSE2, 2048, output + 1, 600, 360)
