"""Streaming (flash-style) prefill attention: the numbers of the dense softmax, its costs
earned step by step, and a planner that sizes its passes and weighs regions against them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from waferllm.engine.layouts import HeadLayout
from waferllm.engine.placement import plan, streaming_attention_bytes
from waferllm.engine.prefill import PrefillStage, predicted_cycles
from waferllm.engine.run_config import RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.errors import MeshError, RequestError
from waferllm.hardware import get_wafer
from waferllm.kernels.attention import grouped_pv, grouped_scores
from waferllm.kernels.flash_attention import head_slots, slots_per_column, streaming_attention
from waferllm.kernels.layer_ops import masked_softmax
from waferllm.mesh import Mesh, Region
from waferllm.models.presets import get_model_preset
from waferllm.models.reference import ReferenceModel
from waferllm.models.testing import random_weights, tiny_config

WSE2 = get_wafer("wse2")
BIG = WSE2.replace(sram_bytes_per_pe=96 * 1024)  # tiny fp32 models fit 3x3 regions


def _mesh(n, mode="numeric", wafer=WSE2):
    return Mesh(Region(wafer, n, n, name=f"{n}x{n}"), mode=mode)


def _dense(q, k, v, hl: HeadLayout, length: int, heads=None) -> np.ndarray:
    """Causal softmax(q k^T / sqrt(D)) v per head in float64, in the wafer's head-aware order."""
    n, tf, r = hl.parts, hl.col_features, hl.group
    lq = q.shape[0]
    head = hl.head_of_pos.reshape(-1)
    qg = q.astype(np.float64).reshape(lq, n, r, tf).transpose(0, 2, 1, 3).reshape(lq, r, n * tf)
    out = np.zeros((lq, r, n * tf))
    causal = np.tril(np.ones((length, length), bool))
    for h in range(hl.num_kv_heads) if heads is None else heads:
        sel = head == h
        for g in range(r):
            s = qg[:length, g][:, sel] @ k[:length, sel].astype(np.float64).T / math.sqrt(hl.head_dim)
            s = np.where(causal, s, -np.inf)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[:length, g, sel] = (p / p.sum(axis=1, keepdims=True)) @ v[:length, sel].astype(np.float64)
    return out.reshape(lq, r, n, tf).transpose(0, 2, 1, 3).reshape(lq, n * r * tf)


def _operands(hl: HeadLayout, length: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (length, hl.q_padded)).astype(np.float32),
            rng.uniform(-1, 1, (length, hl.kv_padded)).astype(np.float32),
            rng.uniform(-1, 1, (length, hl.kv_padded)).astype(np.float32))


# (grid, query heads, kv heads, head dim, prompt): GQA, MHA, MQA, heads straddling columns,
# prompts that leave PE rows empty, one PE
SHAPES = [(4, 4, 2, 6, 13), (3, 6, 3, 4, 7), (5, 2, 2, 8, 11), (1, 2, 1, 4, 3), (2, 4, 4, 4, 5), (7, 3, 3, 10, 50),
          (8, 4, 1, 8, 30), (6, 8, 8, 4, 4)]


# ------------------------------------------------------------------ the kernel


