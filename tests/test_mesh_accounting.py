"""Cost model from first principles, the ledger, SRAM and route accounting, dry-run speed."""

from __future__ import annotations

import gc
import json
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waferllm.errors import RouteOverflowError, SRAMOverflowError
from waferllm.hardware import get_wafer
from waferllm.mesh import Ledger, Mesh, Region, comm, compute
from waferllm.mesh.comm import reduce_schedule
from waferllm.mesh.cost import message_cycles

WAFER = get_wafer("wse2")


def _mesh(rows, cols, mode="numeric", **kw):
    return Mesh(Region(WAFER, rows, cols, name=f"r{rows}x{cols}"), mode=mode, **kw)


def _stages(phases):
    return sum(p.stages * p.repeats for p in phases)


def _hops(phases):
    return sum(p.repeats * (p.stages * p.spacing + p.extra_hops) for p in phases)


# ------------------------------------------------------------------ cost from first principles


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.sampled_from(["fp16", "fp32"]), st.sampled_from(["y", "x"]), st.integers(2, 9))
def test_one_hop_shift_cost(elems, dtype, axis, n):
    m = _mesh(n, n, mode="dry")
    t = m.place((n, elems * n), (None, "x") if axis == "y" else ("y", "x"), dtype)
    b = t.bytes_per_pe
    comm.shift(t, axis, 1)
    expect = 2 * WAFER.ramp_cycles + WAFER.alpha_cycles + math.ceil(b / WAFER.link_bytes_per_cycle)
    assert m.ledger.cycles == expect
    assert m.ledger.comm_cycles == expect == m.ledger.exposed_comm_cycles


