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
from waferllm.mesh.cost import ENERGY_TERMS, energy_breakdown_j, message_cycles

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


@pytest.mark.parametrize("prim", ["shift", "ring", "bcast", "allreduce", "gather", "relayout", "matmul", "elementwise"])
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
        elif prim == "relayout":
            comm.relayout(t, Mesh(Region(WAFER, 3, 3, row0=10), mode="dry", ledger=m.ledger), (None, "x"))
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


def test_spans_breakdown_trace(tmp_path):
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
    s = json.loads(json.dumps(led.summary()))
    assert s["flops"] > 0 and s["bytes_moved"] > 0
    assert s["macs_fp32"] == 64 / 2 and s["macs_fp16"] == 0  # exp on 64 fp32 elements: 64 one-flop ops
    assert set(s["energy_breakdown_j"]) == set(ENERGY_TERMS)
    mark = led.mark()
    comm.shift(m.place(np.ones((8, 8)), ("y", "x")), "y")
    d = led.since(mark)
    assert d["cycles"] > 0 and d["messages"] > 0 and d["seconds"] == pytest.approx(d["cycles"] / WAFER.clock_hz)


def test_trace_with_numpy_sized_region():
    """A region sized with numpy ints makes numpy counters: the trace still carries them as plain numbers."""
    m = Mesh(Region(WAFER, np.int64(3), np.int64(5)))
    comm.broadcast(m.place(np.ones((3, 5)), ("y", "x")), "x", 1)  # fp32, one element (4 B) per PE
    trace = json.loads(json.dumps(m.ledger.chrome_trace()))
    (ev,) = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"] == "broadcast"]
    # root at column 1 of 5: the farthest receiver is 3 hops away; one message per row (3 rows)
    cycles = 2 * WAFER.ramp_cycles + 3 * WAFER.alpha_cycles + 1 + WAFER.collective_overhead_cycles
    assert ev["args"] == {"cycles": cycles, "bytes_moved": 12, "hop_bytes": 36, "routing_stages": 0, "messages": 3,
                          "relayed_transfers": 0, "sram_read_bytes": 12, "sram_write_bytes": 12}
    assert all(type(v) in (int, float) for v in ev["args"].values())
    assert ev["dur"] == pytest.approx(cycles * 1e6 / WAFER.clock_hz)


def _parallel(led, *branches):
    """Run one ``parallel()`` block; each branch is a list of (kind, cycles) charges."""
    with led.parallel() as par:
        for charges in branches:
            with par.branch():
                for kind, cycles in charges:
                    led.charge(kind, kind, cycles)


def test_parallel_exposed_comm_is_the_critical_branchs():
    led = Ledger(WAFER)
    # (branches, critical-path cycles after the block, exposed communication after the block)
    blocks = [
        ([[("comm", 30)], [("compute", 100)]], 100, 0),  # the critical branch exposes no communication
        ([[("comm", 30)], [("comm", 40), ("compute", 5)]], 145, 40),
        ([[("compute", 10)], [("comm", 25)]], 170, 65),
    ]
    for branches, cycles, exposed in blocks:
        _parallel(led, *branches)
        assert (led.cycles, led.exposed_comm_cycles) == (cycles, exposed)
    # busy totals still count every branch's work
    assert led.comm_cycles == 30 + 30 + 40 + 25 and led.compute_cycles == 100 + 5 + 10
    # and a delta across a block sees the same critical-path exposure
    mark = led.mark()
    _parallel(led, [("comm", 7)], [("comm", 9)], [("comm", 3)])
    d = led.since(mark)
    assert d["cycles"] == 9 and d["exposed_comm_cycles"] == 9


# ------------------------------------------------------------------ energy from events

# round constants so that the expected energies below are worked out by hand
ROUND = get_wafer("wse2", clock_hz=1e9, fp16_macs_per_cycle=4, fp32_macs_per_cycle=1, op_overhead_cycles=10,
                  task_switch_cycles=0, collective_overhead_cycles=0, ramp_cycles=2, alpha_cycles=1,
                  link_bits_per_cycle=32, mac_energy_fp16_pj=1.0, mac_energy_fp32_pj=3.0,
                  sram_read_energy_pj_per_byte=0.5, sram_write_energy_pj_per_byte=0.75,
                  fabric_energy_pj_per_bit_hop=0.1, static_power_w=1000.0)


