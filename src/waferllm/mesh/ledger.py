"""The cost ledger: the critical path of an executed program, and everything it did.

Every primitive charges the ledger with an *event*: a kind (``compute``, ``comm`` or
``overhead``), the cycles it takes on the critical path, and counters (flops, bytes,
hop-bytes, SRAM traffic, routing stages). Events inside ``overlap()`` run concurrently:
compute events queue on the PE's core, communication events on its router, and the
block costs ``max(compute, comm)``; outside it they follow one another.

Spans (phase > layer > op > primitive) group events; ``breakdown()`` sums cycles by
span name at any depth and ``chrome_trace()`` exports a Perfetto-readable trace.

Energy is earned from the counters (MACs by dtype, SRAM bytes, bit-hops) plus static
power for the critical-path time: ``energy_breakdown_j()``; ``energy_j`` is its sum.
"""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from waferllm.mesh.corners import Corners, cmax, pick, values, width
from waferllm.mesh.cost import energy_breakdown_j as _energy_breakdown_j

COUNTERS = (
    "flops", "macs_fp16", "macs_fp32", "bytes_moved", "hop_bytes", "sram_read_bytes", "sram_write_bytes",
    "routing_stages", "relayed_transfers", "messages", "interwafer_bytes", "interwafer_transfers",
)


@dataclass
class Event:
    name: str
    kind: str  # compute | comm | overhead
    start: float
    cycles: float
    span: tuple[str, ...]
    counters: dict = field(default_factory=dict)


@dataclass
class _Overlap:
    start: float
    compute: float = 0.0
    comm: float = 0.0
    overhead: float = 0.0


