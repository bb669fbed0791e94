"""Work a prediction reuses (within one model, and across the options of a cluster search or
the candidates of the tuner) gives exactly what computing it afresh gives: the move and
transfer charges priced once per geometry, the decode step's program key read from one
cache per kind, the SRAM replays that change nothing skipped, a program's footprint read
from the newest allocations, and the decode regions' SRAM read once per report."""

from __future__ import annotations

import numpy as np
import pytest

from waferllm.engine import capacity, metrics, transition
from waferllm.engine.predict import predict_cluster
from waferllm.engine.run_config import RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.hardware import get_wafer
from waferllm.hardware.cluster import cluster_for
from waferllm.mesh import comm, interwafer, move
from waferllm.mesh.ledger import Ledger
from waferllm.mesh.memory import SRAM, Footprint
from waferllm.mesh.move import Placement, charge_move
from waferllm.mesh.region import Region
from waferllm.mesh.runtime import Mesh
from waferllm.models.presets import get_model_preset

WSE2 = get_wafer("wse2")


def _state(led: Ledger) -> tuple:
    return (led.cycles, led.compute_cycles, led.comm_cycles, led.exposed_comm_cycles, led.overhead_cycles,
            dict(led.totals), dict(led.by_primitive))


@pytest.mark.parametrize("shape,layouts", [((37, 300), (("y", "x"), ("y", "x"))), ((300,), (("y",), ("x",)))])
def test_relayout_charges_what_charge_move_charges(shape, layouts):
    """Each relayout (the first, priced, and the repeats, read back) charges the ledger what
    charge_move charges from the two placements, in the same float operations."""
    move._TENSOR_MOVES.clear()
    led, ref = Ledger(WSE2, keep_events=False), Ledger(WSE2, keep_events=False)
    a, b = Region(WSE2, 12, 12, 0, 0), Region(WSE2, 9, 9, 20, 30)
    for _ in range(3):
        for src, dst in ((a, b), (b, a)):
            t = Mesh(src, mode="dry", ledger=led).place(shape, layouts[0], "fp16", name="h")
            out = comm.relayout(t, Mesh(dst, mode="dry", ledger=led), layouts[1], name="stage_transfer")
            t2 = Mesh(src, mode="dry", ledger=ref).place(shape, layouts[0], "fp16", name="h")
            o2 = Mesh(dst, mode="dry", ledger=ref).place(shape, layouts[1], "fp16", name="stage_transfer")
            charge_move(ref, Placement.of(t2), Placement.of(o2), 2, name="stage_transfer")
            assert out.shape == t.shape and _state(led) == _state(ref)
    assert led.cycles > 0


def test_interwafer_transfer_charges_what_a_flow_charges():
    c = cluster_for(WSE2).with_wafers(2)
    w0, w1 = c.wafer_at(0), c.wafer_at(1)
    led, ref = Ledger(WSE2, keep_events=False), Ledger(WSE2, keep_events=False)
    interwafer._TRANSFERS.clear()
    for _ in range(3):
        t = Mesh(Region(w0, 10, 10, 5, 7), mode="dry", ledger=led).place((64, 200), ("y", "x"), "fp16", name="h")
        interwafer.transfer(t, Mesh(Region(w1, 8, 8, 100, 3), mode="dry", ledger=led), ("y", "x"), c)
        t2 = Mesh(Region(w0, 10, 10, 5, 7), mode="dry", ledger=ref).place((64, 200), ("y", "x"), "fp16", name="h")
        o2 = Mesh(Region(w1, 8, 8, 100, 3), mode="dry", ledger=ref).place((64, 200), ("y", "x"), "fp16", name="i")
        interwafer.charge_transfer(ref, c, [interwafer.Flow(Placement.of(t2), Placement.of(o2), 2)], "interwafer")
        assert _state(led) == _state(ref)


def _every_cache(self, seq):
    """The step key's caches as first written: every decode stage's."""
    return [st.caches[seq] for st in self.decode_stages]


def test_step_key_from_one_cache_per_kind_replays_the_same_steps(monkeypatch):
    """Regions of several sizes (their caches fill rows at different tokens) over a row
    boundary: the same steps execute and replay as with every stage's cache in the key,
    and every figure is the same."""
    cfg = get_model_preset("llama3-8b")
    run = RunConfig.for_request(2150, 16, prefill_grid=600, decode_grid=360)

    def go():
        wm = WaferModel(cfg, None, WSE2, run, mode="dry")
        wm.reset()
        wm.prefill(2150)
        for _ in range(15):
            wm.decode(None)
        steps = sum(1 for k in wm._memo if k[0] == "step")
        return wm.request_metrics(), steps, {st.mesh.rows for st in wm.decode_stages}

    shared = go()
    monkeypatch.setattr(WaferModel, "_alike_caches", _every_cache)
    alone = go()
    assert len(shared[2]) > 1 and shared[1] > 1  # several cache kinds, several executed steps
    assert shared[1] == alone[1] and shared[0] == alone[0]


def test_search_options_equal_their_own_predictions(monkeypatch):
    """Every option of a search, predicted with what earlier options left in the shared
    caches, equals the same option predicted alone with every cache emptied first."""
    cfg = get_model_preset("llama3-70b")
    run = RunConfig.for_request(256, 8, prefill_grid=600, decode_grid=360)
    m = predict_cluster(cfg, cluster_for(WSE2), run, 256, 8, wafers="auto", limit=1.25, gpus=False, band=False)
    options = m["cluster_search"]["options"]
    assert len(options) >= 2
    for opt in options:
        move._TENSOR_MOVES.clear()
        interwafer._TRANSFERS.clear()
        transition._ALIKE.clear()
        monkeypatch.setattr(WaferModel, "_alike_caches", _every_cache)
        alone = predict_cluster(cfg, cluster_for(WSE2), run, 256, 8, wafers=opt["wafers"], layout=opt["layout"],
                                gpus=False, band=False)
        monkeypatch.undo()
        for k in ("ttft_s", "tpot_s", "transition_s", "e2e_tokens_per_s"):
            assert alone[k] == opt[k]