@pytest.mark.parametrize("n,hq,hkv,d,length", SHAPES)
def test_streaming_attention_matches_numpy_and_the_paper_kernels(n, hq, hkv, d, length):
    hl = HeadLayout(hq, hkv, d, n)
    q, k, v = _operands(hl, length, n * 31 + hkv)
    mesh = _mesh(n)
    Q, K, V = (mesh.place(a, ("y", "x"), "fp32", name=nm) for a, nm in ((q, "Q"), (k, "K"), (v, "V")))
    got = streaming_attention(Q, K, V, hl.head_of_pos, hl.group, length, 1 / math.sqrt(d)).out
    assert got.layout == ("y", "x") and got.shape == q.shape
    np.testing.assert_allclose(got.to_global(), _dense(q, k, v, hl, length), rtol=1e-5, atol=1e-5)
    # the paper's kernels on the same operands: dist-GEMM-T scores, softmax, grouped MeshGEMM
    tq = -(-length // n)
    idx = np.arange(n)[:, None] * tq + np.arange(tq)
    allowed = ((idx[None, :, None, :] <= idx[:, None, :, None]) & (idx[None, :, None, :] < length))[:, :, None, None]
    s = grouped_scores(Q, K, hl.head_of_pos, hkv, hl.group).out
    p = masked_softmax(s, allowed, 1 / math.sqrt(d), dim=3, out_dtype="fp32")
    paper = grouped_pv(p, V, hl.head_of_pos).out
    np.testing.assert_allclose(got.to_global(), paper.to_global(), rtol=1e-5, atol=1e-5)


def test_passes_fill_their_own_heads_of_one_output():
    """Two passes of two heads each: the first leaves the others' features zero, the
    second fills them and leaves the first's untouched."""
    n, hq, hkv, d, length = 4, 4, 4, 8, 11
    hl = HeadLayout(hq, hkv, d, n)
    q, k, v = _operands(hl, length, 5)
    mesh = _mesh(n)
    Q, K, V = (mesh.place(a, ("y", "x"), "fp32") for a in (q, k, v))
    hop = hl.head_of_pos
    first = np.where(hop < 2, hop, -1)
    out = streaming_attention(Q, K, V, first, hl.group, length, 1 / math.sqrt(d)).out
    np.testing.assert_allclose(out.to_global(), _dense(q, k, v, hl, length, heads=[0, 1]), rtol=1e-5, atol=1e-5)
    second = np.where(hop >= 2, hop - 2, -1)
    out = streaming_attention(Q, K, V, second, hl.group, length, 1 / math.sqrt(d), out=out).out
    np.testing.assert_allclose(out.to_global(), _dense(q, k, v, hl, length), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,hq,hkv,d,length", [(5, 4, 2, 8, 23), (9, 6, 6, 4, 40), (12, 8, 2, 16, 37)])
def test_dry_run_charges_what_the_numeric_run_does(n, hq, hkv, d, length):
    """Shapes only, the steady steps are replayed from one executed: same cycles, counters and SRAM peak."""
    hl = HeadLayout(hq, hkv, d, n)
    reps = []
    for mode in ("numeric", "dry"):
        mesh = _mesh(n, mode)
        ops = _operands(hl, length, 1) if mode == "numeric" else [(length, hl.q_padded)] + [(length, hl.kv_padded)] * 2
        Q, K, V = (mesh.place(a, ("y", "x"), "fp16") for a in ops)
        reps.append(streaming_attention(Q, K, V, hl.head_of_pos, hl.group, length, 0.5).report)
    num, dry = reps
    assert dry.cycles == pytest.approx(num.cycles, rel=1e-12)
    assert dry.flops == pytest.approx(num.flops, rel=1e-12)
    assert dry.bytes_moved == pytest.approx(num.bytes_moved, rel=1e-12)
    assert dry.sram_peak_bytes_per_pe == num.sram_peak_bytes_per_pe


def test_costs_are_the_steps_executed_with_the_wafers_constants():
    """Every step multiplies r query heads' tiles with the PE's own features, twice (scores,
    then p V), exponentiates its score tile and the rescale factors (ops_exp each), and the
    output is divided once (ops_div); compute and communication overlap."""
    n, hq, hkv, d, length = 6, 8, 2, 8, 40
    w = WSE2.replace(ops_exp=7.0, ops_div=3.0)
    hl = HeadLayout(hq, hkv, d, n)
    mesh = _mesh(n, wafer=w)
    Q, K, V = (mesh.place(a, ("y", "x"), "fp16") for a in _operands(hl, length, 2))
    rep = streaming_attention(Q, K, V, hl.head_of_pos, hl.group, length, 0.5).report
    events = {}
    for e in mesh.ledger.events:
        events.setdefault(e.name, []).append(e)
    r, tq, tk, tf = hl.group, -(-length // n), -(-length // n), hl.col_features
    g = slots_per_column(hl.head_of_pos, hkv)
    lanes16, lanes32, over = w.macs_per_cycle("fp16"), w.macs_per_cycle("fp32"), w.op_overhead_cycles
    product = math.ceil(r * tq * tf * tk / lanes16) + over
    for name in ("streaming_attention.tile_matmul", "streaming_attention.pv_matmul"):
        assert [e.cycles for e in events[name]] == [product] * n
        assert all(e.counters["macs_fp16"] == r * tq * tf * tk * n * n for e in events[name])
    assert [e.cycles for e in events["stream.exp"]] == [math.ceil(g * r * tq * tk * 7.0 / lanes32) + over] * n
    assert [e.cycles for e in events["stream.rescale"]] == [math.ceil(g * r * tq * 7.0 / lanes32) + over] * n
    assert [e.cycles for e in events["stream.normalise"]] == [math.ceil(tq * r * tf * 3.0 / lanes32) + over]
    assert len(events["streaming_attention.shift_K"]) == len(events["streaming_attention.shift_V"]) == n
    assert len(events["streaming_attention.scores"]) == n
    assert rep.cycles < rep.compute_cycles + rep.comm_cycles + rep.overhead_cycles


@pytest.mark.parametrize("n,hq,hkv,d,length,dtype", [(8, 4, 2, 8, 30, "fp16"), (12, 6, 2, 16, 40, "fp32"),
                                                     (7, 3, 3, 10, 50, "fp16"), (5, 12, 12, 4, 9, "fp16"),
                                                     (600, 40, 40, 128, 2048, "fp16"), (600, 32, 8, 128, 2048, "fp16")])
def test_planner_budget_is_the_kernels_peak(n, hq, hkv, d, length, dtype):
    """What the planner budgets for a streaming pass is what the kernel's SRAM accounting holds
    beside q, k and v at its peak."""
    cfg = tiny_config(hidden_size=hq * d, num_heads=hq, num_kv_heads=hkv, head_dim=d)
    hl = HeadLayout(hq, hkv, d, n)
    mesh = _mesh(n, "dry")
    Q, K, V = (mesh.place(s, ("y", "x"), dtype) for s in ((length, hl.q_padded), (length, hl.kv_padded),
                                                          (length, hl.kv_padded)))
    held = mesh.sram.used_max()
    rep = streaming_attention(Q, K, V, hl.head_of_pos, hl.group, length, 0.5).report
    assert rep.sram_peak_bytes_per_pe - held == streaming_attention_bytes(cfg, n, length, dtype, hkv)


def test_allreduce_slots_sums_each_group_over_its_columns():
    """Slot s of column j stands for group ids[j, s]: every PE gets its groups' line sums, and
    the collective costs a segmented allreduce of the packed tile over the groups' span."""
    from waferllm.mesh import comm

    rng = np.random.default_rng(3)
    ids = np.array([[0, 1], [1, -1], [1, 2], [2, -1]])  # (cols, slots)
    mesh = _mesh(4)
    x = rng.uniform(-1, 1, (4, 4, 2, 3)).astype(np.float32)  # (rows, cols, slots, values)
    t = mesh.place(x.transpose(1, 2, 0, 3).reshape(8, 12), ("x", "y"), "fp32")  # slot j*2+s split over x
    got = comm.allreduce_slots(t, "x", ids[None], 3, name="slots")
    want = np.zeros_like(x)
    for g in range(3):
        total = sum(x[:, j, s] for j in range(4) for s in range(2) if ids[j, s] == g)  # (rows, values)
        for j in range(4):
            for s in range(2):
                if ids[j, s] == g:
                    want[:, j, s] = total
    np.testing.assert_allclose(got.tiles.reshape(4, 4, 2, 3), want, rtol=1e-6, atol=1e-6)
    seg = _mesh(4)
    comm.allreduce_segments(seg.place(np.zeros((8, 12), np.float32), ("x", "y"), "fp32"), "x", 3, name="segments")
    assert mesh.ledger.by_primitive["slots"] == seg.ledger.by_primitive["segments"] > 0


def test_head_slots_of_columns():
    hop = np.array([[0, 0, 1], [1, 1, 1], [1, 2, -1], [-1, -1, -1]])
    heads, slot, span = head_slots(hop)
    np.testing.assert_array_equal(heads, [[0, 1], [1, -1], [1, 2], [-1, -1]])
    np.testing.assert_array_equal(slot, [[0, 0, 1], [0, 0, 0], [0, 1, -1], [-1, -1, -1]])
    assert span == 3  # head 1 spreads over columns 0..2
    assert slots_per_column(hop, 1) == 1 and slots_per_column(hop, 3) == 2


def test_streaming_attention_refuses_mismatched_tiles():
    hl = HeadLayout(4, 2, 4, 2)
    mesh = _mesh(2, "dry")
    q, k = mesh.place((4, hl.q_padded), ("y", "x"), "fp16"), mesh.place((4, hl.kv_padded), ("y", "x"), "fp16")
    with pytest.raises(MeshError, match=r"Q tile .* disagree for 3 query heads"):
        streaming_attention(q, k, k, hl.head_of_pos, 3, 4, 0.5)
    rect = Mesh(Region(WSE2, 2, 3), mode="dry")
    with pytest.raises(MeshError, match="square region"):
        streaming_attention(rect.place((4, 12), ("y", "x"), "fp16"), rect.place((4, 6), ("y", "x"), "fp16"),
                            rect.place((4, 6), ("y", "x"), "fp16"), hl.head_of_pos, 2, 4, 0.5)


# ------------------------------------------------------------------ the engine


CONFIGS = {"gqa": dict(), "mha": dict(num_kv_heads=4), "mqa": dict(num_kv_heads=1),
           "odd": dict(hidden_size=60, num_heads=6, num_kv_heads=3, head_dim=10, intermediate_size=100,
                       vocab_size=263)}
PROMPT = [3, 17, 99, 5, 200, 7, 1, 44, 9, 130, 61]


def _prefill(cfg, w, grid, attention, prompt=PROMPT, wafer=BIG, dtype="fp32"):
    run = RunConfig(grid, None, max_seq_len=len(prompt) + 4, dtype=dtype, prefill_attention=attention)
    wm = WaferModel(cfg, w, wafer, run, mode="numeric")
    wm.reset()
    return wm, wm.prefill(prompt, prompt_logits=True)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("grid", [3, 4])
def test_engine_prefill_equals_the_paper_path_and_the_reference(name, grid):
    cfg = tiny_config(name=name, **CONFIGS[name])
    w = random_weights(cfg, seed=7)
    wm, streamed = _prefill(cfg, w, grid, "streaming")
    assert wm.plan.prefill.attention == "streaming"
    assert all(st.prefill_attention == "streaming" for st in wm.prefill_stages)
    _, paper = _prefill(cfg, w, grid, "paper")
    ref = ReferenceModel(w).prefill(PROMPT)
    np.testing.assert_allclose(streamed, paper, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(streamed, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


SMOL_WAFER = WSE2.replace(sram_bytes_per_pe=200_000)  # fp32 SmolLM2 on 12x12 regions


def _greedy(model, attention, prompt_ids, steps):
    run = RunConfig(12, 12, max_seq_len=64, dtype="fp32", prefill_attention=attention)
    wm = WaferModel(model.config, model.weights, SMOL_WAFER, run, mode="numeric")
    wm.reset()
    logits = wm.prefill(prompt_ids)
    tokens = [int(np.argmax(logits[-1]))]
    for _ in range(steps - 1):
        tokens.append(int(np.argmax(wm.decode(tokens[-1]))))
    return tokens, logits[-1], wm.request_metrics()["ttft_s"]


def test_smollm2_greedy_tokens_identical_to_the_paper_path(smollm):
    ids = smollm.tokenizer.encode("The capital of France is", add_special_tokens=True)
    streamed, s_logits, s_ttft = _greedy(smollm, "streaming", ids, 8)
    paper, p_logits, p_ttft = _greedy(smollm, "paper", ids, 8)
    assert streamed == paper
    np.testing.assert_allclose(s_logits, p_logits, rtol=1e-4, atol=1e-4 * np.abs(p_logits).max())
    ref = ReferenceModel(smollm.weights, max_seq_len=64).prefill(ids)[-1]
    np.testing.assert_allclose(s_logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert s_ttft != p_ttft  # a different program, its own cost


def test_prefill_stage_refuses_an_unknown_attention():
    cfg = tiny_config()
    with pytest.raises(MeshError, match="prefill attention must be one of paper, streaming, got 'flash'"):
        PrefillStage(_mesh(2, "dry"), cfg, range(1), [None], range(2), None, None, None, attention="flash")
    with pytest.raises(RequestError, match="prefill_attention must be one of paper, streaming"):
        RunConfig(prefill_attention="flash")


# ------------------------------------------------------------------ the planner


def test_streaming_passes_take_every_head_where_the_paper_takes_few():
    """llama2-13b (MHA, 40 kv heads) extrapolated from one layer on 600x600 regions: the paper's
    score tiles allow one head per pass; streaming ones cost the same bytes for all 40."""
    cfg = get_model_preset("llama2-13b")
    paper = plan(cfg, WSE2, 600, None, 2048, prompt_len=2048, layers=1).prefill
    stream = plan(cfg, WSE2, 600, None, 2048, prompt_len=2048, layers=1, prefill_attention="streaming").prefill
    assert (paper.heads_per_pass, paper.attention) == (1, "paper")
    assert (stream.heads_per_pass, stream.attention) == (40, "streaming")
    assert [len(s.layers) for s in stream.stages] == [len(s.layers) for s in paper.stages]
    cfg8 = get_model_preset("llama3-8b")
    assert plan(cfg8, WSE2, 600, None, 2048, prompt_len=2048).prefill.heads_per_pass == 3
    assert plan(cfg8, WSE2, 600, None, 2048, prompt_len=2048, prefill_attention="streaming").prefill.heads_per_pass == 8


def test_planner_keeps_room_for_wide_passes_on_full_regions():
    """llama3-8b on 512x512 regions: sized for one-head passes, the small strip squares take
    a second layer and leave one head per pass (8 passes); sized for one pass, the same five
    regions hold the layers as the paper's planner spreads them, and that is predicted faster."""
    pp = plan(get_model_preset("llama3-8b"), WSE2, 512, None, 2048, prompt_len=2048,
              prefill_attention="streaming").prefill
    assert [(o["regions"], o["heads_per_pass"]) for o in pp.weighed] == [(5, 1), (5, 8)]
    assert pp.weighed[1]["predicted_s"] < pp.weighed[0]["predicted_s"]
    assert pp.heads_per_pass == 8
    paper = plan(get_model_preset("llama3-8b"), WSE2, 512, None, 2048, prompt_len=2048).prefill
    assert pp.layer_share == paper.layer_share


WEIGH = dict(hidden_size=64, num_heads=8, num_kv_heads=8, head_dim=8, num_layers=4)
WEIGH_WAFER = WSE2.replace(sram_bytes_per_pe=80 * 1024)
WEIGH_LEN = 48


def _weigh_plan():
    return plan(tiny_config(**WEIGH), WEIGH_WAFER, 3, None, WEIGH_LEN, "fp32", prompt_len=WEIGH_LEN,
                prefill_attention="streaming")


def test_planner_weighs_layers_per_region_against_pass_width():
    """Two 3x3 regions hold the four layers but leave room for passes of two heads only; four
    regions of one layer each take all eight heads at once, three allow four. Each option is
    predicted by running its layers shape-only; the fastest wins, and planning again gives
    the same plan."""
    pp = _weigh_plan().prefill
    opts = pp.weighed
    # the fewest regions first, then one pass, then two
    assert [(o["regions"], o["layers_per_region"], o["heads_per_pass"]) for o in opts] == [(2, 2, 2), (4, 1, 8),
                                                                                             (3, 2, 4)]
    best = min(range(len(opts)), key=lambda i: (opts[i]["predicted_s"], i))
    assert (len(pp.stages), pp.heads_per_pass) == (opts[best]["regions"], opts[best]["heads_per_pass"])
    assert (len(pp.stages), pp.heads_per_pass, pp.layer_share) == (4, 8, [1, 1, 1, 1])
    again = _weigh_plan().prefill
    assert (again.weighed, again.layer_share, again.heads_per_pass) == (opts, pp.layer_share, pp.heads_per_pass)
    paper = plan(tiny_config(**WEIGH), WEIGH_WAFER, 3, None, WEIGH_LEN, "fp32", prompt_len=WEIGH_LEN).prefill
    assert paper.weighed == []


def test_predicted_prefill_is_what_the_engine_runs():
    """The planner's prediction of a placement equals the layers and stage transfers the engine
    then executes on it (shapes only)."""
    cfg = tiny_config(**WEIGH)
    run = RunConfig(3, None, max_seq_len=WEIGH_LEN + 1, prompt_len=WEIGH_LEN, dtype="fp32",
                    prefill_attention="streaming")
    wm = WaferModel(cfg, None, WEIGH_WAFER, run, mode="dry")
    wm.reset()
    wm.prefill(WEIGH_LEN)
    pp = wm.plan.prefill
    cycles = predicted_cycles(cfg, WEIGH_WAFER, [s.region for s in pp.stages], [len(s.layers) for s in pp.stages],
                              WEIGH_LEN, "fp32", "fp16", pp.heads_per_pass, "streaming")
    # each move between regions also switches task once
    moves = len(pp.stages) - 1
    ran = (wm.cycles.layers["prefill"] + wm.ledger.by_primitive["stage_transfer"]
           + moves * WEIGH_WAFER.task_switch_cycles)
    assert cycles == pytest.approx(ran, rel=1e-12)
    assert WEIGH_WAFER.cycles_to_seconds(cycles) == pytest.approx(
        next(o["predicted_s"] for o in pp.weighed if o["regions"] == len(pp.stages)), rel=1e-12)


def test_streaming_prefill_is_faster_in_fewer_passes():
    """llama2-13b, one layer on 300x300 regions, 512-token prompt: the paper's passes (SRAM
    allows few heads) against one streaming pass of all 40 heads."""
    cfg = get_model_preset("llama2-13b")
    ttft, plans = {}, {}
    for att in ("paper", "streaming"):
        run = RunConfig.for_request(512, 16, prefill_grid=300, layers=1, prefill_attention=att)
        wm = WaferModel(cfg, None, WSE2, run, mode="dry")
        wm.reset()
        wm.prefill(512)
        ttft[att], plans[att] = wm.request_metrics()["ttft_s"], wm.plan.prefill
    assert plans["streaming"].heads_per_pass == 40 > plans["paper"].heads_per_pass
    assert ttft["streaming"] < ttft["paper"]