def _round_mesh(rows, cols):
    return Mesh(Region(ROUND, rows, cols), mode="dry")


def _small_program(m):
    """On a 2 x 3 mesh: an fp16 tile matmul, an fp32 elementwise op, a one-hop shift."""
    compute.matmul_tiles(m, None, None, dtype="fp16", shapes=(4, 5, 6))
    t = m.place((2, 3 * 8), ("y", "x"), "fp32")  # 8 fp32 elements (32 B) per PE
    compute.elementwise(None, t, ops_per_elem=2)
    comm.shift(t, "x")


def test_energy_breakdown_of_a_small_program_by_hand():
    m = _round_mesh(2, 3)
    _small_program(m)
    led = m.ledger
    # matmul: 4*5*6 = 120 MACs per PE on 6 PEs; reads A, B, C (2 B each) = 148 B, writes C (fp32) = 96 B;
    #         ceil(120 / 4) + 10 = 40 cycles
    # elementwise: 8 elements x 2 ops = 16 flops = 8 fp32 MACs per PE; reads 32 B, writes 32 B; 16 + 10 = 26 cycles
    # shift: 4 of the 6 PEs send 32 B one hop (the last column has no one to send to): 2+2+1+8 = 13 cycles
    assert led.cycles == 40 + 26 + 13
    assert led.totals["macs_fp16"] == 720 and led.totals["macs_fp32"] == 48
    assert led.totals["sram_read_bytes"] == 6 * 148 + 6 * 32 + 4 * 32
    assert led.totals["sram_write_bytes"] == 6 * 96 + 6 * 32 + 4 * 32
    assert led.totals["hop_bytes"] == 4 * 32
    pj = 1e-12
    expect = {
        "compute_fp16": 720 * 1.0 * pj,
        "compute_fp32": 48 * 3.0 * pj,
        "sram_read": 1208 * 0.5 * pj,
        "sram_write": 896 * 0.75 * pj,
        "fabric": 128 * 8 * 0.1 * pj,
        "static": 1000.0 * 79e-9,
    }
    got = led.energy_breakdown_j()
    assert set(got) == set(expect)
    for k, v in expect.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k
    assert led.energy_j == sum(got.values())
    assert led.energy_j == pytest.approx(sum(expect.values()), rel=1e-12)
    assert led.energy_power_x_time_j == pytest.approx(ROUND.power_w * 79e-9)
    s = led.summary()
    assert s["energy_breakdown_j"] == got and s["energy_j"] == led.energy_j


def test_energy_is_not_time_alone():
    """Programs of equal cycles but different work or traffic earn different energy."""
    # compute: an fp16 product of 128 MACs and an fp32 one of 32 MACs both take 32 + 10 cycles
    a, b = _round_mesh(2, 2), _round_mesh(2, 2)
    compute.matmul_tiles(a, None, None, dtype="fp16", shapes=(4, 4, 8))
    compute.matmul_tiles(b, None, None, dtype="fp32", shapes=(4, 4, 2))
    assert a.ledger.cycles == b.ledger.cycles == 42
    assert a.ledger.totals["macs_fp16"] == 4 * 128 and a.ledger.totals.get("macs_fp32", 0) == 0
    assert b.ledger.totals["macs_fp32"] == 4 * 32 and b.ledger.totals.get("macs_fp16", 0) == 0
    ea, eb = a.ledger.energy_breakdown_j(), b.ledger.energy_breakdown_j()
    assert ea["static"] == eb["static"]
    assert ea["compute_fp16"] == pytest.approx(512e-12) and eb["compute_fp32"] == pytest.approx(384e-12)
    assert a.ledger.energy_j != b.ledger.energy_j
    # communication: the same one-hop shift of 32 B per PE, along rows of 8 or along columns of 2
    x, y = _round_mesh(2, 8), _round_mesh(2, 8)
    comm.shift(x.place((2, 8 * 8), ("y", "x"), "fp32"), "x")
    comm.shift(y.place((2, 8 * 8), ("y", "x"), "fp32"), "y")
    assert x.ledger.cycles == y.ledger.cycles == 13
    fx, fy = x.ledger.energy_breakdown_j(), y.ledger.energy_breakdown_j()
    assert fx["fabric"] == pytest.approx(14 * 32 * 8 * 0.1e-12) and fy["fabric"] == pytest.approx(8 * 32 * 8 * 0.1e-12)
    assert x.ledger.energy_j > y.ledger.energy_j


