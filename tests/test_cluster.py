"""Clusters of wafers: the cluster description, the inter-wafer primitive, the planner that
pipelines layers over wafers (both layouts), numeric runs equal to one wafer's, dry runs
equal to numeric ones, the figures a cluster adds, and `predict --wafers`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from waferllm.engine.cluster import Capacity, fewest_wafers, plan_cluster, search
from waferllm.engine.predict import predict_cluster, predict_run
from waferllm.engine.run_config import RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.errors import HardwareError, MeshError, PlacementError, RequestError
from waferllm.hardware import get_wafer
from waferllm.hardware.cluster import cluster_for, cluster_names, get_cluster
from waferllm.interfaces.cli import main
from waferllm.mesh import interwafer
from waferllm.mesh.ledger import Ledger
from waferllm.mesh.move import Placement
from waferllm.mesh.region import Region
from waferllm.models.presets import get_model_preset
from waferllm.models.testing import random_weights, tiny_config

WSE2 = get_wafer("wse2")
#: a small wafer with room for tiny fp32 models on 4x4 / 5x5 regions: planning stays quick
SMALL = WSE2.replace(rows=16, cols=16, sram_bytes_per_pe=96 * 1024)
#: 8x8 PEs of 32 KB: four of tiny_config's fp32 layers per wafer on 4x4 regions
TIGHT = WSE2.replace(rows=8, cols=8, sram_bytes_per_pe=32 * 1024)
PROMPT = [3, 17, 99, 5, 200, 7, 1, 44, 9, 130, 61]
STEPS = 4
FP32_TOL = 1e-4  # the engine tests' tolerance, relative to the logit scale


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def _run(cfg, w, wafer, grids=(4, 5), mode="numeric", prompt=PROMPT, steps=STEPS, tokens=None, every_row=True):
    """(model, prefill logits of every prompt row (or, not ``every_row``, the last), each decode
    step's logits, the greedy tokens)."""
    run = RunConfig(*grids, max_seq_len=len(prompt) + steps + 2, prompt_len=len(prompt), dtype="fp32")
    wm = WaferModel(cfg, w if mode == "numeric" else None, wafer, run, mode=mode)
    wm.reset()
    pre = wm.prefill(prompt if mode == "numeric" else len(prompt), prompt_logits=mode == "numeric" and every_row)
    dec, toks = [], []
    tok = int(np.argmax(pre[-1])) if mode == "numeric" else None
    for i in range(steps):
        t = tokens[i] if tokens is not None else tok
        toks.append(t)
        lg = wm.decode(t)
        dec.append(lg)
        tok = int(np.argmax(lg)) if lg is not None else None
    return wm, pre, dec, toks


# ------------------------------------------------------------------ the cluster description


def test_presets_carry_the_public_link_figures_with_provenance():
    assert set(cluster_names()) >= {"cs2", "cs3"}
    for name, wafer in (("cs2", "wse2"), ("cs3", "wse3")):
        c = get_cluster(name)
        assert c.wafer.name == wafer and cluster_for(wafer).name == name
        # 1.2 Tb/s per system = 12 x 100 GbE, each direction
        assert c.link_bytes_per_s == pytest.approx(1.2e12 / 8)
        assert c.source_of("link_bytes_per_s").status == "derived"
        lat = c.source_of("hop_latency_s")
        assert lat.status == "assumed" and lat.range[0] <= c.hop_latency_s <= lat.range[1] <= 10e-6
        ovh = c.source_of("transfer_overhead_s")
        assert ovh.status == "assumed" and ovh.range[1] == pytest.approx(200e-6)  # the host-transfer benchmark's
        d = c.to_dict()
        assert d["hops"]["status"] == "assumed" and d["wafer"] == wafer


def test_cluster_file_with_a_base_and_clear_errors(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('base = "cs2"\nname = "mine"\nhop_latency_s = { value = 4e-6, source = "my switch", '
                 'status = "measured" }\nhops = 1\n')
    c = get_cluster(str(f))
    assert (c.name, c.hops, c.hop_latency_s, c.wafer.name) == ("mine", 1, 4e-6, "wse2")
    assert c.source_of("hop_latency_s").status == "measured" and c.source_of("hops").status == "user"
    assert c.link_bytes_per_s == get_cluster("cs2").link_bytes_per_s
    bad = tmp_path / "bad.toml"
    bad.write_text('base = "cs2"\nlink_speed = 3\n')
    with pytest.raises(HardwareError, match="unknown key.*link_speed.*known keys"):
        get_cluster(str(bad))
    bad.write_text('base = "cs2"\nhops = 0\n')
    with pytest.raises(HardwareError, match="hops must be a finite number > 0"):
        get_cluster(str(bad))
    with pytest.raises(HardwareError, match="unknown cluster 'cs9'.*cs2"):
        get_cluster("cs9")
    c = get_cluster("cs2")
    with pytest.raises(HardwareError, match="at most 64 wafers.*raise max_wafers"):
        c.with_wafers(65)
    with pytest.raises(HardwareError, match="prefill_wafers must leave at least one of the 3 wafers to decode"):
        c.with_wafers(3, prefill_wafers=3)
    assert c.with_wafers(3, 1).layout == "split" and c.with_wafers(3).layout == "shared"


# ------------------------------------------------------------------ the inter-wafer primitive

TINY_WAFER = WSE2.replace(rows=16, cols=16)


def _one_pe(region, row, col, words):
    """``words`` fp32 values held by one PE (row, col) of ``region``."""
    return Placement(region, (1, words), y_dim=0, y_of=np.array([row]), x_dim=1, x_of=np.full(words, col))


def test_transfer_costs_its_legs_the_link_latency_bytes_and_hand_off():
    c = cluster_for(TINY_WAFER).with_wafers(2)
    a, b = c.wafer_at(0), c.wafer_at(1)
    src = _one_pe(Region(a, 4, 4, 8, 4), 1, 2, 1000)  # PE (9, 6) of wafer 0
    dst = _one_pe(Region(b, 4, 4, 2, 8), 3, 0, 1000)  # PE (5, 8) of wafer 1
    led = Ledger(c.wafer)
    interwafer.charge_transfer(led, c, [interwafer.Flow(src, dst, 4)])
    w, clock, nbytes = c.wafer, c.wafer.clock_hz, 4000
    # the legs: along row 9 to the I/O column (col 0); on the other wafer from the I/O column
    # along row 5 to col 8
    head = (2 * w.ramp_cycles + w.alpha_cycles * 6) + (2 * w.ramp_cycles + w.alpha_cycles * 8)
    head += c.hops * c.hop_latency_s * clock
    body = max(math.ceil(nbytes / w.link_bytes_per_cycle), nbytes / c.link_bytes_per_s * clock)
    fixed = 2 * w.collective_overhead_cycles + c.transfer_overhead_s * clock
    assert led.cycles == pytest.approx(w.task_switch_cycles + head + body + fixed)
    assert led.totals["interwafer_bytes"] == nbytes and led.totals["interwafer_transfers"] == 1
    assert led.totals["bytes_moved"] == 2 * nbytes  # one leg on each wafer
    assert led.totals["hop_bytes"] == nbytes * (6 + 8)


def test_transfers_share_a_system_s_io_and_run_apart_on_others():
    c = cluster_for(TINY_WAFER).with_wafers(4)
    io = [interwafer.io_region(c.wafer_at(i)) for i in range(4)]
    big = 4_000_000  # 16 MB in fp32: the link (about 100 us) outweighs every fixed cost

    def on_io(i):  # already where the I/O meets the fabric: no wafer leg
        return interwafer.at_io(Placement(io[i], (16, big // 16), y_dim=0, y_of=np.arange(16)))

    def cost(pairs):
        return interwafer.transfer_cost(c, [interwafer.Flow(on_io(s), on_io(d), 4) for s, d in pairs]).cycles

    one = cost([(0, 1)])
    link = 4 * big / c.link_bytes_per_s * c.wafer.clock_hz
    assert one == pytest.approx(link + c.latency_s * c.wafer.clock_hz + 2 * c.wafer.collective_overhead_cycles
                                + c.transfer_overhead_s * c.wafer.clock_hz)
    assert cost([(0, 1), (2, 3)]) == pytest.approx(one)  # different systems: at the same time
    assert cost([(0, 2), (1, 2)]) == pytest.approx(one + link)  # into one system: its I/O carries both
    two_out = cost([(0, 1), (0, 2)])  # out of one system: both bodies and both hand-offs there
    assert two_out == pytest.approx(one + link + c.transfer_overhead_s * c.wafer.clock_hz)


def test_a_transfer_within_one_wafer_is_refused():
    c = cluster_for(TINY_WAFER).with_wafers(2)
    w0 = c.wafer_at(0)
    p = _one_pe(Region(w0, 2, 2), 0, 0, 2)
    with pytest.raises(MeshError, match="on the same wafer; move it on the wafer"):
        interwafer.Flow(p, _one_pe(Region(w0, 2, 2, 4, 4), 0, 0, 2), 4)


# ------------------------------------------------------------------ the planner


@pytest.mark.parametrize("wafers,prefill_wafers", [(2, None), (3, None), (3, 1), (4, 2)])
def test_plan_pipelines_every_layer_once_per_phase(wafers, prefill_wafers):
    cfg = tiny_config(num_layers=5)
    c = cluster_for(SMALL).with_wafers(wafers, prefill_wafers)
    p = plan_cluster(cfg, c, 4, 5, 32, "fp32")
    assert p.wafers == wafers and p.to_dict()["layout"] == c.layout
    for phase in ("prefill", "decode"):
        held = [w for w in p.shares if phase in w.phases]
        assert len(held) == (wafers if prefill_wafers is None else
                             prefill_wafers if phase == "prefill" else wafers - prefill_wafers)
        # consecutive shares of at least one layer each, covering the model; the tables on the first
        assert [w.layers.start for w in held] == [0] + [w.layers.stop for w in held[:-1]]
        assert held[-1].layers.stop == cfg.num_layers and all(len(w.layers) >= 1 for w in held)
        assert held[0].vocab == range(0, cfg.vocab_size) and not any(len(w.vocab) for w in held[1:])
        stages = getattr(p, phase).stages
        assert [s.layers.start for s in stages] == sorted(s.layers.start for s in stages)
        for s in stages:  # each stage's region is on its own wafer
            assert s.region.wafer.name == f"{SMALL.name}[{s.wafer}]" and s.layers.start in p.shares[s.wafer].layers
    if prefill_wafers is None:  # each wafer runs both phases on the same layers
        assert all(w.phases == ["prefill", "decode"] for w in p.shares)


def test_fewest_wafers_is_the_smallest_count_that_plans():
    cfg, small = tiny_config(num_layers=6), TIGHT
    cap = Capacity(cfg, small, 32, None, "fp32")
    n = fewest_wafers(cfg, small, 4, 4, 32, "fp32", capacity=cap)
    assert n is not None and n > 1
    c = cluster_for(small)
    plan_cluster(cfg, c.with_wafers(n), 4, 4, 32, "fp32")
    with pytest.raises(PlacementError, match=f"does not fit {n - 1} .*; {n} wafers hold it \\(checked by planning"):
        plan_cluster(cfg, c.with_wafers(n - 1), 4, 4, 32, "fp32")
    with pytest.raises(PlacementError, match="a pipeline of 7 wafers would leave some without one; use at most 6"):
        plan_cluster(cfg, c.with_wafers(7), 4, 4, 32, "fp32")
    assert fewest_wafers(tiny_config(num_layers=10), small, 4, 4, 32, "fp32") == 3  # four layers a wafer
    # split: a side per phase, each holding the whole model
    split = fewest_wafers(cfg, small, 4, 4, 32, "fp32", layout="split", capacity=cap)
    assert split == fewest_wafers(cfg, small, 4, None, 32, "fp32") + fewest_wafers(cfg, small, None, 4, 32, "fp32")


def test_single_wafer_does_not_fit_error_says_how_many_wafers_and_they_plan():
    cfg, w = get_model_preset("llama3-70b"), WSE2
    run = RunConfig.for_request(2048, 128, prefill_grid=600, decode_grid=600)
    with pytest.raises(PlacementError) as exc:
        WaferModel(cfg, None, w, run, mode="dry")
    n = exc.value.context["wafers_needed"]
    assert f"it needs {n} wse2 wafers on these grids (checked by planning them): predict with --wafers {n}" in \
        str(exc.value)
    c = cluster_for(w)
    plan_cluster(cfg, c.with_wafers(n), 600, 600, 2176, prompt_len=2048)
    with pytest.raises(PlacementError, match=f"does not fit {n - 1} wse2 wafers.*; {n} wafers hold it"):
        plan_cluster(cfg, c.with_wafers(n - 1), 600, 600, 2176, prompt_len=2048)


def test_a_405b_class_shape_is_placed_with_its_tables_on_as_few_wafers_as_it_takes():
    base = get_model_preset("llama3-70b")
    cfg = base.replace(name="405b-shape", hidden_size=16384, num_layers=126, num_heads=128, num_kv_heads=8,
                       intermediate_size=53248)
    n = fewest_wafers(cfg, WSE2, 745, 750, 2176, prompt_len=2048)
    p = plan_cluster(cfg, cluster_for(WSE2).with_wafers(n), 745, 750, 2176, prompt_len=2048)
    assert p.shares[-1].layers.stop == 126 and sum(len(w.layers) for w in p.shares) == 126
    tables = [w for w in p.shares if len(w.vocab)]
    assert tables == p.shares[:len(tables)] and sum(len(w.vocab) for w in tables) == cfg.vocab_size
    # the 405B's 16384-wide tables (8.4 GB in fp16) do not fit beside a layer on one wafer
    assert len(tables) >= 2


# ------------------------------------------------------------------ numeric runs


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(name="tiny3", num_layers=3)
    w = random_weights(cfg, seed=3)
    return cfg, w, _run(cfg, w, SMALL)


@pytest.mark.parametrize("wafers,prefill_wafers", [(2, None), (3, None), (2, 1), (3, 1), (3, 2)])
def test_logits_over_wafers_equal_one_wafer_s(tiny, wafers, prefill_wafers):
    cfg, w, (_, pre1, dec1, toks1) = tiny
    wm, pre, dec, toks = _run(cfg, w, cluster_for(SMALL).with_wafers(wafers, prefill_wafers))
    assert wm.plan.wafers == wafers
    assert _rel(pre, pre1) < FP32_TOL
    for a, b in zip(dec, dec1):
        assert _rel(a, b) < FP32_TOL
    assert toks == toks1  # greedy tokens never change with the wafer count


def test_tied_tables_and_tables_split_over_two_wafers_match_the_reference():
    from waferllm.models.reference import ReferenceModel

    # 2000 vocabulary entries: on 8x8-PE wafers the tables need two wafers beside the layers
    cfg = tiny_config(name="bigvocab", num_layers=4, vocab_size=2000)
    w = random_weights(cfg, seed=5)
    wafer = WSE2.replace(rows=8, cols=8)
    c = cluster_for(wafer).with_wafers(3)
    wm, pre, dec, toks = _run(cfg, w, c, grids=(4, 4))
    assert [len(s.vocab) > 0 for s in wm.plan.shares] == [True, True, False]
    ref = ReferenceModel(w, max_seq_len=32)
    ref_pre = ref.prefill(PROMPT)
    assert _rel(pre, ref_pre) < FP32_TOL
    for t, lg in zip(toks, dec):
        assert _rel(lg, ref.decode(t)) < FP32_TOL
    m = wm.request_metrics()
    assert m["breakdown_s"]["interwafer"] > 0
    # tied embeddings: one table serves the LM head and the embedding, on the first wafer
    cfg = tiny_config(name="tied3", num_layers=3, tie_word_embeddings=True)
    w = random_weights(cfg, seed=6)
    _, pre1, dec1, toks1 = _run(cfg, w, SMALL)
    _, pre2, dec2, toks2 = _run(cfg, w, cluster_for(SMALL).with_wafers(3))
    assert _rel(pre2, pre1) < FP32_TOL and toks2 == toks1
    for a, b in zip(dec2, dec1):
        assert _rel(a, b) < FP32_TOL


def test_smollm2_over_two_wafers_matches_the_reference(smollm):
    """The embedded SmolLM2 (30 layers, tied tables) on two wafers: the reference's logits and
    greedy tokens (a one-wafer run on these grids matches the reference: test_engine_numerics)."""
    from waferllm.models.reference import ReferenceModel

    wafer = WSE2.replace(rows=72, cols=72, sram_bytes_per_pe=200_000)  # 36 regions of 12x12
    ids = [1, 504, 3458, 282, 4670]
    wm, pre, dec, toks = _run(smollm.config, smollm.weights, cluster_for(wafer).with_wafers(2), grids=(12, 12),
                              prompt=ids, steps=1, every_row=False)
    assert [len(s.layers) for s in wm.plan.shares] == [15, 15]
    ref = ReferenceModel(smollm.weights, max_seq_len=16)
    ref_pre = ref.prefill(ids)
    assert _rel(pre[0], ref_pre[-1]) < FP32_TOL and toks[0] == int(np.argmax(ref_pre[-1]))
    assert _rel(dec[0], ref.decode(toks[0])) < FP32_TOL


# ------------------------------------------------------------------ what a cluster run costs


def test_dry_run_on_a_cluster_equals_the_numeric_run():
    """Stages on different wafers holding the same program replay one another in a dry run."""
    cfg = tiny_config(name="tiny6", num_layers=6)
    w = random_weights(cfg, seed=2)
    c = cluster_for(SMALL).with_wafers(3)
    num = _run(cfg, w, c, tokens=[0] * STEPS, every_row=False)[0]
    dry = _run(cfg, None, c, mode="dry")[0]
    assert any(t != i for i, t in enumerate(dry.twins["decode"]))  # some stage replays a twin
    mn, md = num.request_metrics(), dry.request_metrics()
    # the dry run assumes a typical prompt and token 0, the numeric one ran PROMPT: the
    # embedding gathers differ, nothing else
    for key in ("tpot_s", "transition_s", "interwafer_bytes", "interwafer_transfers", "kv_capacity_tokens",
                "kv_capacity_tokens_concat"):
        assert md[key] == pytest.approx(mn[key], rel=1e-9), key
    assert md["sram_breakdown_bytes_per_pe"] == mn["sram_breakdown_bytes_per_pe"]


def test_interwafer_traffic_and_energy_of_a_two_wafer_run(tiny):
    cfg, w, (one, *_) = tiny
    wm = _run(cfg, w, cluster_for(SMALL).with_wafers(2))[0]
    m, m1 = wm.request_metrics(), one.request_metrics()
    E, L, b = cfg.hidden_size, len(PROMPT), 4  # fp32 hidden states
    # prefill: the prompt's rows go to wafer 1 and (all rows' logits asked) come back to the
    # tables on wafer 0; each decode step: the vector out and back
    assert m["interwafer_bytes"] == 2 * L * E * b + STEPS * 2 * E * b
    assert m["interwafer_transfers"] == 2 + 2 * STEPS
    assert m["wafers"] == 2 and m["layout"] == "shared" and "wafers" not in m1
    c = wm.cluster
    total = m["ttft_s"] + m["transition_s"] + m["tpot_s"] * STEPS
    parts = m["energy_breakdown_j"]
    assert parts["static"] == pytest.approx(2 * SMALL.static_power_w * total)  # both systems, all the time
    assert parts["interwafer"] == pytest.approx(8 * m["interwafer_bytes"] * c.link_energy_pj_per_bit * 1e-12)
    assert m["energy_j"] == pytest.approx(sum(parts.values()))
    # the pipeline is slower than one wafer by at least the links' latency and hand-offs
    crossing = c.latency_s + c.transfer_overhead_s
    assert m["tpot_s"] > m1["tpot_s"] + 2 * crossing and m["ttft_s"] > m1["ttft_s"] + 2 * crossing


def test_one_wafer_cluster_is_the_single_wafer_run(tiny):
    cfg, w, (one, pre1, *_) = tiny
    wm, pre, *_ = _run(cfg, w, cluster_for(SMALL).with_wafers(1))
    assert wm.cluster is None and np.array_equal(pre, pre1)
    assert wm.request_metrics() == one.request_metrics()


def test_band_spans_the_link_s_assumed_ranges():
    cfg = get_model_preset("smollm2-135m")
    c = cluster_for(WSE2).with_wafers(2)
    run = RunConfig.for_request(64, 4, prefill_grid=64, decode_grid=48)
    m = predict_run(cfg, c, run, 64, 4, gpus=False)
    slow = c.source_of("transfer_overhead_s").range[1]
    # every decode step crosses twice: at the slow end each hand-off costs the range's top
    assert m["tpot_s_high"] >= m["tpot_s"] + 2 * (slow - c.transfer_overhead_s)
    assert m["cluster"]["transfer_overhead_s"]["range"] == [2e-6, 200e-6]


# ------------------------------------------------------------------ choosing, and the command line


def test_search_predicts_every_count_and_keeps_the_fastest():
    cfg = tiny_config(name="tiny6", num_layers=6)
    run = RunConfig.for_request(8, 3, prefill_grid=4, decode_grid=4, dtype="fp32")
    res = search(cfg, cluster_for(TIGHT), run, 8, 3)
    lo = res["fewest"]
    done = [o for o in res["options"] if o.e2e_s is not None]
    assert {o.wafers for o in done if o.layout == "shared"} == set(range(lo, 2 * lo + 1))
    assert any(o.layout == "split" for o in done)
    assert res["best"].e2e_s == min(o.e2e_s for o in done)
    for o in done:  # each figure is that option's own prediction, run in full apart
        m = o.metrics
        assert o.e2e_s == pytest.approx(m["ttft_s"] + m["transition_s"] + 2 * m["tpot_s"])
        c = cluster_for(TIGHT).with_wafers(o.wafers, o.prefill_wafers)
        full = predict_run(cfg, c, run.with_grids(o.prefill_grid, o.decode_grid), 8, 3, gpus=False, band=False)
        for key in ("ttft_s", "tpot_s", "transition_s", "e2e_tokens_per_s"):
            assert m[key] == full[key], key
    # the report is the chosen option's full prediction (band and all), with the search beside it
    b = res["best"]
    m = predict_cluster(cfg, cluster_for(TIGHT), run, 8, 3, gpus=False)
    alone = predict_run(cfg, cluster_for(TIGHT).with_wafers(b.wafers, b.prefill_wafers), run, 8, 3, gpus=False)
    assert m["cluster_search"]["chosen"]["wafers"] == b.wafers
    kept = set(alone) - {"host_wall_s"} - ({"cluster"} if b.wafers == 1 else set())
    assert "ttft_s_low" in kept and {k: m[k] for k in kept} == {k: alone[k] for k in kept}


def test_predict_cluster_json_has_wafers_per_wafer_placement_and_traffic(capsys):
    argv = ["predict", "--model", "smollm2-135m", "--input-len", "64", "--output-len", "4", "--prefill-grid", "64",
            "--decode-grid", "48", "--wafers", "3", "--wafer-layout", "shared", "--json"]
    assert main(argv) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["wafers"] == 3 and m["placement"]["wafers"] == 3
    per = m["placement"]["per_wafer"]
    assert [w["wafer"] for w in per] == [0, 1, 2] and per[-1]["layers"][1] == 30
    assert m["interwafer_bytes"] > 0 and m["cluster"]["name"] == "cs2"
    assert m["cluster_search"]["chosen"]["wafers"] == 3
    py = predict_cluster(get_model_preset("smollm2-135m"), cluster_for(WSE2),
                         RunConfig.for_request(64, 4, prefill_grid=64, decode_grid=48), 64, 4, wafers=3,
                         layout="shared")
    for key in ("ttft_s", "tpot_s", "e2e_tokens_per_s", "interwafer_bytes", "kv_capacity_tokens"):
        assert m[key] == pytest.approx(py[key]), key


@pytest.mark.parametrize("args,message", [
    (["--wafers", "0"], "--wafers must be a positive whole number or 'auto', got '0'"),
    (["--wafers", "2", "--extrapolate-from-layers", "1"], "with --wafers every layer is placed: drop one of them"),
    (["--wafers", "2", "--wafer-layout", "diagonal"], "--wafer-layout must be shared, split or auto"),
    (["--wafers", "2", "--cluster", "cs9"], "unknown cluster 'cs9'"),
])
def test_predict_wafers_refuses_bad_input_with_advice(capsys, args, message):
    argv = ["predict", "--model", "smollm2-135m", "--input-len", "64", "--output-len", "4", "--prefill-grid", "64",
            "--decode-grid", "48", *args]
    assert main(argv) != 0
    assert message in capsys.readouterr().err.replace("\n", " ")


def test_requests_that_a_cluster_cannot_run_are_refused():
    cfg = tiny_config(num_layers=3)
    with pytest.raises(RequestError, match="extrapolating from some layers .* is for one wafer"):
        WaferModel(cfg, None, cluster_for(SMALL).with_wafers(2), RunConfig(4, 4, max_seq_len=16, layers=1),
                   mode="dry")
    with pytest.raises(PlacementError, match="does not fit 1 wse2 wafer on the grids tried; it needs"):
        search(get_model_preset("llama3-70b"), cluster_for(WSE2), RunConfig.for_request(2048, 8, prefill_grid=600,
                                                                                      decode_grid=600), 2048, 8,
               wafers=1)