class Ledger:
    """Critical-path cycles plus totals, for one or more regions of one wafer, or of the
    wafers of one cluster's pipeline (a request is on one wafer at a time; wafers that work
    at once are ``parallel`` branches)."""

    def __init__(self, wafer, keep_events: bool = True, max_events: int = 200_000):
        self.wafer = wafer
        self.cycles = 0.0
        self.compute_cycles = 0.0
        self.comm_cycles = 0.0
        self.exposed_comm_cycles = 0.0
        self.overhead_cycles = 0.0
        self.totals: dict[str, float] = defaultdict(float)
        self.by_primitive: dict[str, float] = defaultdict(float)
        self.notes: list[str] = []
        self.keep_events = keep_events
        self.max_events = max_events
        self.events: list[Event] = []
        self.spans: list[tuple[tuple[str, ...], float, float]] = []
        self._stack: list[str] = []
        self._overlap: _Overlap | None = None
        self._group: dict | None = None
        self.task_depth = 0  # > 0 inside a kernel that runs as one task (see compute.task)

    def charge_task_switch(self) -> None:
        """An op or collective is a task the PE switches to: a fixed cost outside the op's own
        time, paid once on entering a kernel that runs as one task (none inside it)."""
        if self.wafer.task_switch_cycles and not self.task_depth:
            self.charge("task_switch", "overhead", self.wafer.task_switch_cycles)

    # ---- structure ---------------------------------------------------------
    @contextmanager
    def span(self, name: str):
        """A named scope (phase, layer, op); nested spans build a path."""
        self._stack.append(name)
        start = self.cycles
        try:
            yield self
        finally:
            path = tuple(self._stack)
            self._stack.pop()
            if self.keep_events and len(self.spans) < self.max_events:
                self.spans.append((path, start, self.cycles))

    @contextmanager
    def overlap(self):
        """Compute and communication issued inside run concurrently (double buffering)."""
        if self._overlap is not None:  # nested: already concurrent
            yield self
            return
        ov = _Overlap(start=self.cycles)
        self._overlap = ov
        try:
            yield self
        finally:
            self._overlap = None
            busy = cmax(ov.compute, ov.comm)
            self.exposed_comm_cycles += cmax(0.0, ov.comm - ov.compute)
            self.cycles = ov.start + busy + ov.overhead

    # ---- charging ----------------------------------------------------------
    def charge(self, name: str, kind: str, cycles: float, **counters) -> float:
        if not isinstance(cycles, Corners):  # (a band's corners stay corners: see mesh.corners)
            cycles = float(cycles)
        grp = self._group
        if grp is not None and kind == "comm":
            # concurrent transfers on different links: the group costs its slowest one
            start = grp["start"]
            grp["longest"] = cmax(grp["longest"], cycles)
        else:
            start = self._advance(kind, cycles)
        if kind == "compute":
            self.compute_cycles += cycles
        elif kind == "comm":
            self.comm_cycles += cycles if grp is None else 0.0
        else:
            self.overhead_cycles += cycles
        totals = self.totals
        for k, v in counters.items():
            totals[k] += v
        self.by_primitive[name] += cycles
        if self.keep_events and len(self.events) < self.max_events:
            self.events.append(Event(name, kind, start, cycles, tuple(self._stack), counters))
        return cycles

    def _advance(self, kind: str, cycles: float) -> float:
        """Put ``cycles`` of work of ``kind`` on the critical path; returns its start."""
        ov = self._overlap
        if ov is None:
            start = self.cycles
            self.cycles += cycles
            if kind == "comm":
                self.exposed_comm_cycles += cycles
            return start
        if kind == "compute":
            start = ov.start + ov.compute
            ov.compute += cycles
        elif kind == "comm":
            start = ov.start + ov.comm
            ov.comm += cycles
        else:
            start = ov.start + cmax(ov.compute, ov.comm) + ov.overhead
            ov.overhead += cycles
        return start

    @contextmanager
    def concurrent(self):
        """Transfers issued together on disjoint links (e.g. A along rows and B along
        columns in one MeshGEMM step) run at the same time: the group costs its slowest."""
        if self._group is not None:
            yield self
            return
        ov = self._overlap
        start = self.cycles if ov is None else ov.start + ov.comm
        self._group = {"start": start, "longest": 0.0}
        try:
            yield self
        finally:
            grp, self._group = self._group, None
            self._advance("comm", grp["longest"])
            self.comm_cycles += grp["longest"]

    @contextmanager
    def parallel(self):
        """Independent regions working at the same time: ``with ledger.parallel() as par:``
        then ``with par.branch(): ...`` for each; the critical path advances by the slowest."""
        if self._overlap is not None:
            raise RuntimeError("parallel() cannot be nested inside overlap()")
        par = _Parallel(self, self.cycles)
        yield par
        self.cycles = par.start + par.longest
        self.exposed_comm_cycles += par.exposed

    @contextmanager
    def pipeline(self):
        """Work items (micro-batches of requests) flowing through resources (regions):
        ``with ledger.pipeline() as pipe:`` then ``with pipe.slot(item, regions): ...`` for
        each piece of work. A slot starts when its item's previous slot is done and every
        region it uses is free, so different items occupy different regions at once; the
        block costs the schedule's makespan."""
        if self._overlap is not None:
            raise RuntimeError("pipeline() cannot be nested inside overlap()")
        pipe = _Pipeline(self, self.cycles)
        try:
            yield pipe
        finally:  # the clock ends at the schedule's end, also when a slot failed
            self.cycles = pipe.end
            self.exposed_comm_cycles += pipe.critical_exposed()

    def replay(self, delta: dict, name: str) -> None:
        """Charge again the cost of an identical program run measured by ``since()``.

        Dry-run uses this for layers whose program (shapes, layouts, constants) is the
        same as one already executed: the cost is that execution's, not a formula.
        """
        counters = {k: v for k, v in delta.items() if k in COUNTERS}
        start = self.cycles
        self.cycles += delta["cycles"]
        self.compute_cycles += delta["compute_cycles"]
        self.comm_cycles += delta["comm_cycles"]
        self.exposed_comm_cycles += delta["exposed_comm_cycles"]
        self.overhead_cycles += delta["overhead_cycles"]
        for k, v in counters.items():
            self.totals[k] += v
        if "by_primitive" in delta:  # keep the per-op breakdown of the replayed program
            for k, v in delta["by_primitive"].items():
                self.by_primitive[k] += v
        else:
            self.by_primitive[name] += delta["cycles"]
        path = tuple(self._stack)
        if self.keep_events and len(self.events) < self.max_events:
            self.events.append(Event(name, "replay", start, delta["cycles"], path, counters))
        if self.keep_events and len(self.spans) < self.max_events:
            self.spans.append((path + (name,), start, self.cycles))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # ---- reading -----------------------------------------------------------
    @property
    def seconds(self) -> float:
        return self.wafer.cycles_to_seconds(self.cycles)

    @property
    def energy_j(self) -> float:
        """Energy earned by the executed events plus static power x time: the sum of ``energy_breakdown_j()``."""
        return sum(self.energy_breakdown_j().values())

    def energy_breakdown_j(self, delta: dict | None = None, seconds: float | None = None) -> dict[str, float]:
        """Joules by term (``compute_fp16``, ``compute_fp32``, ``sram_read``, ``sram_write``, ``fabric``,
        ``static``) of the whole ledger, or of ``delta`` (a ``since(mark)`` result, or counters scaled
        from one). ``seconds`` (critical-path time, for the static term) defaults to the ledger's or
        the delta's own."""
        counters = self.totals if delta is None else delta
        if seconds is None:
            if delta is None:
                seconds = self.seconds
            elif "seconds" in delta:
                seconds = delta["seconds"]
            else:
                seconds = self.wafer.cycles_to_seconds(delta["cycles"])
        return _energy_breakdown_j(self.wafer, counters, seconds)

    @property
    def energy_power_x_time_j(self) -> float:
        """Cross-check only: the wafer's whole-system ``power_w`` x the critical-path time."""
        return self.wafer.power_w * self.seconds

    def mark(self, per_primitive: bool = False) -> dict:
        """Snapshot for measuring a sub-range: ``ledger.since(mark)``; with ``per_primitive``
        the delta also has the cycles of every primitive (what ``replay`` needs)."""
        m = {
            "cycles": self.cycles, "compute": self.compute_cycles, "comm": self.comm_cycles,
            "exposed": self.exposed_comm_cycles, "overhead": self.overhead_cycles, "totals": dict(self.totals),
        }
        if per_primitive:
            m["by_primitive"] = dict(self.by_primitive)
        return m

    def since(self, mark: dict) -> dict:
        out = {
            "cycles": self.cycles - mark["cycles"],
            "compute_cycles": self.compute_cycles - mark["compute"],
            "comm_cycles": self.comm_cycles - mark["comm"],
            "exposed_comm_cycles": self.exposed_comm_cycles - mark["exposed"],
            "overhead_cycles": self.overhead_cycles - mark["overhead"],
        }
        for k in set(self.totals) | set(mark["totals"]):
            out[k] = self.totals.get(k, 0.0) - mark["totals"].get(k, 0.0)
        out["seconds"] = self.wafer.cycles_to_seconds(out["cycles"])
        if "by_primitive" in mark:
            before = mark["by_primitive"]
            out["by_primitive"] = {k: v - before.get(k, 0.0) for k, v in self.by_primitive.items()
                                   if v != before.get(k, 0.0)}
        return out

    def breakdown(self, depth: int = 1) -> dict[str, float]:
        """Critical-path cycles by span path truncated to ``depth`` (from closed spans)."""
        out: dict[str, float] = defaultdict(float)
        for path, start, end in self.spans:
            if len(path) == depth:
                out["/".join(path)] += end - start
        return dict(out)

    def summary(self) -> dict:
        return {
            "cycles": self.cycles,
            "seconds": self.seconds,
            "compute_cycles": self.compute_cycles,
            "comm_cycles": self.comm_cycles,
            "exposed_comm_cycles": self.exposed_comm_cycles,
            "overhead_cycles": self.overhead_cycles,
            "energy_j": self.energy_j,
            "energy_breakdown_j": self.energy_breakdown_j(),
            "energy_power_x_time_j": self.energy_power_x_time_j,
            **{k: self.totals.get(k, 0.0) for k in COUNTERS},
            "by_primitive": dict(self.by_primitive),
            "notes": list(self.notes),
        }

    def chrome_trace(self) -> dict:
        """Chrome/Perfetto trace: spans on one track, compute and comm on their own, and
        replayed programs (a whole layer's cost at once) on theirs."""
        us = 1e6 / self.wafer.clock_hz
        tids = {"span": 1, "compute": 2, "comm": 3, "overhead": 4, "replay": 5}
        ev = [{"ph": "M", "pid": 1, "tid": t, "name": "thread_name", "args": {"name": n}} for n, t in tids.items()]
        for path, start, end in self.spans:
            ev.append({"ph": "X", "pid": 1, "tid": tids["span"], "name": path[-1], "cat": "/".join(path[:-1]) or "root",
                       "ts": start * us, "dur": max(end - start, 0) * us})
        for e in self.events:
            ev.append({"ph": "X", "pid": 1, "tid": tids.get(e.kind, 4), "name": e.name, "cat": "/".join(e.span) or "root",
                       "ts": e.start * us, "dur": e.cycles * us,
                       "args": {"cycles": e.cycles, **{k: _plain(v) for k, v in e.counters.items()}}})
        return {"traceEvents": ev, "displayTimeUnit": "ns", "otherData": {"wafer": self.wafer.name}}

    def write_trace(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.chrome_trace()))
        return path