def test_energy_of_a_delta_and_of_scaled_counters():
    whole = _round_mesh(2, 3)
    compute.matmul_tiles(whole, None, None, dtype="fp32", shapes=(3, 3, 3))
    mark = whole.ledger.mark()
    _small_program(whole)
    delta = whole.ledger.since(mark)
    alone = _round_mesh(2, 3)
    _small_program(alone)
    got, ref = whole.ledger.energy_breakdown_j(delta), alone.ledger.energy_breakdown_j()
    assert got == pytest.approx(ref, rel=1e-12)
    # counters scaled (an extrapolated run): every event term scales, static follows the given time
    scaled = {k: 3 * v for k, v in delta.items() if isinstance(v, (int, float))}
    s3 = energy_breakdown_j(ROUND, scaled, 3 * delta["seconds"])
    assert s3 == pytest.approx({k: 3 * v for k, v in ref.items()}, rel=1e-12)
    s_other_time = whole.ledger.energy_breakdown_j(delta, seconds=1e-3)
    assert s_other_time["static"] == pytest.approx(1.0) and s_other_time["fabric"] == pytest.approx(ref["fabric"])
    with pytest.raises(ValueError, match="seconds must be >= 0"):
        energy_breakdown_j(ROUND, delta, -1.0)


def test_replay_carries_energy_counters():
    ran = _round_mesh(2, 3)
    mark = ran.ledger.mark(per_primitive=True)
    _small_program(ran)
    delta = ran.ledger.since(mark)
    replayed = Ledger(ROUND)
    replayed.replay(delta, "layer")
    replayed.replay(delta, "layer")
    for k in ("macs_fp16", "macs_fp32", "sram_read_bytes", "sram_write_bytes", "hop_bytes"):
        assert replayed.totals[k] == 2 * ran.ledger.totals[k], k
    assert replayed.energy_breakdown_j() == pytest.approx(
        {k: 2 * v for k, v in ran.ledger.energy_breakdown_j().items()}, rel=1e-12)


# ------------------------------------------------------------------ SRAM


def test_sram_overflow_message():
    m = _mesh(4, 4)
    cap = WAFER.usable_sram_bytes_per_pe
    keep = m.place(np.zeros((4, 4 * 1000), np.float32), ("y", "x"), name="weights")  # 4000 B/PE
    with pytest.raises(SRAMOverflowError, match="kv_cache") as exc:
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
    assert sw.ledger.cycles - hw.ledger.cycles == pytest.approx(5 * WAFER.beta_cycles)
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
    with m.sram.lent(b):
        assert m.sram.used_max() == before - b.bytes_per_pe
        with m.sram.lent(b):  # already lent: nothing more to free
            assert m.sram.used_max() == before - b.bytes_per_pe
    assert m.sram.used_max() == before
    r = meshgemm(a, b)
    # during the kernel: A and its skewed copy, which rotates through its own space plus one
    # receive buffer, B's own space and one receive buffer, and the fp32 accumulator
    # (4 x 4 fp32 per PE) which becomes the output: never a third copy of A or B
    acc = 2 * 4 * 4
    assert r.report.sram_peak_bytes_per_pe == before + 2 * a.bytes_per_pe + b.bytes_per_pe + acc
    assert "W" in m.sram.by_name()