def _program(sram: SRAM, weight: int):
    """A program that lends ``weight`` (a MeshGEMM operand), allocates, resizes and keeps one."""
    keep = sram.alloc("residual", 40)
    with sram.lent(type("T", (), {"_handle": weight})()):
        tmp = sram.alloc("scores", np.arange(16).reshape(4, 4) * 3)
        sram.resize(keep, 48)
        sram.free(tmp)
    return keep


def _sram_state(s: SRAM) -> tuple:
    highs = {n: sorted(v.values()) for n, v in s.held_at_highs().items()}
    return s.peak_bytes, dict(s.peak_by_name), {n: h[0] for n, h in s._highs.items()}, highs


class _ByDefinition(Footprint):
    """A footprint whose points are read by their definition: every entry not held when the
    program began, and every one held then that is not held now."""

    def note(self, sram, name, worst, top):
        now = sram._allocs
        self.points.append((name, worst - self.start, top, tuple(e for h, e in now.items() if h not in self.held),
                            tuple(h for h in self.held if h not in now)))
        self._highest = None


def test_footprint_reads_the_program_allocations_in_order():
    region = Region(WSE2, 4, 4)
    seen = []
    for kind in (Footprint, _ByDefinition):
        s = SRAM(region)
        w = s.alloc("L0.q", 100)
        s.alloc("L0.k", np.ones((4, 4), np.int64) * 7)
        s._footprint = fp = kind(s)
        _program(s, w)
        s.alloc("more", 8)
        seen.append([(n, r, t, [(a, np.asarray(b).tolist()) for a, b in mine], lent)
                     for n, r, t, mine, lent in fp.points])
    assert seen[0] == seen[1]
    assert [p[0] for p in seen[0]] == ["residual", "scores", "residual", "L0.q", "more"]
    assert seen[0][1][4] == (w,) and [e[0] for e in seen[0][1][3]] == ["residual", "scores"]


def test_replaying_a_footprint_again_changes_nothing():
    """A footprint replayed again from the same usage (skipped) leaves the accounting as
    replaying it every time does."""
    region = Region(WSE2, 4, 4)
    rec = SRAM(region)
    w = rec.alloc("L0.q", 100)
    with rec.recording() as fp:
        _program(rec, w)
    a, b = SRAM(region), SRAM(region)
    for s in (a, b):
        s.alloc("L1.q", 100)
    for _ in range(3):
        a.replay(fp)
        b._replayed.clear()  # every replay done in full
        b.replay(fp)
        assert _sram_state(a) == _sram_state(b)
    for s in (a, b):  # from higher up: replayed again, in full
        s.alloc("kv cache (shift)", 64)
        s.replay(fp)
    assert _sram_state(a) == _sram_state(b)


def _decoded(cfg) -> WaferModel:
    """A shape-only model after a 512-token prompt and three decode steps."""
    wm = WaferModel(cfg, None, WSE2, RunConfig.for_request(512, 4, prefill_grid=600, decode_grid=360), mode="dry")
    wm.reset()
    wm.prefill(512)
    for _ in range(3):
        wm.decode(None)
    return wm


def test_decode_regions_read_once_equal_reading_them_again():
    cfg = get_model_preset("llama3-8b")
    wm = _decoded(cfg)
    regions = metrics.decode_regions(wm)
    pp, stages = wm.measured_stages("decode")
    fresh = capacity.kv_capacity(cfg, pp, stages)
    given = capacity.kv_capacity(cfg, pp, stages, regions=regions)
    assert (fresh.shift, fresh.concat, fresh.slots) == (given.shift, given.concat, given.slots)
    assert metrics.sram_breakdown(wm) == metrics.sram_breakdown(wm, regions)


def test_kv_destination_is_the_caches_placement():
    cfg = get_model_preset("llama3-8b")
    wm = WaferModel(cfg, None, WSE2, RunConfig.for_request(300, 4, prefill_grid=600, decode_grid=360), mode="dry")
    for st in wm.decode_stages:
        for length in (300, 301):
            got, want = transition.kv_destination(st.cache, length), st.cache.placement(length)
            assert got.region is st.mesh.region and got.shape == want.shape
            assert np.array_equal(got.y_of, want.y_of) and np.array_equal(got.x_of, want.x_of)


def test_highs_read_from_a_shared_base_equal_each_read_alone():
    """What was held at every high-water mark, each replay's base read once for all its
    snapshots, equals each snapshot read on its own (prefill: replayed layers keep K/V)."""
    from waferllm.mesh.memory import _held, _on_fullest

    cfg = get_model_preset("llama3-8b")
    wm = _decoded(cfg)
    replayed = 0
    for st in wm.prefill_stages + wm.decode_stages:
        s = st.mesh.sram
        alone = {name: _on_fullest(_held(allocs), s.region.shape) for name, (_, allocs) in s._highs.items()}
        got = s.held_at_highs()
        assert got == alone and [list(v) for v in got.values()] == [list(v) for v in alone.values()]
        replayed += sum(not isinstance(a, dict) for _, a in s._highs.values())
    assert replayed