def _plain(v):
    """Counters may be numpy scalars (e.g. from a region sized with numpy ints): make them JSON-able."""
    return v.item() if hasattr(v, "item") else v


class _Parallel:
    """Branches start together; the block costs the slowest, and its exposed communication
    is that branch's (the others' is hidden behind it)."""

    def __init__(self, ledger: Ledger, start: float):
        self.ledger = ledger
        self.start = start
        self.longest = 0.0
        self.exposed = 0.0  # exposed communication of the slowest branch so far

    @contextmanager
    def branch(self):
        led = self.ledger
        led.cycles = self.start
        exposed_before = led.exposed_comm_cycles
        try:
            yield led
        finally:
            took = led.cycles - self.start
            exposed = led.exposed_comm_cycles - exposed_before
            n = width(took, exposed, self.longest, self.exposed)
            if n == 1:
                if took > self.longest or (took == self.longest and exposed > self.exposed):
                    self.longest, self.exposed = took, exposed
            else:  # each corner keeps its own slowest branch
                slower = tuple(t > lo or (t == lo and e > x) for t, lo, e, x in zip(
                    values(took, n), values(self.longest, n), values(exposed, n), values(self.exposed, n)))
                self.longest, self.exposed = pick(slower, took, self.longest), pick(slower, exposed, self.exposed)
            led.exposed_comm_cycles = exposed_before
            led.cycles = self.start