@pytest.mark.parametrize("n", range(3, 40))
def test_interleave_ring_step_never_exceeds_two_hops(n):
    m = _mesh(n, n, mode="dry")
    t = m.place((8 * n, 8 * n), ("y", "x"), "fp16")
    b = t.bytes_per_pe
    two_hop = 2 * WAFER.ramp_cycles + 2 * WAFER.alpha_cycles + math.ceil(b / WAFER.link_bytes_per_cycle)
    for axis in ("x", "y"):
        before = m.ledger.cycles
        comm.ring_shift(t, axis, 1)
        assert m.ledger.cycles - before <= two_hop
    plain = m.ledger.cycles
    comm.ring_shift(t, "x", 1, ring="plain")
    assert m.ledger.cycles - plain == two_hop + (n - 3) * WAFER.alpha_cycles  # the wrap pays n-1 hops
    # a skew of up to floor(n/2) positions takes that many rounds
    before = m.ledger.cycles
    comm.ring_shift(t, "x", np.arange(n))
    assert m.ledger.cycles - before == (n // 2) * two_hop


def test_ktree_stages_follow_k_root_n():
    for k in (1, 2, 3):
        prev = 0
        for n in range(4, 801):
            phases, routes = reduce_schedule(n, "ktree", k)
            s = _stages(phases)
            ideal = k * n ** (1 / k) / 2
            assert 0.5 * ideal <= s <= 1.5 * ideal + 1, (k, n, s, ideal)
            assert s >= prev, f"K={k}: stages drop from {prev} to {s} at N={n}"
            prev = s
            assert 0.8 * n <= _hops(phases) <= 2 * n
            assert routes <= k + 2
    # more levels, fewer stages on a long line
    assert _stages(reduce_schedule(720, "ktree", 3)[0]) < _stages(reduce_schedule(720, "ktree", 2)[0]) \
        < _stages(reduce_schedule(720, "ktree", 1)[0])


@pytest.mark.parametrize("n", [2, 3, 10, 64, 720])
def test_pipeline_chain_ring_schedules(n):
    ph, _ = reduce_schedule(n, "pipeline")
    assert _stages(ph) == n - 1
    assert _hops(ph) == 2 * (n - 1)
    ph, _ = reduce_schedule(n, "chain")
    assert _stages(ph) == n - 1 and _hops(ph) == 2 * (n - 1)
    ph, _ = reduce_schedule(n, "ring")
    step = 1 if n == 2 else 2
    assert _stages(ph) == n - 1  # one add per reduce-scatter step
    assert _hops(ph) == 2 * (n - 1) * step  # reduce-scatter and allgather both travel the ring
    assert reduce_schedule(1, "ktree") == ([], 0)


def test_allreduce_costs_order_on_a_long_line():
    costs = {}
    for algo, k in (("pipeline", 2), ("ring", 2), ("ktree", 2), ("ktree", 3)):
        m = _mesh(720, 1, mode="dry")
        v = m.place((4096,), (None,), "fp16")
        comm.allreduce(v, "y", algo=algo, k=k)
        costs[(algo, k)] = m.ledger.cycles
    assert costs[("ktree", 2)] < costs[("pipeline", 2)]
    assert costs[("ktree", 3)] < costs[("pipeline", 2)]
    assert costs[("ring", 2)] > costs[("ktree", 2)]


@pytest.mark.parametrize("prim", ["shift", "ring", "bcast", "allreduce", "gather", "replace", "matmul", "elementwise"])
def test_costs_monotone_in_bytes(prim):
    prev = -1.0
    for elems in (1, 2, 3, 7, 16, 64, 100, 257, 600):
        m = _mesh(4, 6, mode="dry")
        t = m.place((4, elems * 6), ("y", "x"), "fp16")
        if prim == "shift":
            comm.shift(t, "x")
        elif prim == "ring":
            comm.ring_shift(t, "x", 1)
        elif prim == "bcast":
            comm.broadcast(t, "y", 2)
        elif prim == "allreduce":
            comm.allreduce(m.place((elems,), (None,)), "x")
        elif prim == "gather":
            comm.gather(t)
        elif prim == "replace":
            comm.replace(t, Mesh(Region(WAFER, 3, 3, row0=10), mode="dry", ledger=m.ledger), (None, "x"))
        elif prim == "matmul":
            compute.matmul_tiles(m, None, None, dtype="fp16", shapes=(4, elems, 4))
        else:
            compute.elementwise(None, t)
        assert m.ledger.cycles >= prev
        prev = m.ledger.cycles
    assert prev > 0


def test_message_cycles_formula():
    w = WAFER
    assert message_cycles(w, 0, 0) == 0
    assert message_cycles(w, 10, 3, stages=2) == 2 * w.ramp_cycles + 3 * w.alpha_cycles + 2 * w.beta_cycles + 3
    assert message_cycles(w, 16, 1, links_shared=2) == 2 * w.ramp_cycles + w.alpha_cycles + 8


# ------------------------------------------------------------------ ledger


def test_overlap_charges_max_and_records_exposed_comm():
    led = Ledger(WAFER)
    with led.overlap():
        led.charge("mm", "compute", 100)
        led.charge("sh", "comm", 30)
        led.charge("sh2", "comm", 20)
    assert led.cycles == 100 and led.exposed_comm_cycles == 0
    with led.overlap():
        led.charge("mm", "compute", 10)
        led.charge("sh", "comm", 70)
        with led.overlap():  # nested: still concurrent
            led.charge("sh", "comm", 5)
        led.charge("step", "overhead", 3)
    assert led.cycles == 100 + 75 + 3
    assert led.exposed_comm_cycles == 65
    assert led.compute_cycles == 110 and led.comm_cycles == 125 and led.overhead_cycles == 3
    led.charge("serial", "comm", 9)
    assert led.cycles == 187 and led.exposed_comm_cycles == 74
    assert led.by_primitive["sh"] == 105


def test_spans_breakdown_trace_energy(tmp_path):
    m = _mesh(4, 4)
    led = m.ledger
    with led.span("prefill"):
        with led.span("layer0"):
            comm.ring_shift(m.place(np.ones((8, 8)), ("y", "x")), "x", 1)
        with led.span("layer1"):
            compute.elementwise(np.exp, m.place(np.ones((8, 8)), ("y", "x")))
    with led.span("decode"):
        comm.allreduce(m.place(np.ones(8), (None,)), "y")
    b1, b2 = led.breakdown(1), led.breakdown(2)
    assert set(b1) == {"prefill", "decode"} and set(b2) == {"prefill/layer0", "prefill/layer1"}
    assert sum(b1.values()) == pytest.approx(led.cycles)
    assert b1["prefill"] == pytest.approx(b2["prefill/layer0"] + b2["prefill/layer1"])
    tr = json.loads(json.dumps(led.chrome_trace()))
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    assert len(xs) >= 3 + 3 and {e["name"] for e in xs} >= {"prefill", "ring_shift", "elementwise"}
    p = led.write_trace(tmp_path / "t.json")
    assert json.loads(p.read_text())["traceEvents"]
    assert led.seconds == pytest.approx(led.cycles / WAFER.clock_hz)
    assert led.energy_j == pytest.approx(WAFER.power_w * led.seconds)
    s = led.summary()
    assert s["energy_j"] == pytest.approx(led.energy_j) and s["flops"] > 0 and s["bytes_moved"] > 0
    mark = led.mark()
    comm.shift(m.place(np.ones((8, 8)), ("y", "x")), "y")
    d = led.since(mark)
    assert d["cycles"] > 0 and d["messages"] > 0 and d["seconds"] == pytest.approx(d["cycles"] / WAFER.clock_hz)


def test_trace_with_numpy_sized_region():
    m = Mesh(Region(WAFER, np.int64(3), np.int64(5)))
    comm.broadcast(m.place(np.ones((3, 5)), ("y", "x")), "x", 1)
    json.dumps(m.ledger.chrome_trace())


# ------------------------------------------------------------------ SRAM


def test_sram_overflow_message():
    m = _mesh(4, 4)
    cap = WAFER.usable_sram_bytes_per_pe
    keep = m.place(np.zeros((4, 4 * 1000), np.float32), ("y", "x"), name="weights")  # 4000 B/PE
    with pytest.raises(SRAMOverflowError) as exc:
        m.place(np.zeros((4 * 100, 4 * 100), np.float32), ("y", "x"), name="kv_cache")  # 40000 B/PE
    msg = str(exc.value)
    assert "r4x4" in msg and "kv_cache" in msg and f"{cap:,}" in msg and f"{4000 + 40000:,}" in msg
    assert "weights" in msg
    assert m.sram.used_max() == 4000
    del keep


def test_sram_free_on_gc_and_peak():
    m = _mesh(2, 2)
    cap = m.sram.capacity
    for _ in range(5):  # would overflow if temporaries were never released
        t = m.place(np.zeros((2, 2 * (cap // 4 - 10)), np.float32), ("y", "x"), name="tmp")
        del t
        gc.collect()
    assert m.sram.used_max() == 0 and m.sram.peak_bytes <= cap
    a = m.place(np.zeros((2, 2 * 100), np.float32), ("y", "x"), name="a")
    b = comm.ring_shift(a, "x", 1)
    assert m.sram.used_max() == 800
    del a, b
    gc.collect()
    assert m.sram.used_max() == 0


def test_sram_uneven_allocations_and_resize():
    m = _mesh(2, 3)
    cap = m.sram.capacity
    per_pe = np.zeros((2, 3), np.int64)
    per_pe[1, 2] = cap - 10
    h = m.sram.alloc("skewed", per_pe)
    assert m.sram.used_max() == cap - 10 and m.sram.used()[0, 0] == 0
    with pytest.raises(SRAMOverflowError, match=r"\(1, 2\)|fullest PE"):
        m.sram.alloc("more", 11)
    m.sram.free(h)
    g = m.sram.alloc("kv", 100)
    m.sram.resize(g, 1000)
    assert m.sram.used_max() == 1000
    with pytest.raises(SRAMOverflowError, match="kv"):
        m.sram.resize(g, cap + 1)
    assert m.sram.used_max() == 1000  # a failed resize keeps the old allocation
    m.sram.free(g)
    assert m.sram.used_max() == 0


# ------------------------------------------------------------------ routes


def test_broadcast_route_overflow_raise_and_relay():
    strict = _mesh(6, 6, route_policy="raise")
    t = strict.place(np.ones((6, 6)), ("y", "x"))
    comm.broadcast(t, "x", 0, routes_per_pe=24)  # exactly the budget: fine
    with pytest.raises(RouteOverflowError, match="25 routes per PE"):
        comm.broadcast(t, "x", 0, routes_per_pe=25)

    hw, sw = _mesh(6, 6, mode="dry"), _mesh(6, 6, mode="dry", route_policy="relay")
    comm.broadcast(hw.place((6, 6), ("y", "x")), "x", 0, routes_per_pe=1)
    out = comm.broadcast(sw.place((6, 6), ("y", "x")), "x", 0, routes_per_pe=25)
    assert out.layout == ("y", None)
    assert sw.ledger.cycles > hw.ledger.cycles
    assert sw.ledger.totals["routing_stages"] == 5 and hw.ledger.totals.get("routing_stages", 0) == 0
    assert sw.ledger.cycles - hw.ledger.cycles == 5 * WAFER.beta_cycles
    assert sw.ledger.totals["relayed_transfers"] > 0
    assert any("relayed in software" in n for n in sw.ledger.notes)
    assert sw.routes.relayed == {"broadcast": 1}


def test_ring_primitives_cannot_relay():
    w = get_wafer("wse2", routable_routes_per_pe=2)
    m = Mesh(Region(w, 4, 4))
    t = m.place(np.ones((4, 4)), ("y", "x"))
    comm.shift(t, "x")
    with pytest.raises(RouteOverflowError, match="cannot relay"):
        comm.ring_shift(t, "x", 1)


# ------------------------------------------------------------------ dry-run speed


def test_dry_run_ktree_720_is_fast():
    m = Mesh.square(WAFER, 720, mode="dry")
    v = m.place((32 * 1024,), ("x",), "fp16")
    t0 = time.perf_counter()
    for k in (2, 3):
        out = comm.allreduce(v, "y", algo="ktree", k=k)
    elapsed = time.perf_counter() - t0
    assert out.tiles is None and m.ledger.cycles > 0
    assert elapsed < 0.5


def test_sram_lent_frees_during_and_restores_after():
    """A kernel borrowing a placed tensor's space: not counted twice, back afterwards."""
    import numpy as np

    from waferllm.hardware import get_wafer
    from waferllm.kernels.meshgemm import meshgemm, place_b
    from waferllm.mesh import Mesh

    m = Mesh.square(get_wafer("wse2"), 4)
    b = place_b(m, np.ones((16, 16), np.float32), "fp32", name="W")
    a = m.place(np.ones((8, 16), np.float32), ("y", "x"), "fp32", name="A")
    before = m.sram.used_max()
    with m.sram.lent(b._handle):
        assert m.sram.used_max() == before - b.bytes_per_pe
    assert m.sram.used_max() == before
    r = meshgemm(a, b)
    # during the kernel: A, skewed A and its incoming copy, B's own space and one receive
    # buffer, the fp32 accumulator and the output, never a third copy of B
    assert r.report.sram_peak_bytes_per_pe <= before + 2 * a.bytes_per_pe + b.bytes_per_pe + 2 * 4 * 2 * 4
    assert "W" in m.sram.by_name()