class _Pipeline:
    """The schedule of a :meth:`Ledger.pipeline` block: when each region is free and each
    item is ready, and the slot that set every slot's start (to find the critical path)."""

    def __init__(self, ledger: Ledger, start: float):
        self.ledger = ledger
        self.start = start
        self.end = start
        self.free: dict = {}  # region -> (time it is free, slot that last used it)
        self.ready: dict = {}  # item -> (time its last slot ended, that slot)
        self.slots: list[tuple[float, float, int | None]] = []  # (end, exposed comm, predecessor)
        self.last: int | None = None  # the slot that ends last

    @contextmanager
    def slot(self, item, regions):
        led = self.ledger
        waits = [self.ready.get(item, (self.start, None))] + [self.free.get(r, (self.start, None)) for r in regions]
        begin, pred = max(waits, key=lambda w: w[0])
        led.cycles = begin
        exposed_before = led.exposed_comm_cycles
        try:
            yield led
        finally:
            end = led.cycles
            self.slots.append((end, led.exposed_comm_cycles - exposed_before, pred))
            led.exposed_comm_cycles = exposed_before
            me = len(self.slots) - 1
            self.ready[item] = (end, me)
            for r in regions:
                self.free[r] = (end, me)
            if end >= self.end:
                self.end, self.last = end, me
            led.cycles = self.end

    def item_end(self, item) -> float:
        """When ``item``'s last slot so far ended."""
        return self.ready.get(item, (self.start, None))[0]

    def critical_exposed(self) -> float:
        """Exposed communication of the slots on the critical path (the others' is hidden)."""
        total, i = 0.0, self.last
        while i is not None:
            end, exposed, i = self.slots[i]
            total += exposed
        return total
